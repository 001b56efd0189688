"""EXL3 on the GPU: the entries of its CUDA kernels (core/kernels/exl3_*.cu), each with the torch
twin it must equal, which also runs wherever the kernels are not built (the CPU, QUANTLAB_KERNELS=0)
or not switched on (QUANTLAB_EXL3_KERNELS=1, below).

- decode: trellis -> fp16 W_r, bit for bit reference.decode_tiles;
- hadamard: fp16(fp16(had128(x * pre_scale)) * post_scale), bit for bit hadamard.block_hadamard with
  the scales' fp16 multiplies;
- viterbi: tile values -> states, the same states as core.convert.exl3.trellis.encode_tiles (the converter
  picks between the two: trellis.search_tiles).

plan_layer and matmul are the seam linear.py calls (EXL3Linear): the layer's product
y = had(had(x * suh) @ W_r) * svh (../shared/EXL3.md section 4). Up to GEMV_ROWS rows, gemv decodes
W_r on the fly and sums in fp32; more rows decode W_r into a transient fp16 tile multiplied by cuBLAS
(the tile is freed after the product, as the EXL2 path does).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...kernels import dispatch
from ...kernels.build import kernels
from .hadamard import BLOCK, block_hadamard
from .layout import SUPPORTED_BITS
from .reference import decode_tiles

# The kernels' codebook ids, as ExLlamaV3 numbers them (core/kernels/exl3.h).
CODEBOOK_IDS = {"3inst": 0, "mcg": 1, "mul1": 2}
# Rows the on-the-fly product takes (core/kernels/exl3.h, EXL3_GEMV_ROWS_MOST), and the most tile rows
# one of its blocks stages (EXL3_GEMV_SPLIT_TILES_MOST).
GEMV_ROWS = 8
GEMV_SPLIT_TILES_MOST = 64
# Blocks per multiprocessor the product's split of k aims for: its blocks are short, and many hide
# the latency of each one's first trellis words.
GEMV_BLOCKS_PER_SM = 4


# Opt-in until tests/test_exl3_kernels.py has passed on a GPU: the kernels compile for every Space GPU,
# but no GPU has run them yet. Without the switch an EXL3 layer on a GPU decodes with torch ops
# (reference.py, whose CUDA test passed on an H200) and the converter searches with the torch encoder.
EXL3_KERNELS_SWITCH = "QUANTLAB_EXL3_KERNELS"


def on_kernels(t: torch.Tensor) -> bool:
    return t.is_cuda and os.environ.get(EXL3_KERNELS_SWITCH) == "1" and dispatch.enabled(t.device)


def _codebook_id(codebook: str) -> int:
    if codebook not in CODEBOOK_IDS:
        raise ValueError(f"unknown EXL3 codebook {codebook!r}; known: {', '.join(CODEBOOK_IDS)}")
    return CODEBOOK_IDS[codebook]


def decode(trellis: torch.Tensor, codebook: str) -> torch.Tensor:
    """int16 [k/16, n/16, 16*K] -> fp16 W_r [k, n], the rotated weight in matrix order."""
    if on_kernels(trellis):
        return kernels().exl3_decode(trellis.contiguous(), _codebook_id(codebook))
    return decode_tiles(trellis, codebook)


def hadamard(x: torch.Tensor, pre_scale: torch.Tensor | None = None,
             post_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., dim] (fp16, or fp32 without pre_scale; dim a multiple of 128) -> fp16: the 128-block
    Hadamard of fp16(x * pre_scale) in fp32, rounded to fp16, times post_scale in fp16."""
    if x.dtype not in (torch.float16, torch.float32):
        raise ValueError(f"the EXL3 Hadamard takes fp16 or fp32 rows, not {x.dtype}")
    if pre_scale is not None and x.dtype != torch.float16:
        raise ValueError("the input scale of the EXL3 Hadamard is an fp16 multiply: give fp16 rows")
    if x.shape[-1] % BLOCK:
        raise ValueError(f"the EXL3 Hadamard rotation takes whole {BLOCK}-blocks, not a dimension of {x.shape[-1]}")
    if on_kernels(x):
        return kernels().exl3_hadamard(
            x.contiguous(), None if pre_scale is None else pre_scale.to(torch.float16).contiguous(),
            None if post_scale is None else post_scale.to(torch.float16).contiguous())
    if pre_scale is not None:
        x = x * pre_scale.to(torch.float16)
    out = block_hadamard(x).to(torch.float16)
    return out if post_scale is None else out * post_scale.to(torch.float16)


