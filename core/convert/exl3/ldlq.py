"""EXL3 quantization of one linear layer: rotations, scales, LDLQ over trellis tiles. No I/O.

Conventions: `weight` is [out_features, in_features] as nn.Linear holds it; `hessian` is
[in_features, in_features], any positive multiple of the sum of xᵀx over calibration
inputs (the damping and the reported error are relative, so the scale does not matter).
Inside, W = weightᵀ is k x n = (in, out) and y = x·W, as EXL3 stores it; both sides are
zero-padded to multiples of 128 (../shared/EXL3.md section 1).

The recipe follows ExLlamaV3 1.6.5 as ../shared/EXL3.md sections 4 and 5 describe it:
    W = diag(su) · H_k · W_r · H_n · diag(sv)
with H_k, H_n block Hadamard rotations (128-blocks), sv = random sign x output-channel
RMS (mean 1), su = random sign x input-row RMS / (-codebook std) / g, g a global scale
searched on sample tiles, and W_r coded by LDLQ: 16-row strips from the bottom up, each
strip's target corrected by the block-LDL factor of the rotated Hessian times the errors
already made below it, then cut into 16x16 tiles for the trellis search. Finally the row
and column factors are refit with the codes fixed and folded into su and sv.

Two choices of ours, where the sheet leaves room:
- The row scale divides by the codebook's own std (1.2437 for 3INST, which is ExLlamaV3's
  constant -1.24371088, and 1.0003 for MUL1) so that g = 1 means "rows at the codebook's
  spread" for every codebook; the global scale search absorbs any constant anyway.
- LDLQ uses the Hessian of W_r itself, H_k·diag(su)·H·diag(su)·H_k (magnitudes included,
  not only the sign flips), which is the matrix the proxy loss tr(Eᵀ H E) has in the
  rotated basis.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.convert.exl3.trellis import decode_states, search_tiles
from core.formats.exl3.codebook import CODEBOOKS, codebook_values
from core.formats.exl3.hadamard import block_hadamard, hadamard_128
from core.formats.exl3.layout import (HALF_BITS, PAD, SUPPORTED_BITS, TILE, matrix_to_tiles, pack_trellis, tiles_to_matrix,
                                       unpack_trellis)

SIGMA_REG = 0.025  # damping: this times the mean Hessian diagonal is added to the diagonal
_LDL_RETRIES = 10  # each failed factorization adds 2 * SIGMA_REG * mean(diag) more
_MIN_HESSIAN_DIAGONAL = 1e-20  # below this mean, the Hessian carries no data: no feedback
_REFIT_ROUNDS = 2

# Global scale search (EXL3.md section 5): a coarse grid on every third sample tile, then
# five points around the best, then the vertex of a parabola through them. The samples
# are first stretched by how much LDLQ's feedback tends to widen a strip at low bit rates.
_COARSE_SCALES = tuple(0.1 + 0.2 * i for i in range(10))
_FINE_STEP = 0.075
_DRIFT = {1: 1.08, 1.5: 1.035, 2: 1.018, 2.5: 1.009, 3: 1.004}
_DIAGONAL_WIDTH = 3
# On a small matrix the diagonal would be a large share of the tiles (and the search would
# cost more than the quantization): keep at most this fraction of the tiles, or this many.
_SAMPLE_FRACTION = 8
_MIN_SAMPLES = 8


@dataclass
class Exl3Quantized:
    """One EXL3 linear as it is stored: padded shapes, W = diag(suh)·H·W_r·H·diag(svh)."""

    trellis: torch.Tensor  # int16 [k/16, n/16, 16 * bits]
    suh: torch.Tensor  # fp16 [k]
    svh: torch.Tensor  # fp16 [n]
    codebook: str
    bits: float
    proxy_error: float  # tr(E H Eᵀ) / tr(W H Wᵀ) of the stored result (H = identity without a Hessian)


def _padded(size: int) -> int:
    return -(-size // PAD) * PAD


def _check_settings(bits: float, codebook: str) -> None:
    if codebook not in CODEBOOKS:
        raise ValueError(f"unknown EXL3 codebook {codebook!r}; known: {', '.join(CODEBOOKS)}")
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"EXL3 codes {', '.join(f'{b:g}' for b in SUPPORTED_BITS)} bits per weight, not {bits:g}")
    if bits in HALF_BITS and codebook != "mul1":
        raise ValueError(f"EXL3 codes {bits:g} bits per weight only with the mul1 codebook, not {codebook}")


def _safe_divide(x: torch.Tensor, divisor: torch.Tensor) -> torch.Tensor:
    """x / divisor, and 0 where the divisor is 0 (dead rows and columns, padding)."""
    return torch.where(divisor != 0, x / torch.where(divisor != 0, divisor, torch.ones_like(divisor)), torch.zeros_like(x))


def _random_signs(size: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    draws = torch.randn(size, generator=generator)  # on the CPU: the same signs on every device
    return torch.where(draws < 0, -1.0, 1.0).to(device)


def _rotate_hessian(h: torch.Tensor) -> torch.Tensor:
    """H_k · h · H_k in float64 (block_hadamard works in float32)."""
    k = h.shape[0]
    h128 = hadamard_128().to(device=h.device, dtype=torch.float64)
    left = (h128 @ h.reshape(k // PAD, PAD, k)).reshape(k, k)
    return (h128 @ left.T.reshape(k // PAD, PAD, k)).reshape(k, k).T


def _block_ldl(h: torch.Tensor) -> torch.Tensor | None:
    """L - I of h = L·D·Lᵀ with unit 16x16 diagonal blocks (strictly block-lower), or None if h is not
    positive definite."""
    chol, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        return None
    k = h.shape[0]
    blocks = k // TILE
    diagonal = chol.reshape(blocks, TILE, blocks, TILE).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    inverse = torch.linalg.inv(diagonal)
    unit = torch.einsum("rbi,bij->rbj", chol.reshape(k, blocks, TILE), inverse).reshape(k, k)
    unit.view(blocks, TILE, blocks, TILE).diagonal(dim1=0, dim2=2).zero_()
    return unit


def _factor_hessian(hessian: torch.Tensor, row_scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The damped Hessian (float32, original basis) and the LDL feedback factor (float32) of the
    rotated, row-scaled one; retried with more damping where it is not positive definite."""
    damped = hessian.to(torch.float64, copy=True)
    mean_diagonal = damped.diagonal().mean()
    damped.diagonal().add_(SIGMA_REG * mean_diagonal)
    for _ in range(_LDL_RETRIES + 1):
        rotated = _rotate_hessian(row_scales[:, None] * damped * row_scales[None, :])
        factor = _block_ldl(rotated)
        del rotated
        if factor is not None:
            return damped.to(torch.float32), factor.to(torch.float32)
        damped.diagonal().add_(2 * SIGMA_REG * mean_diagonal)
    raise ValueError("the Hessian is not positive definite even after damping; the calibration data may hold NaN or inf")


