"""GPTQ 4-bit products on the GPU (core/kernels/gptq4.cu): the per-layer tables
the kernels read, and the entry that picks a kernel by the number of input rows.

The layer arrives with its rows sorted by group (GPTQLinear.prepare), so a
group is a run of rows. Up to dispatch.SMALL_BATCH rows the split-K kernel reads qweight
directly; above that (or when a group boundary falls inside a packed int32,
which no AutoGPTQ or GPTQModel checkpoint has) the layer is dequantized to a
transient fp16 tile and multiplied by cuBLAS, as core/formats/exl2/kernel.py does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...kernels.build import kernels
from ...kernels.dispatch import SplitKScratch, multiprocessor_count, product
from .layout import CODES_PER_WORD

THREADS = 128  # threads per block of the small-batch kernel, four columns each
# A slice's inputs sit in shared memory as fp16, 8 rows at a time: 1024 inputs are 16 KiB.
MAX_SLICE_ROWS = 1024
BLOCKS_PER_SM = 4
# Two ways to have a block's weights in flight early: copy them all into shared memory
# asynchronously, or ask L2 for them before staging the inputs. Both measured slower than plain
# loads BATCH rows at a time (python3 -m bench.gptq4_speed --sweep), so neither is the default;
# they stay, tested, for the next attempt at the roofline.
ASYNC_COPY = False
PREFETCH = False
# Shared memory a block may take: staged inputs (8 rows) plus, with ASYNC_COPY, its weights;
# under 48 KiB no GPU needs an opt-in, and four blocks still fit an SM of the A100 or H100.
SHARED_BYTES = 46 * 1024
# Room after the sums for the kernel's per-tile completion counts (tiles <= columns / 4 / THREADS).
COUNT_ROOM = 4096

@dataclass(frozen=True)
class Gptq4Plan:
    """What the kernels need besides qweight and qzeros, made once per layer."""

    scales: torch.Tensor  # fp16 [G, N]
    qzeros: torch.Tensor  # int32 [G, N / 8]
    perm: torch.Tensor  # int32 [K]: input index of each stored row
    row_group: torch.Tensor  # int32 [K]: group of each stored row
    segments: torch.Tensor  # int32 [S, 4]: group, first packed row, packed rows, 0
    slices: torch.Tensor  # int32 [L, 4]: first segment, end segment, first packed row, packed rows
    max_slice_rows: int  # packed rows of the longest slice
    permuted: bool  # False: perm is the identity (no act-order)
    word_aligned: bool  # every group starts on a packed row: the small-batch kernel applies
    zero_offset: int
    threads: int
    in_features: int
    out_features: int


def plan_layer(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
               perm: torch.Tensor | None, zero_offset: int, multiprocessors: int | None = None) -> Gptq4Plan:
    """Tables for a layer whose rows are in group order (g_idx non-decreasing)."""
    device = qweight.device
    packed, out_features = qweight.shape
    in_features = packed * CODES_PER_WORD
    groups = scales.shape[0]
    counts = torch.bincount(g_idx.to(torch.int64).cpu(), minlength=groups).tolist()
    starts = [0]
    for count in counts:
        starts.append(starts[-1] + count)
    word_aligned = all(start % CODES_PER_WORD == 0 for start in starts)
    if multiprocessors is None:
        multiprocessors = multiprocessor_count(device)
    tiles = -(-out_features // 4 // THREADS)
    wanted = max(1, -(-BLOCKS_PER_SM * multiprocessors // tiles))
    slice_rows = min(max(1, -(-packed // wanted)), MAX_SLICE_ROWS // CODES_PER_WORD,
                     SHARED_BYTES // (16 * (THREADS + CODES_PER_WORD)))
    segments, slices = [], []
    for first in range(0, packed, slice_rows):
        end = min(first + slice_rows, packed)
        first_segment = len(segments)
        for g in range(groups):
            lo, hi = max(first, starts[g] // CODES_PER_WORD), min(end, starts[g + 1] // CODES_PER_WORD)
            if lo < hi:
                segments.append((g, lo, hi - lo, 0))
        slices.append((first_segment, len(segments), first, end - first))
    if perm is None:
        perm = torch.arange(in_features, dtype=torch.int32, device=device)
    return Gptq4Plan(
        scales=scales.to(torch.float16).contiguous(),
        qzeros=qzeros.contiguous(),
        perm=perm.to(device=device, dtype=torch.int32).contiguous(),
        row_group=g_idx.to(device=device, dtype=torch.int32).contiguous(),
        segments=torch.tensor(segments or [(0, 0, 0, 0)], dtype=torch.int32, device=device),
        slices=torch.tensor(slices, dtype=torch.int32, device=device),
        max_slice_rows=max(rows for *_, rows in slices),
        permuted=not bool((perm.cpu() == torch.arange(in_features, dtype=perm.dtype)).all()),
        word_aligned=word_aligned,
        zero_offset=zero_offset,
        threads=THREADS,
        in_features=in_features,
        out_features=out_features,
    )


_scratch = SplitKScratch()


def reserve_scratch(device: torch.device, rows: int, out_features: int) -> None:
    """Size the scratch before a CUDA graph is captured (capture must not allocate it)."""
    _scratch.get(device, rows * out_features + COUNT_ROOM)


def gemm_small(x: torch.Tensor, qweight: torch.Tensor, plan: Gptq4Plan, bias: torch.Tensor | None = None) -> torch.Tensor:
    """fp16 x [M <= dispatch.SMALL_BATCH, K] @ weight -> fp16 [M, N], straight from qweight."""
    partial = _scratch.get(x.device, min(x.shape[0], 8) * plan.out_features + COUNT_ROOM)
    return kernels().gptq4_gemm_small(x, plan.perm, qweight, plan.qzeros, plan.scales, plan.zero_offset,
                                      plan.segments, plan.slices, plan.max_slice_rows, plan.threads, PREFETCH,
                                      ASYNC_COPY, partial, bias)


def dequant(qweight: torch.Tensor, plan: Gptq4Plan) -> torch.Tensor:
    """fp16 [K, N], rows in stored (group) order; reference.dequant's twin."""
    return kernels().gptq4_dequant(qweight, plan.qzeros, plan.scales, plan.row_group, plan.zero_offset)


def matmul(x: torch.Tensor, qweight: torch.Tensor, plan: Gptq4Plan, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ weight (+ bias) -> [..., N] in x's dtype, on the kernels."""
    small = (lambda x16, bias16: gemm_small(x16, qweight, plan, bias16)) if plan.word_aligned else None
    return product(x, bias, plan.out_features, small, lambda: dequant(qweight, plan),
                   plan.perm if plan.permuted else None)

