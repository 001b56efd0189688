"""EXL2 products on the GPU (core/kernels/exl2.cu): the per-layer tables the
kernels read, and the entry that picks a kernel by the number of input rows.

Up to dispatch.SMALL_BATCH rows the small-batch kernel reads the packed weights directly
(decode is bound by the bytes of the weights, and packed bytes are few); above
that the layer is dequantized to an fp16 tile in act-order and multiplied by
cuBLAS, which is bound by arithmetic where dequantizing once costs little. The
tile is freed after the product: keeping it would undo the point of quantizing.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ...kernels.build import kernels
from ...kernels.dispatch import SplitKScratch, fp16_bias, fp16_rows, multiprocessor_count, product
from ...kernels.handoff import OutputRoute, StagedInput
from ...kernels.reference import NO_SLOT_INPUT
from .layout import group_rows

WARPS = 8  # per block of the small-batch kernel (at most 8); each warp takes 32 columns of a few quads
# Quads a warp takes in a launch (the kernel's limit is 4): a warp's fixed cost (its first words,
# staging its inputs, the block's sum) is about two quads' decoding, so few warps of 4 quads beat
# many of 1-2 (python3 -m bench.speed --sweep times each block shape).
QUADS_PER_WARP = 4
# Blocks per multiprocessor the K split aims for at least, so every SM has some to switch between.
BLOCKS_PER_SM = 2
# Each warp stages its quads' inputs (fp16, one row per batch row); a block's stay within this.
STAGED_BYTES = 64 * 1024
UNIT_ROWS = 32
QUAD_SLOTS = 128
NO_INPUT = NO_SLOT_INPUT  # a slot with no input stages a zero
# Layers one launch of the small-batch kernel takes (core/kernels/exl2.cu, MOST_MATRICES): q, k and v.
GROUP_MOST = 3

@dataclass(frozen=True)
class Exl2Plan:
    """What the kernels need besides the stored tensors, made once per layer."""

    groups: torch.Tensor  # int32 [G, 4]: bits, first packed row, first act-order row, rows (dequantizer)
    units: torch.Tensor  # int32 [quads * 4, 4]: bits, first packed row (-1: padding), group, quad in one group
    xperm: torch.Tensor  # int16 [quads * 128]: input index staged in each slot (as uint16; 0xFFFF: zero)
    slot_source: torch.Tensor  # int32 [quads * 128]: the same, with in_features (a zero column) for no input
    perm: torch.Tensor  # int32 [K]: input index of each act-order row
    quads: int
    column_tiles: int  # of 32 columns
    multiprocessors: int
    in_features: int
    out_features: int


def pair_codes(bits: int) -> tuple[list[int], list[int]]:
    """The kernel's pair rule (exl2.cu, pair_low/pair_high): pair j of a 32-row unit
    joins codes p and p + d, the distance at which both fit one 32-bit window."""
    distance = 8 if bits == 2 else 2 if bits in (6, 8) else 4
    low = [2 * distance * (j // distance) + j % distance for j in range(16)]
    return low, [p + distance for p in low]


@functools.lru_cache(maxsize=None)
def _unit_slots(bits: int) -> tuple[np.ndarray, np.ndarray]:
    """For one unit of a quad: each of its 32 codes' slot offset (before adding 8 * its place t
    in the quad) in the quad's 128 staged inputs, which is where thread (g, t) reads the
    inputs of k steps 2s and 2s+1: slots 32s + 8t .. +7, pairs 4s..4s+3, low code first."""
    low, high = pair_codes(bits)
    codes, offsets = [], []
    for j in range(16):
        for which, code in enumerate((low[j], high[j])):
            codes.append(code)
            offsets.append((j // 4) * 32 + (j % 4) * 2 + which)
    return np.array(codes), np.array(offsets)


def plan_layer(tensors: dict[str, torch.Tensor], out_features: int, multiprocessors: int | None = None) -> Exl2Plan:
    q_weight, invperm = tensors["q_weight"], tensors["q_invperm"]
    device = q_weight.device
    in_features = invperm.shape[0]
    if in_features >= NO_INPUT:
        raise ValueError(f"the small-batch kernel indexes inputs in 16 bits; {in_features} inputs are too many")
    layout = group_rows(tensors["q_groups"].cpu(), q_weight.shape[0], in_features)
    starts = tensors["q_groups"].cpu().view(-1, 2)[:, 1].tolist()
    table, row = [], 0
    for (bits, rows), start in zip(layout, starts):
        table.append((bits, start, row, rows))
        row += rows
    # Units of 32 rows of one group; a quad is four units of one width, padded where a width ends.
    units = []  # bits, first packed row, group, first act-order row, rows
    for g, (bits, start, first_row, rows) in enumerate(table):
        for u in range(-(-rows // UNIT_ROWS)):
            if units and units[-1][0] != bits:
                units += [(units[-1][0], -1, units[-1][2], 0, 0)] * (-len(units) % 4)
            units.append((bits, start + u * bits, g, first_row + u * UNIT_ROWS, min(UNIT_ROWS, rows - u * UNIT_ROWS)))
    units += [(units[-1][0], -1, units[-1][2], 0, 0)] * (-len(units) % 4)
    perm = torch.argsort(invperm.to(torch.int64))
    perm_cpu = perm.cpu().numpy()
    unit_array = np.array(units, dtype=np.int64)
    xperm = np.full(len(units) * UNIT_ROWS, NO_INPUT, dtype=np.int64)
    for bits in set(unit_array[:, 0].tolist()):
        index = np.nonzero(unit_array[:, 0] == bits)[0]
        codes, offsets = _unit_slots(bits)
        slot = (index // 4 * QUAD_SLOTS + index % 4 * 8)[:, None] + offsets[None, :]
        rows = unit_array[index, 3:4] + codes[None, :]
        real = codes[None, :] < unit_array[index, 4:5]
        xperm[slot[real]] = perm_cpu[rows[real]]
    slot_source = np.where(xperm == NO_INPUT, in_features, xperm)
    xperm = np.where(xperm >= 1 << 15, xperm - (1 << 16), xperm)  # uint16 stored as int16
    unit_table = np.zeros((len(units), 4), dtype=np.int32)
    unit_table[:, :3] = unit_array[:, :3]
    # A quad whose four units share one group takes its scales after the mma (exl2.cu, quad_product).
    quad_groups = unit_array[:, 2].reshape(-1, 4)
    unit_table[:, 3] = np.repeat((quad_groups == quad_groups[:, :1]).all(axis=1), 4)
    if multiprocessors is None:
        multiprocessors = multiprocessor_count(device)
    return Exl2Plan(
        groups=torch.tensor(table, dtype=torch.int32, device=device),
        units=torch.from_numpy(unit_table).to(device),
        xperm=torch.from_numpy(xperm.astype(np.int16)).to(device),
        slot_source=torch.from_numpy(slot_source.astype(np.int32)).to(device),
        perm=perm.to(torch.int32),
        quads=len(units) // 4,
        column_tiles=q_weight.shape[1] // 32,
        multiprocessors=multiprocessors,
        in_features=in_features,
        out_features=out_features,
    )


@functools.lru_cache(maxsize=4096)
def launch_shape(quads: int, column_tiles: int, multiprocessors: int, rows: int,
                 blocks_per_sm: int, warps: int, quads_per_warp: int = 4) -> tuple[int, int, int]:
    """(K slices, quads per slice, warps per block) for `rows` input rows: at most
    `quads_per_warp` quads a warp, enough blocks for every SM, a block's staged inputs
    within STAGED_BYTES (at least one warp)."""
    per_warp = max(1, min(quads_per_warp, 4))
    warps = max(1, min(warps, STAGED_BYTES // (2 * rows * (per_warp * QUAD_SLOTS + 32)), quads))
    slices = max(-(-quads // (warps * per_warp)), min(-(-quads // warps), -(-blocks_per_sm * multiprocessors // column_tiles)))
    per_slice = -(-quads // slices)
    return -(-quads // per_slice), per_slice, min(warps, per_slice)


_scratch = SplitKScratch()


# Room after the sums for the kernel's per-tile completion counts (tiles = columns / 32).
COUNT_ROOM = 8192


def reserve_scratch(device: torch.device, rows: int, out_features: int) -> None:
    """Size the scratch before a CUDA graph is captured (capture must not allocate it)."""
    _scratch.get(device, rows * out_features + COUNT_ROOM)


def gemm_group(x: torch.Tensor, layers: Sequence[tuple[dict[str, torch.Tensor], Exl2Plan, torch.Tensor | None]],
               x_slots: Sequence[torch.Tensor] = (), staged: StagedInput | None = None,
               routes: Sequence[OutputRoute | None] = ()) -> list[torch.Tensor]:
    """fp16 x [M <= dispatch.SMALL_BATCH, K] @ each layer's weight (+ its fp16 bias) -> fp16 [M, N_i],
    straight from the packed weights, up to GROUP_MOST layers (tensors, plan, bias) in one launch.

    The kernel reads its input in each layer's slot order (x_slots[i] [M, quads_i * 128], as
    core.kernels.reference.slot_gather writes it). The graph decoder's norms, SwiGLU and attention write it so;
    without x_slots it is gathered here from x (a few torch launches, for calls outside the graph).
    x's rows alone are read then. `staged` finishes a norm or SwiGLU on the inputs, and routes[i]
    (where given) sends layer i's output elsewhere (core/kernels/handoff.py): its entry is then the residual it
    was added into, or a tensor of no columns."""
    rows = x.shape[0]
    if not x_slots:
        padded = torch.nn.functional.pad(x, (0, 1))  # the zero column slots without an input read
        x_slots = [padded.index_select(1, plan.slot_source) for _, plan, _ in layers]
    tiles = sum(plan.column_tiles for _, plan, _ in layers)
    # The split of K counts the blocks of the whole launch: three 4096-column layers fill an H100 unsplit.
    shapes = [launch_shape(plan.quads, tiles, plan.multiprocessors, rows, BLOCKS_PER_SM, WARPS, QUADS_PER_WARP)
              for _, plan, _ in layers]
    split_sums = sum(rows * plan.out_features for (_, plan, _), shape in zip(layers, shapes) if shape[0] > 1)
    partial = _scratch.get(x.device, split_sums + max(tiles, COUNT_ROOM))
    no_bias = x.new_empty(0)
    staged = staged or StagedInput()
    routes = [route or OutputRoute() for route in routes]
    nothing = partial.new_empty(0)
    return kernels().exl2_gemm_small(
        list(x_slots), [plan.units for _, plan, _ in layers],
        [tensors["q_weight"] for tensors, _, _ in layers], [plan.out_features for _, plan, _ in layers],
        [tensors["q_scale"] for tensors, _, _ in layers], [tensors["q_scale_max"] for tensors, _, _ in layers],
        [shape[0] for shape in shapes], [shape[1] for shape in shapes], max(shape[2] for shape in shapes), partial,
        [bias if bias is not None else no_bias for _, _, bias in layers],
        up_slots=list(staged.up or ()), weight_slots=list(staged.norm_weight or ()), squares=staged.squares,
        eps=staged.eps, hidden=staged.hidden,
        residual=[route.residual if route.residual is not None else no_bias for route in routes],
        routes=[len(route.slot_of) for route in routes],
        slot_of=[t for route in routes for t in route.slot_of], slots_out=[t for route in routes for t in route.slots_out],
        squares_out=[route.squares if route.squares is not None else nothing for route in routes])


def gemm_small(x: torch.Tensor, tensors: dict[str, torch.Tensor], plan: Exl2Plan,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """fp16 x [M <= dispatch.SMALL_BATCH, K] @ weight -> fp16 [M, N], straight from the packed weights."""
    return gemm_group(x, [(tensors, plan, bias)])[0]


def dequant(tensors: dict[str, torch.Tensor], plan: Exl2Plan, input_order: bool = False) -> torch.Tensor:
    """fp16 [K, N], rows in act-order (reference.dequant's twin), or in input order
    (reference.dequantize_exl2's twin), which a product can take without permuting its input."""
    row_of = plan.perm if input_order else plan.perm.new_empty(0)
    return kernels().exl2_dequant(tensors["q_weight"], plan.out_features, tensors["q_scale"],
                                  tensors["q_scale_max"], plan.groups, plan.in_features, row_of)


def matmul(x: torch.Tensor, tensors: dict[str, torch.Tensor], plan: Exl2Plan,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ weight (+ bias) -> [..., N] in x's dtype, on the kernels."""
    # The tile is written in input order: permuting the rows while writing them is free, and
    # a permuted copy of a long prompt's inputs for every layer is not.
    return product(x, bias, plan.out_features, lambda x16, bias16: gemm_small(x16, tensors, plan, bias16),
                   lambda: dequant(tensors, plan, input_order=True), None)


def matmul_group(x: torch.Tensor, layers: Sequence[tuple[dict[str, torch.Tensor], Exl2Plan, torch.Tensor | None]]
                 ) -> list[torch.Tensor]:
    """x [..., K] (at most dispatch.SMALL_BATCH rows) through up to GROUP_MOST layers in one launch,
    each -> [..., N_i] in x's dtype."""
    outs = gemm_group(fp16_rows(x), [(tensors, plan, fp16_bias(bias)) for tensors, plan, bias in layers])
    return [out.to(x.dtype).reshape(*x.shape[:-1], plan.out_features) for out, (_, plan, _) in zip(outs, layers)]


def matmul_slots(x_slots: Sequence[torch.Tensor] | None,
                 layers: Sequence[tuple[dict[str, torch.Tensor], Exl2Plan, torch.Tensor | None]],
                 staged: StagedInput | None = None, routes: Sequence[OutputRoute | None] = (),
                 x: torch.Tensor | None = None) -> list[torch.Tensor]:
    """matmul_group of an input a producer wrote in each layer's slot order (x_slots[i] fp16 [M, quads_i * 128]),
    or of fp16 rows x [M, K] where x_slots is None: fp16 [M, N_i] each, finished and routed as gemm_group says."""
    layers = [(tensors, plan, fp16_bias(bias)) for tensors, plan, bias in layers]
    if x_slots is None:
        return gemm_group(x, layers, (), staged, routes)
    return gemm_group(x_slots[0], layers, x_slots, staged, routes)