def _sample_tiles(tiles: torch.Tensor) -> torch.Tensor:
    """[samples, 256]: a wrapped diagonal band of tiles plus the largest- and smallest-RMS tiles."""
    tiles_k, tiles_n = tiles.shape[:2]
    flat = tiles.reshape(tiles_k * tiles_n, -1)
    chosen = []
    for i in range(max(tiles_k, tiles_n)):
        for width in range(_DIAGONAL_WIDTH):
            chosen.append((i % tiles_k) * tiles_n + (i + width) % tiles_n)
    rms = flat.pow(2).mean(dim=1)
    chosen += [int(rms.argmax()), int(rms.argmin())]
    unique = sorted(set(chosen))
    limit = max(_MIN_SAMPLES, flat.shape[0] // _SAMPLE_FRACTION)
    if len(unique) > limit:
        unique = [unique[round(i * (len(unique) - 1) / (limit - 1))] for i in range(limit)]
    return flat[torch.tensor(unique, device=tiles.device)]


def _scale_errors(samples: torch.Tensor, scales: list[float], bits: float, codebook: str) -> list[float]:
    """MSE(quant(g·t)/g, t) over the samples for each g (one trellis search for all of them)."""
    batch = torch.cat([samples * g for g in scales])
    decoded = decode_states(search_tiles(batch, bits, codebook), codebook).to(torch.float32)
    errors = []
    for i, g in enumerate(scales):
        part = decoded[i * samples.shape[0]:(i + 1) * samples.shape[0]]
        errors.append(float(((part / g - samples) ** 2).mean()))
    return errors


def _global_scale(tiles: torch.Tensor, bits: float, codebook: str) -> float:
    samples = _sample_tiles(tiles) * _DRIFT.get(bits, 1.0)
    coarse = _scale_errors(samples[::3], list(_COARSE_SCALES), bits, codebook)
    centre = _COARSE_SCALES[min(range(len(coarse)), key=coarse.__getitem__)]
    fine_scales = [centre + _FINE_STEP * i for i in (-2, -1, 0, 1, 2) if centre + _FINE_STEP * i > 0.01]
    fine = _scale_errors(samples, fine_scales, bits, codebook)
    best = min(range(len(fine)), key=fine.__getitem__)
    # Least-squares parabola through the fine points; its vertex if it opens upwards inside them.
    g = torch.tensor(fine_scales, dtype=torch.float64)
    a, b, _ = torch.linalg.lstsq(torch.stack((g * g, g, torch.ones_like(g)), dim=1),
                                 torch.tensor(fine, dtype=torch.float64).unsqueeze(1)).solution.squeeze(1).tolist()
    if a > 0 and fine_scales[0] <= -b / (2 * a) <= fine_scales[-1]:
        return -b / (2 * a)
    return fine_scales[best]


def _ldlq(target: torch.Tensor, factor: torch.Tensor | None, bits: float, codebook: str) -> torch.Tensor:
    """States [k/16, n/16, 256] of W_r, 16-row strips from the bottom up, each strip's target
    moved by Lᵀ times the errors of the strips below it (no feedback when factor is None)."""
    k, n = target.shape
    states = torch.empty(k // TILE, n // TILE, TILE * TILE, dtype=torch.int64, device=target.device)
    errors = torch.zeros_like(target)
    for strip in reversed(range(k // TILE)):
        top, bottom = strip * TILE, (strip + 1) * TILE
        wanted = target[top:bottom]
        if factor is not None and bottom < k:
            wanted = wanted + factor[bottom:, top:bottom].T @ errors[bottom:]
        tiles = matrix_to_tiles(wanted)[0]
        states[strip] = search_tiles(tiles, bits, codebook)
        coded = tiles_to_matrix(decode_states(states[strip], codebook).to(torch.float32).unsqueeze(0))
        errors[top:bottom] = target[top:bottom] - coded
    return states


def _unrotate(coded: torch.Tensor, su: torch.Tensor, sv: torch.Tensor) -> torch.Tensor:
    """diag(su) · H_k · coded · H_n · diag(sv)."""
    return su[:, None] * block_hadamard(block_hadamard(coded, dim=0), dim=1) * sv[None, :]


def _refit(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor, su: torch.Tensor,
           sv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Column then row factors that minimise tr(Eᵀ H E) with the codes fixed, folded into sv and su.

    Column j: c = qᵀHw / qᵀHq. Rows: r solves ((Q·Qᵀ) ∘ H) r = rowsum(Q ∘ HW). Each step is the
    exact minimiser given the other, so the error never grows."""
    hw = hessian @ weight
    for _ in range(_REFIT_ROUNDS):
        numerator = (quantized * hw).sum(dim=0)
        denominator = (quantized * (hessian @ quantized)).sum(dim=0)
        columns = torch.where(denominator > 0, numerator / torch.where(denominator > 0, denominator, 1.0), 1.0)
        quantized = quantized * columns[None, :]
        sv = sv * columns
        system = ((quantized @ quantized.T) * hessian).to(torch.float64)
        target = (quantized * hw).sum(dim=1).to(torch.float64)
        live = system.diagonal() > 0
        rows = torch.ones_like(target)
        if bool(live.any()):
            live_system = system[live][:, live]
            # A whisper of ridge towards 1 keeps the solve defined when codes are collinear.
            ridge = 1e-9 * live_system.diagonal().mean()
            eye = torch.eye(live_system.shape[0], dtype=torch.float64, device=system.device)
            rows[live] = torch.linalg.solve(live_system + ridge * eye, target[live] + ridge)
        rows = rows.to(torch.float32)
        quantized = rows[:, None] * quantized
        su = su * rows
    return su, sv


def _relative_error(weight: torch.Tensor, approximation: torch.Tensor, hessian: torch.Tensor | None) -> float:
    error = (approximation - weight).to(torch.float64)
    weight = weight.to(torch.float64)
    if hessian is None:
        numerator, denominator = (error * error).sum(), (weight * weight).sum()
    else:
        h = hessian.to(torch.float64)
        numerator, denominator = (error * (h @ error)).sum(), (weight * (h @ weight)).sum()
    return float(numerator / denominator) if float(denominator) > 0 else 0.0


def dequantize(quantized: Exl3Quantized) -> torch.Tensor:
    """float32 [k, n] (padded, y = x·W) of a stored result: diag(suh) · H · W_r · H · diag(svh)."""
    states = unpack_trellis(quantized.trellis, quantized.bits)
    codes = tiles_to_matrix(decode_states(states, quantized.codebook).to(torch.float32))
    return _unrotate(codes, quantized.suh.to(torch.float32), quantized.svh.to(torch.float32))


def quantize_exl3(weight: torch.Tensor, hessian: torch.Tensor | None, bits: float, codebook: str = "mul1",
                  seed: int = 0) -> Exl3Quantized:
    """Quantize one linear's weight [out, in] to EXL3 at `bits` per weight with `codebook`.

    `hessian` [in, in] (float32) weighs the error; None (or one without data) quantizes
    without feedback and measures the plain squared error. Runs on the weight's device and
    gives the same bytes for the same inputs and seed on that device."""
    _check_settings(bits, codebook)
    out_features, in_features = weight.shape
    device = weight.device
    k, n = _padded(in_features), _padded(out_features)
    w = torch.zeros(k, n, dtype=torch.float32, device=device)
    w[:in_features, :out_features] = weight.T.to(torch.float32)

    h = None
    if hessian is not None:
        if hessian.shape != (in_features, in_features):
            raise ValueError(f"the Hessian of a weight with {in_features} inputs is {in_features}x{in_features}, "
                             f"not {'x'.join(map(str, hessian.shape))}")
        if float(hessian.to(torch.float64).diagonal().mean()) >= _MIN_HESSIAN_DIAGONAL:
            h = torch.zeros(k, k, dtype=torch.float32, device=device)
            h[:in_features, :in_features] = hessian.to(device=device, dtype=torch.float32)
            # Padded inputs are always zero: give them the real inputs' mean so damping sees the same scale.
            h.diagonal()[in_features:] = h.diagonal()[:in_features].mean()

    generator = torch.Generator().manual_seed(seed)
    su_signs = _random_signs(k, generator, device)
    sv_signs = _random_signs(n, generator, device)

    column_rms = w.pow(2).mean(dim=0).sqrt()
    mean_rms = column_rms[:out_features].mean()
    sv = sv_signs * (column_rms / mean_rms if float(mean_rms) > 0 else column_rms)
    rotated = block_hadamard(_safe_divide(w, sv[None, :]), dim=1)
    codebook_std = float(codebook_values(codebook).to(torch.float32).std())
    su = su_signs * rotated.pow(2).mean(dim=1).sqrt() / -codebook_std
    rotated = block_hadamard(_safe_divide(rotated, su[:, None]), dim=0)

    scale = _global_scale(matrix_to_tiles(rotated), bits, codebook)
    rotated = rotated * scale
    su = su / scale

    factor = None
    if h is not None:
        # Dead rows (su = 0) lose their error anyway; a small stand-in weight keeps the rotated Hessian definite.
        live = su != 0
        stand_in = 0.1 * su[live].abs().mean() if bool(live.any()) else torch.tensor(1.0, device=device)
        row_scales = torch.where(live, su, stand_in).to(torch.float64)
        damped, factor = _factor_hessian(h, row_scales)
    else:
        damped = torch.eye(k, dtype=torch.float32, device=device)
    states = _ldlq(rotated, factor, bits, codebook)

    coded = tiles_to_matrix(decode_states(states, codebook).to(torch.float32))
    su, sv = _refit(w, _unrotate(coded, su, sv), damped, su, sv)
    result = Exl3Quantized(trellis=pack_trellis(states, bits), suh=su.to(torch.float16), svh=sv.to(torch.float16),
                           codebook=codebook, bits=bits, proxy_error=0.0)
    result.proxy_error = _relative_error(w, dequantize(result), h)
    return result
