"""EXL3 products on the GPU: the seam for its CUDA kernels (core/kernels/), which do not exist yet.

plan_layer makes a layer's kernel tables, or None where no kernel takes the layer; the layer
(linear.py) then dequantizes once on its device with the torch reference (reference.py) and
multiplies the dense fp16 weight, the same fallback QuantizedLinear takes without kernels.
matmul is the product a plan runs. Both keep the arguments reference.matmul takes, so a test
can hold one to the other.
"""

from __future__ import annotations

import torch


def plan_layer(tensors: dict[str, torch.Tensor], codebook: str, in_features: int, out_features: int):
    """The kernels' per-layer tables for a layer on a CUDA device, or None: no EXL3 kernel yet."""
    return None


def matmul(x: torch.Tensor, tensors: dict[str, torch.Tensor], plan, bias: torch.Tensor | None,
           out_features: int) -> torch.Tensor:
    """x [..., in_features] @ the layer's weight (+ bias) on the kernels: [..., out_features]."""
    raise NotImplementedError("no EXL3 CUDA kernel yet; plan_layer returns None so this is never reached")
