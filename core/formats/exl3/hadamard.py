"""The 128-point Hadamard rotation EXL3 applies on both sides of every weight.

Sylvester order (H[i][j] = (-1)^popcount(i & j)), scaled by 1/sqrt(128), so it is
symmetric and its own inverse; always over contiguous 128-blocks (ExLlamaV3
1.6.5 util/hadamard.py and exllamav3_ext/quant/hadamard_inner.cuh;
../shared/EXL3.md section 4). The kernel runs a butterfly in fp32; so does
block_hadamard, rather than a matmul that a GPU may run in TF32.
"""

from __future__ import annotations

from functools import lru_cache

import torch

BLOCK = 128
SCALE = BLOCK ** -0.5


@lru_cache(maxsize=None)
def _hadamard_128() -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < BLOCK:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h * SCALE


def hadamard_128() -> torch.Tensor:
    """float32 [128, 128]: the scaled Sylvester matrix (a shared table; clone before changing it)."""
    return _hadamard_128()


def block_hadamard(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """x times H128 on every contiguous 128-block along `dim`, in float32; float32 out."""
    length = x.shape[dim]
    if length % BLOCK:
        raise ValueError(f"the EXL3 Hadamard rotation takes whole {BLOCK}-blocks, not a dimension of {length}")
    moved = x.movedim(dim, -1).to(torch.float32)
    leading = moved.shape[:-1]
    y = moved.reshape(-1, length // BLOCK, BLOCK)
    half = 1
    while half < BLOCK:
        pairs = y.view(y.shape[0], y.shape[1], BLOCK // (2 * half), 2, half)
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2).view(y.shape[0], y.shape[1], BLOCK)
        half *= 2
    return (y * SCALE).view(*leading, length).movedim(-1, dim)
