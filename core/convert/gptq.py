"""GPTQ on one matrix, producing EXL2 tensors. No I/O, no model code.

Conventions: `weight` is [out_features, in_features] as nn.Linear holds it;
`hessian` is [in_features, in_features], the sum of xᵀx over calibration
inputs x (rows = tokens). Any positive multiple of it (the 2/n of the GPTQ
paper, ExLlamaV2's division by the batch count) gives the same quantization
and the same relative error, so we keep the plain sum.

The method follows ExLlamaV2 0.3.2 (exllamav2/conversion/adaptivegptq.py and
exllamav2_ext/cuda/quantize.cu): inputs sorted by descending Hessian diagonal,
the upper Cholesky factor of the damped inverse Hessian, one group at a time
(its scales chosen from the weights as earlier groups' errors left them), row
by row inside the group, and a single matrix update of all later rows after
each group.
"""

from __future__ import annotations

import functools
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from core.formats.exl2.layout import pack_exl2
from core.kernels.build import kernels
from core.convert.qparams import QuantSetting, group_layout

# Scale search of AdaptiveQuantizer.find_params (adaptivegptq.py): every column's
# scale is a 4-bit square-root fraction of the group's largest, then the whole
# group's scales are stretched by one factor from this grid, chosen to minimise
# the sum of |error|^3.5 (which leans towards the largest errors more than MSE).
SCALE_SEARCH_MIN = 0.70
SCALE_SEARCH_MAX = 1.20
SCALE_SEARCH_STEPS = 96
_COARSE_STEP = 8
_FP16_MAX = 65504.0
_MAX_DAMPING_ATTEMPTS = 24


def accumulate_hessian(hessian: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """Add xᵀx of a batch of inputs (any leading shape, last dim in_features) to `hessian`.

    Starts a float32 [in, in] sum when `hessian` is None; returns the sum (updated in place).
    """
    rows = x.reshape(-1, x.shape[-1]).to(torch.float32)
    if hessian is None:
        hessian = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float32, device=rows.device)
    hessian.addmm_(rows.T, rows)
    return hessian


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(torch.float32)


def _grid_scales(scale_codes: torch.Tensor, scale_max: torch.Tensor) -> torch.Tensor:
    """Scales as the loader decodes them: fp16 (code + 1)^2 * fp16(max / 256) (qdq_util.cuh, ext.py).

    `scale_max` holds fp16 values (as float32) and broadcasts against `scale_codes`."""
    return _fp16((scale_codes.to(torch.float32) + 1) ** 2 * _fp16(scale_max / 256))


def _stretch_grid(device) -> torch.Tensor:
    stretch = torch.linspace(0, 1, SCALE_SEARCH_STEPS + 1, dtype=torch.float64, device=device)
    return (SCALE_SEARCH_MIN * (1 - stretch) + SCALE_SEARCH_MAX * stretch).to(torch.float32)


