"""EXL2 products on the GPU: the per-layer tables the kernels read, and the
entry that picks a kernel by the number of input rows.

Up to SMALL_BATCH rows the split-K kernel reads the packed weights directly
(decode is bound by the bytes of the weights, and packed bytes are few); above
that the layer is dequantized to an fp16 tile in act-order and multiplied by
cuBLAS, which is bound by arithmetic where dequantizing once costs little. The
tile is freed after the product: keeping it would undo the point of quantizing.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from ..exl2_format import group_rows
from . import reference
from .build import ENV_SWITCH, kernels

# Rows the small-batch kernel takes; it runs 8 at a time, so 16 is two passes,
# still cheaper than a dequantized tile for a 4096-wide layer.
SMALL_BATCH = 16
THREADS = 128  # threads per block of the small-batch kernel, four columns each
# A slice's inputs are staged in shared memory as fp32, 8 rows at a time: 1024 rows are 32 KiB.
MAX_SLICE_ROWS = 1024
# Blocks per multiprocessor the slicing aims for, so every SM has several to switch between.
BLOCKS_PER_SM = 4

_reference_only = False


@contextlib.contextmanager
def reference_only():
    """Within this block EXL2 layers take the torch reference path, kernels or not."""
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


@dataclass(frozen=True)
class Exl2Plan:
    """What the kernels need besides the stored tensors, made once per layer."""

    groups: torch.Tensor  # int32 [G, 4]: bits, first packed row, first act-order row, rows
    slices: torch.Tensor  # int32 [S, 4]: first group, end group, first act-order row, rows
    perm: torch.Tensor  # int32 [K]: input index of each act-order row
    max_slice_rows: int
    threads: int  # per block of the small-batch kernel, four columns each
    tiles: int  # column tiles of its grid
    in_features: int
    out_features: int


def plan_layer(tensors: dict[str, torch.Tensor], out_features: int, multiprocessors: int | None = None) -> Exl2Plan:
    q_weight, invperm = tensors["q_weight"], tensors["q_invperm"]
    device = q_weight.device
    in_features = invperm.shape[0]
    layout = group_rows(tensors["q_groups"].cpu(), q_weight.shape[0], in_features)
    starts = tensors["q_groups"].cpu().view(-1, 2)[:, 1].tolist()
    table, row = [], 0
    for (bits, rows), start in zip(layout, starts):
        table.append((bits, start, row, rows))
        row += rows
    if multiprocessors is None:
        multiprocessors = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    tiles = -(-q_weight.shape[1] // 4 // THREADS)
    cuts = split_k(layout, max(1, -(-BLOCKS_PER_SM * multiprocessors // tiles)))
    slices = [(a, b, table[a][2], sum(rows for _, rows in layout[a:b])) for a, b in zip(cuts, cuts[1:])]
    return Exl2Plan(
        groups=torch.tensor(table, dtype=torch.int32, device=device),
        slices=torch.tensor(slices, dtype=torch.int32, device=device),
        perm=torch.argsort(invperm.to(torch.int64)).to(torch.int32),
        max_slice_rows=max(rows for *_, rows in slices),
        threads=THREADS,
        tiles=tiles,
        in_features=in_features,
        out_features=out_features,
    )


def split_k(layout: list[tuple[int, int]], wanted: int) -> list[int]:
    """Cut the groups into about `wanted` runs of roughly equal packed bytes, each at
    most MAX_SLICE_ROWS rows unless one group alone is longer; returns the first
    group of each run, then the group count."""
    total_bits = sum(bits * rows for bits, rows in layout)
    target = total_bits / max(1, min(wanted, len(layout)))
    cuts, bits_in, rows_in = [0], 0, 0
    for g, (bits, rows) in enumerate(layout):
        if rows_in and (bits_in + bits * rows / 2 > target or rows_in + rows > MAX_SLICE_ROWS):
            cuts.append(g)
            bits_in, rows_in = 0, 0
        bits_in += bits * rows
        rows_in += rows
    cuts.append(len(layout))
    return cuts


class _Scratch:
    """fp32 zeros the split-K kernel adds into; the kernel leaves them zeroed again,
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


_scratch = _Scratch()


# Room after the sums for the kernel's per-tile completion counts (tiles <= columns / 4 / THREADS).
COUNT_ROOM = 4096


def reserve_scratch(device: torch.device, rows: int, out_features: int) -> None:
    """Size the scratch before a CUDA graph is captured (capture must not allocate it)."""
    _scratch.get(device, rows * out_features + COUNT_ROOM)


def gemm_small(x: torch.Tensor, tensors: dict[str, torch.Tensor], plan: Exl2Plan,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """fp16 x [M <= SMALL_BATCH, K] @ weight -> fp16 [M, N], straight from the packed weights."""
    partial = _scratch.get(x.device, x.shape[0] * plan.out_features + max(plan.tiles, COUNT_ROOM))
    return kernels().exl2_gemm_small(
        x, plan.perm, tensors["q_weight"], plan.out_features, tensors["q_scale"], tensors["q_scale_max"],
        plan.groups, plan.slices, plan.max_slice_rows, plan.threads, partial, bias)


def dequant(tensors: dict[str, torch.Tensor], plan: Exl2Plan) -> torch.Tensor:
    """fp16 [K, N], rows in act-order (reference.exl2_dequant's twin)."""
    return kernels().exl2_dequant(tensors["q_weight"], plan.out_features, tensors["q_scale"],
                                  tensors["q_scale_max"], plan.groups, plan.in_features)


def matmul(x: torch.Tensor, tensors: dict[str, torch.Tensor], plan: Exl2Plan,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ weight (+ bias) -> [..., N] in x's dtype, on the kernels."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.dtype != torch.float16 or not x2.is_contiguous():
        x2 = x2.to(torch.float16).contiguous()
    bias16 = bias.to(torch.float16) if bias is not None and bias.dtype != torch.float16 else bias
    if x2.shape[0] <= SMALL_BATCH:
        out = gemm_small(x2, tensors, plan, bias16)
    else:
        # The act-order permutation moves the (few) input columns, not the weight rows.
        tile = dequant(tensors, plan)
        out = x2.index_select(1, plan.perm) @ tile
        del tile
        if bias16 is not None:
            out += bias16
    return out.to(x.dtype).reshape(*shape[:-1], plan.out_features)


def matmul_reference(x: torch.Tensor, tensors: dict[str, torch.Tensor], out_features: int,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    return reference.exl2_matmul(x, tensors, out_features, bias)
