"""The torch twins of the EXL2 kernels (kernel.py), with the same arguments: the CPU
path of an EXL2 layer, and what the tests hold the kernels to."""

from __future__ import annotations

import torch

from .layout import decode_scales, group_rows, unpack_q_scale, unpack_q_weight


def dequantize_exl2(tensors: dict[str, torch.Tensor], out_features: int | None = None) -> torch.Tensor:
    """The layer's weight, fp16 [in_features, out_features], in the original input order.

    Bit for bit what ExLlamaV2's reconstruct kernel writes: (code - 2^(bits-1))
    times the decoded fp16 scale, one fp16 rounding (the fp32 product of two
    small fp16 values is exact). `out_features` drops the padding columns;
    without it the padded width comes back (padding columns are zero).
    """
    q_weight, q_groups, q_invperm = tensors["q_weight"], tensors["q_groups"], tensors["q_invperm"]
    in_features = q_invperm.shape[0]
    layout = group_rows(q_groups, q_weight.shape[0], in_features)
    codes = unpack_q_weight(q_weight, q_groups, in_features)
    scales = decode_scales(unpack_q_scale(tensors["q_scale"]), tensors["q_scale_max"]).to(torch.float32)
    perm = torch.argsort(q_invperm.to(torch.int64))
    weight = torch.empty(in_features, codes.shape[1], dtype=torch.float16, device=codes.device)
    # One group at a time keeps the fp32 temporaries in cache; whole-matrix
    # broadcasting is several times slower on a 4096x11008 layer.
    row = 0
    for g, (bits, rows) in enumerate(layout):
        block = codes[row : row + rows].to(torch.float32).sub_(1 << (bits - 1)).mul_(scales[g])
        weight.index_copy_(0, perm[row : row + rows], block.to(torch.float16))
        row += rows
    if out_features is not None:
        weight = weight[:, :out_features]
    return weight



def matmul(x: torch.Tensor, tensors: dict[str, torch.Tensor], out_features: int,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in_features] @ the layer's weight (+ bias): [..., out_features] in x's dtype."""
    weight = dequantize_exl2(tensors, out_features).to(x.dtype)
    out = x @ weight
    return out + bias if bias is not None else out


def dequant(tensors: dict[str, torch.Tensor], out_features: int) -> torch.Tensor:
    """fp16 [in_features, out_features] with rows in act-order, as the dequant kernel writes it."""
    weight = dequantize_exl2(tensors, out_features)
    return weight[torch.argsort(tensors["q_invperm"].to(torch.int64))]