def viterbi(values: torch.Tensor, bits: float, codebook: str) -> torch.Tensor:
    """float [tiles, 256] tile values in position order -> int64 [tiles, 256]: the states of the best
    tail-biting ring at `bits` per weight, as core.convert.exl3.trellis.encode_tiles finds them."""
    if float(bits) not in SUPPORTED_BITS:
        raise ValueError(f"EXL3 stores {', '.join(f'{b:g}' for b in SUPPORTED_BITS)} bits per weight, not {bits:g}")
    if values.dim() != 2 or values.shape[1] != 256:
        raise ValueError(f"the trellis search takes [tiles, 256] values, not {list(values.shape)}")
    if not on_kernels(values):
        raise RuntimeError("the trellis search kernel needs CUDA values with the kernels built and switched on "
                           f"({EXL3_KERNELS_SWITCH}=1); core.convert.exl3.trellis.search_tiles falls back to torch")
    states = kernels().exl3_viterbi(values.to(torch.float32).contiguous(), round(2 * bits), _codebook_id(codebook))
    return states.to(torch.int64)


def gemv_tiles_per_split(tiles_k: int, tiles_n: int, multiprocessors: int) -> int:
    """Tile rows a block of the on-the-fly product takes: enough splits of k for every SM to have
    GEMV_BLOCKS_PER_SM blocks (each takes 8 tile columns), none longer than the kernel stages."""
    column_groups = -(-tiles_n // 8)
    splits = max(1, min(tiles_k, -(-GEMV_BLOCKS_PER_SM * multiprocessors // column_groups)))
    return max(1, min(GEMV_SPLIT_TILES_MOST, -(-tiles_k // splits)))


def gemv(x: torch.Tensor, trellis: torch.Tensor, codebook: str, tiles_per_split: int | None = None) -> torch.Tensor:
    """fp16 x [rows <= GEMV_ROWS, k] @ W_r -> fp32 [rows, n], W_r decoded on the fly (the kernels only)."""
    if tiles_per_split is None:
        tiles_per_split = gemv_tiles_per_split(trellis.shape[0], trellis.shape[1], dispatch.multiprocessor_count(x.device))
    return kernels().exl3_gemv(x.contiguous(), trellis.contiguous(), _codebook_id(codebook), tiles_per_split)


@dataclass(frozen=True)
class Exl3Plan:
    """What the product needs besides the stored tensors."""

    codebook: str
    in_features: int
    out_features: int
    gemv_tiles_per_split: int


def plan_layer(tensors: dict[str, torch.Tensor], codebook: str, in_features: int, out_features: int) -> Exl3Plan | None:
    """The kernels' per-layer facts for a layer on a CUDA device with the kernels built, else None."""
    if not on_kernels(tensors["trellis"]):
        return None
    trellis = tensors["trellis"]
    split = gemv_tiles_per_split(trellis.shape[0], trellis.shape[1], dispatch.multiprocessor_count(trellis.device))
    return Exl3Plan(codebook, in_features, out_features, split)


def matmul(x: torch.Tensor, tensors: dict[str, torch.Tensor], plan: Exl3Plan, bias: torch.Tensor | None,
           out_features: int) -> torch.Tensor:
    """x [..., in_features] @ the layer's weight (+ bias) on the kernels: [..., out_features] in x's dtype.

    reference.matmul's twin: up to GEMV_ROWS rows the same but for the order of the fp32 sums; more
    rows take cuBLAS, which rounds the sums to fp16 before the output Hadamard (the reference keeps
    them fp32). Both agree with it within fp16 tolerance."""
    shape = x.shape
    x16 = dispatch.fp16_rows(x)
    suh, svh = tensors["suh"], tensors["svh"]
    if x16.shape[1] != suh.shape[0]:
        x16 = F.pad(x16, (0, suh.shape[0] - x16.shape[1]))  # the padding inputs are zeros
    rotated = hadamard(x16, pre_scale=suh)
    if rotated.shape[0] <= GEMV_ROWS:
        product = gemv(rotated, tensors["trellis"], plan.codebook, plan.gemv_tiles_per_split)
    else:
        weight = decode(tensors["trellis"], plan.codebook)
        product = rotated @ weight
        del weight  # keeping the tile would undo the point of quantizing
    out = hadamard(product, post_scale=svh)[:, :out_features]
    if bias is not None:
        out = out + dispatch.fp16_bias(bias)[:out_features]
    return out.to(x.dtype).reshape(*shape[:-1], out_features)
