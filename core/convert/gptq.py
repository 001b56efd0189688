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

import math
import warnings

import torch

from core.exl2_format import pack_exl2
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


def _choose_scales(block: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scale codes (0..15) per column, the group's fp16 maximum scale and the decoded scales."""
    maxq = (1 << bits) - 1
    zero = 1 << (bits - 1)
    column_max = block.abs().amax(dim=0) + 1e-12
    base = column_max / (maxq / 2)
    base_max = base.max()
    fraction = torch.sqrt(base / base_max) * 16
    code_plus_one = torch.clamp(torch.round(fraction), 1, 16)
    codes = (code_plus_one - 1).to(torch.uint8)

    # |error|^3.5 summed over the group for each stretch of the grid, measured
    # with the scales as the kernels will decode them (fp16 maximum, fp16
    # prescale), so the choice accounts for fp16 rounding of small scales.
    # ExLlamaV2 searches with unrounded scales and rounds afterwards.
    stretch = torch.linspace(0, 1, SCALE_SEARCH_STEPS + 1, dtype=torch.float64, device=block.device)
    stretch = (SCALE_SEARCH_MIN * (1 - stretch) + SCALE_SEARCH_MAX * stretch).to(torch.float32)
    scale_max_grid = torch.clamp(base_max * stretch, max=_FP16_MAX).to(torch.float16)
    decoded = _grid_scales(codes.unsqueeze(0), scale_max_grid.to(torch.float32).unsqueeze(1))
    errors = torch.full((len(stretch),), math.inf, dtype=torch.float64, device=block.device)

    def measure(indices: list[int]) -> None:
        for start in range(0, len(indices), 8):
            chosen = torch.tensor(indices[start : start + 8], device=block.device)
            scales = decoded[chosen].unsqueeze(1)
            safe = torch.where(scales > 0, scales, torch.ones_like(scales))
            steps = torch.clamp(torch.round(block / safe), -zero, maxq - zero)
            err = (steps * scales).sub_(block).abs_()
            # |e|^3.5 as e·e·e·√e: several times faster than pow on CPU.
            errors[chosen] = (err * err * err * err.sqrt()).sum(dim=(1, 2), dtype=torch.float64)

    # Every 8th point, then the neighbourhood of the best: the error is smooth
    # enough in the stretch that this finds the full grid's minimum (checked on
    # random and outlier-heavy groups at every width) at a quarter of the cost.
    coarse = list(range(0, len(stretch), _COARSE_STEP))
    measure(coarse)
    centre = int(torch.argmin(errors))
    measure([i for i in range(centre - _COARSE_STEP + 1, centre + _COARSE_STEP) if 0 <= i < len(stretch) and i not in coarse])
    best = int(torch.argmin(errors))
    return codes, scale_max_grid[best], decoded[best]


def _quantize_rows(rows: torch.Tensor, scales: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and their fp16-rounded dequantized values (what the kernel reconstructs)."""
    maxq = (1 << bits) - 1
    zero = 1 << (bits - 1)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    steps = torch.where(scales > 0, torch.round(rows / safe), torch.zeros_like(rows))
    codes = torch.clamp(steps + zero, 0, maxq)
    return codes, _fp16((codes - zero) * scales)


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
    q_scale_max, q_groups and q_invperm (see core.exl2_format).

    `damp` is the fraction of the mean Hessian diagonal added to the diagonal
    (ExLlamaV2 uses 0.12; raised automatically when H is not positive definite).
    Runs on the Hessian's device; the tensors come back on it.
    """
    out_features, in_features = weight.shape
    if hessian.shape != (in_features, in_features):
        raise ValueError(f"Hessian {tuple(hessian.shape)} does not match {in_features} inputs")
    h = _prepare_hessian(hessian)
    if act_order:
        perm = torch.argsort(torch.diagonal(hessian).to(torch.float32), descending=True, stable=True)
    else:
        perm = torch.arange(in_features, device=h.device)
    h = h[perm][:, perm]
    inverse_factor = _inverse_cholesky(h, damp)

    # Rows = inputs in act-order, columns = outputs: the orientation of q_weight.
    w = weight.to(device=h.device, dtype=torch.float32).T[perm].contiguous()
    codes = torch.empty(in_features, out_features, dtype=torch.uint8, device=h.device)
    layout = group_layout(setting, in_features)
    scale_codes, scale_maxes = [], []
    start = 0
    for bits, rows in layout:
        end = start + rows
        block = w[start:end]
        group_codes, scale_max, scales = _choose_scales(block, bits)
        scale_codes.append(group_codes)
        scale_maxes.append(scale_max)
        errors = torch.empty_like(block)
        u = inverse_factor[start:end, start:end]
        for i in range(rows):
            q, dequantized = _quantize_rows(block[i], scales, bits)
            codes[start + i] = q.to(torch.uint8)
            errors[i] = (block[i] - dequantized) / u[i, i]
            if i + 1 < rows:
                block[i + 1 :].sub_(torch.outer(u[i, i + 1 :], errors[i]))
        if end < in_features:
            w[end:].sub_(inverse_factor[start:end, end:].T @ errors)
        start = end

    return pack_exl2(codes, torch.stack(scale_codes), torch.stack(scale_maxes), layout, torch.argsort(perm))


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