def _choose_scales(
    blocks: torch.Tensor, maxq: torch.Tensor, stretch: torch.Tensor, coarse: torch.Tensor, offsets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scale codes (0..15) [k, cols], fp16 maximum scales [k] and decoded scales [k, cols]
    for k groups at once: blocks [k, rows, cols], maxq [k, 1] (2^bits - 1 of each group).

    `coarse` indexes the stretch grid; `offsets` are the steps around the best
    coarse point that are searched next (see _COARSE_STEP)."""
    k, _, cols = blocks.shape
    column_max = blocks.abs().amax(dim=1) + 1e-12
    base = column_max / (maxq / 2)
    base_max = base.amax(dim=1, keepdim=True)
    fraction = torch.sqrt(base / base_max) * 16
    codes = (torch.clamp(torch.round(fraction), 1, 16) - 1).to(torch.uint8)

    # |error|^3.5 summed over the group for each stretch of the grid, measured
    # with the scales as the kernels will decode them (fp16 maximum, fp16
    # prescale), so the choice accounts for fp16 rounding of small scales.
    # ExLlamaV2 searches with unrounded scales and rounds afterwards.
    scale_max_grid = torch.clamp(base_max * stretch, max=_FP16_MAX).to(torch.float16)
    decoded = _grid_scales(codes.unsqueeze(1), scale_max_grid.to(torch.float32).unsqueeze(2))
    errors = torch.full(scale_max_grid.shape, math.inf, dtype=torch.float64, device=blocks.device)
    zero = (maxq + 1) / 2
    low, high = (-zero).view(k, 1, 1, 1), (maxq - zero).view(k, 1, 1, 1)

    def measure(chosen: torch.Tensor) -> None:
        scales = decoded.gather(1, chosen.unsqueeze(2).expand(-1, -1, cols))
        errors.scatter_(1, chosen, _stretch_errors(blocks, scales, low, high))

    # Every 8th point, then the neighbourhood of the best: the error is smooth
    # enough in the stretch that this finds the full grid's minimum (checked on
    # random and outlier-heavy groups at every width) at a quarter of the cost.
    # The neighbourhood is indexed on the device, so no value comes back to the
    # host; past the grid's ends it repeats an end point, which changes nothing.
    measure(coarse.expand(k, -1))
    if len(offsets):
        centre = torch.argmin(errors, dim=1, keepdim=True)
        measure(torch.clamp(centre + offsets, 0, len(stretch) - 1))
    best = torch.argmin(errors, dim=1, keepdim=True)
    return codes, scale_max_grid.gather(1, best).squeeze(1), decoded.gather(1, best.unsqueeze(2).expand(-1, -1, cols)).squeeze(1)


def _stretch_errors(blocks: torch.Tensor, scales: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Σ|error|^3.5 [k, n] of blocks [k, rows, cols] rounded with each of n scale rows [k, n, cols]."""
    k, rows, cols = blocks.shape
    n = scales.shape[1]
    sums = torch.empty(k, n, dtype=torch.float64, device=blocks.device)
    # Temporaries of about this many elements: on CPU they stay in cache (half
    # the time of whole-batch ones); on CUDA each op is launch overhead first,
    # so as few and as large as memory comfortably allows.
    chunk = _SEARCH_CHUNK_ELEMENTS_CUDA if blocks.is_cuda else _SEARCH_CHUNK_ELEMENTS
    per_group = max(1, chunk // (rows * cols))
    for first_group in range(0, k, per_group):
        groups = slice(first_group, first_group + per_group)
        target = blocks[groups].unsqueeze(1)
        per_scale = max(1, chunk // target.numel())
        for first in range(0, n, per_scale):
            s = scales[groups, first : first + per_scale].unsqueeze(2)
            safe = torch.where(s > 0, s, torch.ones_like(s))
            steps = torch.div(target, safe).round_()
            # maximum/minimum: clamp_ with tensor bounds is slower on CPU (python3 -m bench.gptq_speed).
            torch.minimum(torch.maximum(steps, low[groups], out=steps), high[groups], out=steps)
            err = steps.mul_(s).sub_(target).abs_()
            # |e|^3.5 as e·e·e·√e: faster than pow on CPU (python3 -m bench.gptq_speed).
            power = err * err
            power.mul_(err).mul_(err.sqrt_())
            # float32 over a group's rows (at most 128 positive terms), float64 over
            # columns: faster than a float64 sum of every element (python3 -m bench.gptq_speed).
            sums[groups, first : first + per_scale] = power.sum(dim=2).sum(dim=2, dtype=torch.float64)
    return sums


def _prepare_hessian(hessian: torch.Tensor) -> torch.Tensor:
    """A float32 copy with dead inputs made harmless.

    An input never seen non-zero in calibration has a zero row and column in
    the Hessian, which breaks the Cholesky factorisation. Give it the mean
    live diagonal: its row is then rounded on its own, passes no error on and
    receives none, and keeps its weights in case the input does fire later
    (ExLlamaV2 leaves zeroing such weights switched off for that reason).
    """
    h = hessian.to(torch.float32).clone()
    if not torch.isfinite(h).all():
        raise ValueError("the Hessian holds NaN or infinite values; check the calibration inputs")
    h = (h + h.T) / 2
    diagonal = torch.diagonal(h)
    dead = diagonal <= 0
    if dead.any():
        live_mean = float(diagonal[~dead].mean()) if (~dead).any() else 1.0
        h[dead, :] = 0
        h[:, dead] = 0
        h[dead, dead] = live_mean if live_mean > 0 else 1.0
    return h


def _inverse_cholesky(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹, raising λ tenfold until H + λI is positive definite."""
    size = hessian.shape[0]
    mean_diagonal = float(torch.diagonal(hessian).mean())
    damping = max(damp * mean_diagonal, 1e-5)
    eye = torch.eye(size, dtype=hessian.dtype, device=hessian.device)
    for attempt in range(_MAX_DAMPING_ATTEMPTS):
        damped = hessian + damping * eye
        factor, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0 and torch.isfinite(upper).all():
                if attempt:
                    warnings.warn(
                        f"Hessian not positive definite; damping raised to {damping:.3g} "
                        f"({damping / max(mean_diagonal, 1e-30):.3g} x mean diagonal)",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                return upper
        damping *= 10
    raise ValueError("Hessian could not be made positive definite by damping")


def quantize_matrix(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    setting: QuantSetting,
    damp: float = 0.01,
    act_order: bool = True,
) -> dict[str, torch.Tensor]:
    """GPTQ-quantize weight [out, in] with `setting`; returns q_weight, q_scale,
    q_scale_max, q_groups and q_invperm (see core.formats.exl2.layout).

    `damp` is the fraction of the mean Hessian diagonal added to the diagonal
    (ExLlamaV2 uses 0.12; raised automatically when H is not positive definite).
    Runs on the Hessian's device; the tensors come back on it.
    """
    return quantize_matrix_multi(weight, hessian, [setting], damp, act_order)[0]


def quantize_matrix_multi(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    settings: list[QuantSetting],
    damp: float = 0.01,
    act_order: bool = True,
    packed: bool = True,
    results_on: torch.device | str | None = None,
) -> list[dict[str, torch.Tensor]] | list[torch.Tensor]:
    """`quantize_matrix` with each of `settings`, in one pass over the input rows.

    With packed=False each setting gives the dequantized weight [out, in] in
    fp16 instead, equal to dequantize_exl2 of its tensors, without packing
    and unpacking them (the measurement pass needs only that, for ~20 settings).
    `results_on` moves each result there as soon as it is made (host memory
    for big matrices, whose ~20 results would crowd the GPU).

    The act-order permutation and the inverse Cholesky factor depend on the
    Hessian alone, and GPTQ's row steps are the same small ops for every
    setting, so all settings walk the rows together: one op per step covers
    them all. Each setting's result is the one it gets alone (the arithmetic
    per setting does not depend on the others; tests/test_gptq.py checks it).
    """
    out_features, in_features = weight.shape
    if hessian.shape != (in_features, in_features):
        raise ValueError(f"Hessian {tuple(hessian.shape)} does not match {in_features} inputs")
    # Settings that cut the rows into the same groups (3 bits for 5% or for 10%
    # of 576 rows is one 64-row group either way) give the same tensors.
    layouts = [tuple(group_layout(setting, in_features)) for setting in settings]
    distinct = list(dict.fromkeys(layouts))
    if not distinct:
        return []
    # The walk holds two float32 copies of the matrix per layout: a 4096x11008
    # matrix with 20 layouts would need 7 GB, so big matrices go a few layouts at a time.
    per_layout = 2 * 4 * in_features * out_features
    batch = max(1, _WALK_BYTES // per_layout)
    stored = {}
    with _torch_threads(_CPU_THREADS if hessian.device.type == "cpu" else None):
        for first in range(0, len(distinct), batch):
            some = distinct[first : first + batch]
            results = _quantize_layouts(weight, hessian, some, damp, act_order, packed)
            if results_on is not None:
                results = [_moved(result, results_on) for result in results]
            stored.update(zip(some, results))
    return [stored[layout] if not packed else dict(stored[layout]) for layout in layouts]


def _moved(result: dict[str, torch.Tensor] | torch.Tensor, device) -> dict[str, torch.Tensor] | torch.Tensor:
    if isinstance(result, dict):
        return {name: tensor.to(device) for name, tensor in result.items()}
    return result.to(device)


def _quantize_layouts(
    weight: torch.Tensor, hessian: torch.Tensor, layouts: list[tuple[tuple[int, int], ...]], damp: float, act_order: bool,
    packed: bool = True,
) -> list[dict[str, torch.Tensor]] | list[torch.Tensor]:
    out_features, in_features = weight.shape
    h = _prepare_hessian(hessian)
    device = h.device
    if act_order:
        perm = torch.argsort(torch.diagonal(hessian).to(torch.float32), descending=True, stable=True)
    else:
        perm = torch.arange(in_features, device=device)
    h = h[perm][:, perm]
    inverse_factor = _inverse_cholesky(h, damp).contiguous()
    plan = _plan_rows(tuple(layouts), in_features, device)

    # Rows = inputs in act-order, then settings, then outputs (the orientation
    # of q_weight): one row step is one contiguous [settings, out] slice, and
    # the update of all later rows after a block is one matrix product.
    count = len(layouts)
    w = weight.to(device=device, dtype=torch.float32).T[perm]
    work = w.unsqueeze(1).repeat(1, count, 1)
    steps = torch.empty_like(work)
    scale_codes = torch.empty(plan.groups, out_features, dtype=torch.uint8, device=device)
    scale_maxes = torch.empty(plan.groups, dtype=torch.float16, device=device)
    slot_scales = None if packed else torch.empty(plan.groups, out_features, dtype=torch.float32, device=device)
    _gptq_rows(work, steps, inverse_factor, plan, scale_codes, scale_maxes, slot_scales)

    invperm = torch.argsort(perm)
    if not packed:
        # Each row's decoded scale is its group's; one fp16 rounding of the
        # product, as the kernels dequantize.
        return [
            (steps[:, index] * slot_scales[_row_slots(layout, slots)]).to(torch.float16)[invperm].T.contiguous()
            for index, (layout, slots) in enumerate(zip(layouts, plan.slots))
        ]
    codes = steps.add_(plan.zero).to(torch.uint8)
    return [
        pack_exl2(codes[:, index], scale_codes[slots], scale_maxes[slots], list(layout), invperm)
        for index, (layout, slots) in enumerate(zip(layouts, plan.slots))
    ]


# Rows per lazy update: a row's error reaches the rest of its block at once,
# the rows beyond in one matrix product per block. Every group of every valid
# setting starts on a multiple of 32 rows, or (16-row 2-bit groups, a last
# group cut at the matrix edge) ends inside the block it starts in, so a
# setting's arithmetic never depends on which other settings run beside it.
_BLOCK_ROWS = 32
# torch threads for GPTQ on CPU (None: leave the count alone). Two threads
# spin-wait for each other between GPTQ's thousands of small ops; on two cores
# shared with other work that made one matrix several times slower than one
# thread (bench/gptq_speed.py --gptq-threads measures it).
_CPU_THREADS: int | None = 1
# Elements of one temporary of the scale search.
_SEARCH_CHUNK_ELEMENTS = 1 << 18
_SEARCH_CHUNK_ELEMENTS_CUDA = 1 << 25
# Working memory of one GPTQ walk over several layouts (see quantize_matrix_multi).
_WALK_BYTES = 2 << 30


@dataclass
class _GroupStarts:
    """Groups of equal rows that start on the same input row, one per setting in `settings`."""

    rows: int
    settings: torch.Tensor  # setting indices
    slots: torch.Tensor  # where their scales go in the stacked scale tensors
    maxq: torch.Tensor  # [k, 1] 2^bits - 1


@dataclass
class _RowPlan:
    blocks: list[tuple[int, int]]
    starts: dict[int, list[_GroupStarts]]
    low: torch.Tensor  # [in, settings, 1] lowest code - zero point of each row's group
    high: torch.Tensor  # [in, settings, 1] highest code - zero point
    zero: torch.Tensor  # [in, settings, 1]
    slots: list[torch.Tensor]  # per setting, its groups' slots in order
    groups: int
    stretch: torch.Tensor
    coarse: torch.Tensor
    offsets: torch.Tensor


@functools.lru_cache(maxsize=64)
def _plan_rows(layouts: tuple[tuple[tuple[int, int], ...], ...], in_features: int, device) -> _RowPlan:
    """Everything the row walk needs, made before it starts so that it creates no host tensors.

    Kept per layouts and width: every layer's matrices of one shape take the same
    candidate list, and on a GPU making the plan's small tensors costs more than
    the walk of a small matrix. The walk only reads it."""
    bits = torch.empty(in_features, len(layouts), dtype=torch.float32)
    by_start: dict[int, dict[tuple[int, int], list[tuple[int, int]]]] = {}
    slots, slot = [], 0
    boundaries = set(range(0, in_features, _BLOCK_ROWS))
    for index, layout in enumerate(layouts):
        row, own = 0, []
        for width, rows in layout:
            bits[row : row + rows, index] = width
            by_start.setdefault(row, {}).setdefault((rows, width), []).append((index, slot))
            block_end = (row // _BLOCK_ROWS + 1) * _BLOCK_ROWS
            if row % _BLOCK_ROWS and row + rows > block_end:
                boundaries.add(row)  # unreachable with valid settings; kept correct anyway
            own.append(slot)
            row, slot = row + rows, slot + 1
        slots.append(torch.tensor(own, device=device))
    edges = sorted(boundaries) + [in_features]
    starts = {}
    for row, kinds in by_start.items():
        merged: dict[int, list[tuple[int, int, int]]] = {}
        for (rows, width), members in kinds.items():
            merged.setdefault(rows, []).extend((index, slot, width) for index, slot in members)
        starts[row] = [
            _GroupStarts(
                rows,
                torch.tensor([m[0] for m in members], device=device),
                torch.tensor([m[1] for m in members], device=device),
                torch.tensor([[float((1 << m[2]) - 1)] for m in members], device=device),
            )
            for rows, members in merged.items()
        ]
    maxq = (2**bits - 1).unsqueeze(2)
    zero = (maxq + 1) / 2
    step = _COARSE_STEP
    grid = SCALE_SEARCH_STEPS + 1
    return _RowPlan(
        blocks=list(zip(edges[:-1], edges[1:])),
        starts=starts,
        low=(-zero).to(device),
        high=(maxq - zero).to(device),
        zero=zero.to(device),
        slots=slots,
        groups=slot,
        stretch=_stretch_grid(device),
        coarse=torch.arange(0, grid, step, device=device).unsqueeze(0),
        offsets=torch.tensor([o for o in range(1 - step, step) if o], dtype=torch.int64, device=device),
    )


def _row_slots(layout: tuple[tuple[int, int], ...], slots: torch.Tensor) -> torch.Tensor:
    """The scale slot of every (act-ordered) input row of one setting."""
    rows = torch.tensor([rows for _, rows in layout], device=slots.device)
    return torch.repeat_interleave(slots, rows)


def _gptq_rows(
    work: torch.Tensor,
    steps: torch.Tensor,
    inverse_factor: torch.Tensor,
    plan: _RowPlan,
    scale_codes: torch.Tensor,
    scale_maxes: torch.Tensor,
    slot_scales: torch.Tensor | None = None,
) -> None:
    """Quantize work [in, settings, out] row by row in place; codes minus zero point go to `steps`."""
    in_features, count, out_features = work.shape
    flat = work.view(in_features, count * out_features)
    scales = torch.zeros(count, out_features, dtype=torch.float32, device=work.device)
    # Dividing by inf where a scale is zero rounds those weights to code zero
    # (as a zero scale must) without a branch in the row step.
    safe = torch.zeros_like(scales)
    errors = torch.empty(_BLOCK_ROWS, count, out_features, dtype=torch.float32, device=work.device)
    kernel = kernels() if work.is_cuda else None
    for first, end in plan.blocks:
        # A walk runs from one group start to the next: new scales need the
        # rows as the walk so far left them.
        segment = first
        for i in range(first, end):
            if i not in plan.starts:
                continue
            if i > segment:
                _walk(kernel, work, steps, errors, inverse_factor, plan, scales, safe, first, end, segment, i)
            for group in plan.starts[i]:
                if kernel is not None:
                    kernel.gptq_scale_search(work, i, group.rows, group.settings, group.slots, group.maxq,
                                             plan.stretch, scale_codes, scale_maxes, scales, safe, slot_scales)
                    continue
                blocks = work[i : i + group.rows].index_select(1, group.settings).transpose(0, 1)
                codes, scale_max, decoded = _choose_scales(blocks, group.maxq, plan.stretch, plan.coarse, plan.offsets)
                scale_codes.index_copy_(0, group.slots, codes)
                scale_maxes.index_copy_(0, group.slots, scale_max)
                scales.index_copy_(0, group.settings, decoded)
                if slot_scales is not None:
                    slot_scales.index_copy_(0, group.slots, decoded)
                safe.index_copy_(0, group.settings, torch.where(decoded > 0, decoded, math.inf))
            segment = i
        _walk(kernel, work, steps, errors, inverse_factor, plan, scales, safe, first, end, segment, end)
        if end < in_features:
            rows = end - first
            flat[end:].addmm_(inverse_factor[first:end, end:].T, errors[:rows].view(rows, -1), alpha=-1)


def _walk(kernel, work, steps, errors, inverse_factor, plan, scales, safe, first, end, start, stop) -> None:
    """Quantize rows [start, stop) of the block [first, end), each row's error
    reaching the rest of the block; errors[i - first] keeps row i's error."""
    if kernel is not None:
        kernel.gptq_block(work, steps, errors, inverse_factor, scales, safe, plan.low, plan.high, first, end, start, stop)
        return
    # The torch reference of core/kernels/gptq.cu: the same arithmetic, one row at a time.
    flat = work.view(work.shape[0], -1)
    for i in range(start, stop):
        row, step, error = work[i], steps[i], errors[i - first]
        torch.div(row, safe, out=step).round_()
        torch.minimum(torch.maximum(step, plan.low[i], out=step), plan.high[i], out=step)
        torch.sub(row, _fp16(step * scales), out=error).div_(inverse_factor[i, i])
        if i + 1 < end:
            flat[i + 1 : end].addr_(inverse_factor[i, i + 1 : end], error.view(-1), alpha=-1)


@contextmanager
def _torch_threads(threads: int | None):
    """Run with `threads` torch threads (None: unchanged), restoring the count after."""
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Round-to-nearest baseline: the dequantized weight [out, in], float32.

    Symmetric, one fp16 scale per output row and group of `group_size` inputs,
    on the same grid as EXL2 (codes -2^(bits-1) .. 2^(bits-1)-1, the largest
    magnitude mapped to (2^bits - 1) / 2), so only the method differs.
    """
    out_features, in_features = weight.shape
    w = weight.to(torch.float32)
    groups = math.ceil(in_features / group_size)
    padded = torch.zeros(out_features, groups * group_size, device=weight.device)
    padded[:, :in_features] = w
    padded = padded.view(out_features, groups, group_size)
    maxq = (1 << bits) - 1
    zero = 1 << (bits - 1)
    scales = _fp16(torch.clamp(padded.abs().amax(dim=-1, keepdim=True) / (maxq / 2), max=_FP16_MAX))
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.clamp(torch.round(padded / safe), -zero, maxq - zero)
    return (q * scales).view(out_features, -1)[:, :in_features]


def relative_error(w_ref: torch.Tensor, w_q: torch.Tensor, hessian: torch.Tensor) -> float:
    """‖(W − Q)X‖ / ‖WX‖ over the calibration inputs, from the Hessian alone.

    Both weights [out, in]. With H = Σ xᵀx, ‖(W − Q)X‖² = tr((W − Q) H (W − Q)ᵀ).
    """
    h = hessian.to(torch.float32)
    w = w_ref.to(torch.float32)
    diff = w - w_q.to(torch.float32)
    error = ((diff @ h) * diff).sum(dtype=torch.float64)
    signal = ((w @ h) * w).sum(dtype=torch.float64)
    if signal <= 0:
        return 0.0 if error <= 0 else math.inf
    return math.sqrt(max(float(error), 0.0) / float(signal))
