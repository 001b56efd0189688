"""What the GPU entries of the quantized layers (exl2.py, gptq4.py) share: the
switch to the torch reference, the multiprocessor count their work splits aim
to fill, the split-K scratch, and the product that takes the small-batch kernel
for a few rows and a dequantized fp16 tile otherwise."""

from __future__ import annotations

import contextlib
import os
from typing import Callable

import torch

from .build import ENV_SWITCH, kernels

# Rows the small-batch kernels take; above this a dequantized tile and cuBLAS win.
SMALL_BATCH = 16

_reference_only = False


@contextlib.contextmanager
def reference_only():
    """Within this block quantized layers take the torch reference path, kernels or not."""
    global _reference_only
    previous, _reference_only = _reference_only, True
    try:
        yield
    finally:
        _reference_only = previous


def enabled(device: torch.device) -> bool:
    if _reference_only or device.type != "cuda" or os.environ.get(ENV_SWITCH, "1") == "0":
        return False
    return kernels() is not None


# QUANTLAB_FUSED=0 takes the torch twins of the fused norm, rope and SwiGLU kernels.
FUSED_SWITCH = "QUANTLAB_FUSED"


def fused(x: torch.Tensor):
    """The built kernels where the fused norm, rope and SwiGLU kernels take x (fp16 on a GPU), else None."""
    if x.dtype != torch.float16 or os.environ.get(FUSED_SWITCH, "1") == "0" or not enabled(x.device):
        return None
    return kernels()


def multiprocessor_count(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (1 off the GPU): what the kernels' work splits aim to fill."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


class SplitKScratch:
    """fp32 zeros a split-K kernel adds into; the kernel leaves them zeroed again,
    so one buffer per device serves every layer in stream order. A buffer outgrown
    is kept, not freed: a captured CUDA graph may still write into it."""

    def __init__(self):
        self.buffers: dict[torch.device, torch.Tensor] = {}
        self.outgrown: list[torch.Tensor] = []

    def get(self, device: torch.device, size: int) -> torch.Tensor:
        buffer = self.buffers.get(device)
        if buffer is None or buffer.numel() < size:
            if buffer is not None:
                self.outgrown.append(buffer)
            buffer = torch.zeros(max(size, 1 << 16), dtype=torch.float32, device=device)
            self.buffers[device] = buffer
        return buffer


def fp16_rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] as the kernels take it: contiguous fp16 rows [M, K]."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.dtype != torch.float16 or not x2.is_contiguous():
        x2 = x2.to(torch.float16).contiguous()
    return x2


def fp16_bias(bias: torch.Tensor | None) -> torch.Tensor | None:
    return bias.to(torch.float16) if bias is not None and bias.dtype != torch.float16 else bias


def product(
    x: torch.Tensor, bias: torch.Tensor | None, out_features: int,
    small: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None,
    tile: Callable[[], torch.Tensor], perm: torch.Tensor | None,
) -> torch.Tensor:
    """x [..., K] @ weight (+ bias) -> [..., N] in x's dtype.

    `small(x16, bias16)` is the small-batch kernel (None where the layer cannot
    take it); `tile()` dequantizes the fp16 weight [K, N] with its rows in the
    order `perm` gathers the input columns in (None: already in input order).
    """
    shape = x.shape
    x2, bias16 = fp16_rows(x), fp16_bias(bias)
    if small is not None and x2.shape[0] <= SMALL_BATCH:
        out = small(x2, bias16)
    else:
        weight = tile()
        # The permutation moves the (few) input columns, not the weight rows.
        out = (x2.index_select(1, perm) if perm is not None else x2) @ weight
        # Freed at once: keeping the tile would undo the point of quantizing.
        del weight
        if bias16 is not None:
            out += bias16
    return out.to(x.dtype).reshape(*shape[:-1], out_features)
