"""The torch twins of the kernels in this folder, with the same arguments.

They define what the kernels must compute: the tests compare the two, and a
model takes these when the extension cannot be built (build.py says why).
The GPTQ block walk's twin lives beside its caller in core/convert/gptq.py.
"""

from __future__ import annotations

import torch

from ..exl2_format import dequantize_exl2


def exl2_matmul(x: torch.Tensor, tensors: dict[str, torch.Tensor], out_features: int,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in_features] @ the layer's weight (+ bias): [..., out_features] in x's dtype."""
    weight = dequantize_exl2(tensors, out_features).to(x.dtype)
    out = x @ weight
    return out + bias if bias is not None else out


def exl2_dequant(tensors: dict[str, torch.Tensor], out_features: int) -> torch.Tensor:
    """fp16 [in_features, out_features] with rows in act-order, as the dequant kernel writes it."""
    weight = dequantize_exl2(tensors, out_features)
    return weight[torch.argsort(tensors["q_invperm"].to(torch.int64))]
