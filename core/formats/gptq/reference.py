"""The torch twins of the GPTQ kernels (kernel.py): the CPU path of a GPTQ layer,
and what the tests hold the kernels to."""

from __future__ import annotations

import torch

from .layout import unpack_rows, unpack_zeros


def dequantize_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                    zero_offset: int, perm: torch.Tensor | None = None) -> torch.Tensor:
    """float32 [K, N], rows in the original input order.

    (code - zero) * scale is exact in float32 (an fp16 scale times an integer of
    at most 5 bits), so this is the checkpoint's weight with no rounding at all;
    casting it to fp16 rounds once, as the dequant kernel does.
    """
    codes = unpack_rows(qweight)
    zeros = unpack_zeros(qzeros, zero_offset)
    group = g_idx.to(torch.int64)
    weight = (codes.to(torch.float32) - zeros.index_select(0, group).to(torch.float32))
    weight.mul_(scales.to(torch.float32).index_select(0, group))
    if perm is not None:
        weight = torch.empty_like(weight).index_copy_(0, perm.to(torch.int64), weight)
    return weight


def dequant(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
            zero_offset: int) -> torch.Tensor:
    """fp16 [K, N] in stored row order, as the dequant kernel writes it: one rounding of the exact product."""
    return dequantize_gptq(qweight, qzeros, scales, g_idx, zero_offset).to(torch.float16)


def matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
           g_idx: torch.Tensor, zero_offset: int, perm: torch.Tensor | None = None,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ the layer's weight (+ bias), in float32 on the exact weight."""
    weight = dequantize_gptq(qweight, qzeros, scales, g_idx, zero_offset, perm)
    out = x.float() @ weight
    return out + bias.float() if bias is not None else out
