"""EXL3 quantization of one linear: what is stored decodes to a weight as close as the number it reports."""

import pytest
import torch

from core.convert.exl3.ldlq import _block_ldl, quantize_exl3
from core.formats.exl3.codebook import codebook_values
from core.formats.exl3.hadamard import hadamard_128
from core.formats.exl3.layout import tile_positions, unpack_trellis

# Deliberately not multiples of 128: stored as 128 x 128 (64 tiles, the smallest EXL3 matrix).
OUT_FEATURES, IN_FEATURES = 120, 100


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py says why


@pytest.fixture(scope="module")
def layer():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(OUT_FEATURES, IN_FEATURES, generator=generator) * 0.02
    weight[:, 7] *= 8  # an outlier input channel, as real layers have
    mixing = torch.randn(IN_FEATURES, IN_FEATURES, generator=generator) * 0.3 + torch.eye(IN_FEATURES)
    inputs = torch.randn(2000, IN_FEATURES, generator=generator) @ mixing
    return weight, inputs.T @ inputs


@pytest.fixture(scope="module")
def quantized(layer):
    weight, hessian = layer
    return {bits: quantize_exl3(weight, hessian, bits) for bits in (2.0, 3.0, 4.0)}


def decode_by_hand(result):
    """W (k x n, y = x·W) = diag(suh) · H · W_r · H · diag(svh), W_r from the trellis as EXL3.md section 3 reads it."""
    states = unpack_trellis(result.trellis, result.bits)
    values = codebook_values(result.codebook)[states].to(torch.float64)
    tiles_k, tiles_n = states.shape[:2]
    rows, cols = tile_positions()
    w_r = torch.zeros(tiles_k, tiles_n, 16, 16, dtype=torch.float64)
    w_r[:, :, rows, cols] = values
    w_r = w_r.permute(0, 2, 1, 3).reshape(tiles_k * 16, tiles_n * 16)
    h128 = hadamard_128().to(torch.float64)
    h_k = torch.block_diag(*[h128] * (tiles_k * 16 // 128))
    h_n = torch.block_diag(*[h128] * (tiles_n * 16 // 128))
    return result.suh.to(torch.float64)[:, None] * (h_k @ w_r @ h_n) * result.svh.to(torch.float64)[None, :]


def weighted_error(weight, decoded, hessian):
    error = decoded[:IN_FEATURES, :OUT_FEATURES] - weight.T.to(torch.float64)
    h = hessian.to(torch.float64)
    return float((error * (h @ error)).sum() / (weight.T.to(torch.float64) * (h @ weight.T.to(torch.float64))).sum())


def test_stored_tensors_are_padded_to_128_and_the_padding_decodes_to_zero(quantized):
    result = quantized[2.0]
    assert result.trellis.shape == (8, 8, 32) and result.trellis.dtype == torch.int16
    assert result.suh.shape == (128,) and result.suh.dtype == torch.float16
    assert result.svh.shape == (128,) and result.svh.dtype == torch.float16
    assert result.codebook == "mul1"
    decoded = decode_by_hand(result)
    assert (decoded[IN_FEATURES:] == 0).all() and (decoded[:, OUT_FEATURES:] == 0).all()


@pytest.mark.parametrize("bits", [2.0, 3.0, 4.0])
def test_reported_proxy_error_is_that_of_the_stored_tensors(layer, quantized, bits):
    weight, hessian = layer
    measured = weighted_error(weight, decode_by_hand(quantized[bits]), hessian)
    assert quantized[bits].proxy_error == pytest.approx(measured, rel=1e-4)


# Measured on this layer: 0.0153, 0.00347 and 0.000886 (2, 3, 4 bits); 0.044 at 2 bits without feedback.
@pytest.mark.parametrize("bits, low, high", [(2.0, 0.007, 0.025), (3.0, 0.0015, 0.006), (4.0, 0.0004, 0.0015)])
def test_relative_error_is_in_the_range_of_trellis_codes(quantized, bits, low, high):
    assert low < quantized[bits].proxy_error < high


def test_error_falls_with_bits(quantized):
    errors = [quantized[bits].proxy_error for bits in (2.0, 3.0, 4.0)]
    assert errors[0] > 3 * errors[1] > 9 * errors[2]


def test_ldlq_with_the_hessian_beats_quantizing_without_feedback(layer, quantized):
    weight, hessian = layer
    without_feedback = quantize_exl3(weight, None, 2.0)
    with_feedback = quantized[2.0].proxy_error
    assert with_feedback < 0.7 * weighted_error(weight, decode_by_hand(without_feedback), hessian)
    # Without a Hessian the reported error is the plain relative squared error.
    plain = decode_by_hand(without_feedback)[:IN_FEATURES, :OUT_FEATURES] - weight.T.to(torch.float64)
    assert without_feedback.proxy_error == pytest.approx(float(plain.pow(2).sum() / weight.double().pow(2).sum()), rel=1e-4)


def test_the_same_seed_gives_the_same_bytes(layer, quantized):
    weight, hessian = layer
    again = quantize_exl3(weight, hessian, 4.0)
    first = quantized[4.0]
    assert torch.equal(again.trellis, first.trellis)
    assert torch.equal(again.suh.view(torch.int16), first.suh.view(torch.int16))
    assert torch.equal(again.svh.view(torch.int16), first.svh.view(torch.int16))
    assert again.proxy_error == first.proxy_error


def test_refuses_settings_exl3_cannot_store(layer):
    weight, hessian = layer
    with pytest.raises(ValueError, match="2.5 bits per weight only with the mul1 codebook"):
        quantize_exl3(weight, hessian, 2.5, codebook="3inst")
    with pytest.raises(ValueError, match="not 9"):
        quantize_exl3(weight, hessian, 9.0)
    with pytest.raises(ValueError, match="unknown EXL3 codebook 'e8p'"):
        quantize_exl3(weight, hessian, 2.0, codebook="e8p")
    with pytest.raises(ValueError, match="is 100x100, not 99x99"):
        quantize_exl3(weight, hessian[:99, :99], 2.0)


@pytest.mark.cuda
def test_cuda_quantization_is_as_good_as_the_cpu(layer, quantized):
    weight, hessian = layer
    on_gpu = quantize_exl3(weight.cuda(), hessian.cuda(), 3.0)
    assert on_gpu.trellis.is_cuda
    cpu_result = quantized[3.0]
    on_gpu_cpu = type(cpu_result)(on_gpu.trellis.cpu(), on_gpu.suh.cpu(), on_gpu.svh.cpu(), on_gpu.codebook,
                                  on_gpu.bits, on_gpu.proxy_error)
    assert weighted_error(weight, decode_by_hand(on_gpu_cpu), hessian) == pytest.approx(on_gpu.proxy_error, rel=1e-3)
    assert on_gpu.proxy_error < 1.1 * cpu_result.proxy_error
    again = quantize_exl3(weight.cuda(), hessian.cuda(), 3.0)
    assert torch.equal(again.trellis, on_gpu.trellis) and torch.equal(again.suh, on_gpu.suh)


def test_block_ldl_factor_leaves_a_block_diagonal_middle():
    inputs = torch.randn(300, 128, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    hessian = inputs.T @ inputs
    unit = _block_ldl(hessian) + torch.eye(128, dtype=torch.float64)
    middle = torch.linalg.solve(unit, hessian) @ torch.linalg.inv(unit.T)
    blocks = torch.block_diag(*[torch.ones(16, 16)] * 8).bool()
    assert middle[~blocks].abs().max() < 1e-9 * hessian.abs().max()
    assert torch.equal(unit.tril(), unit) and (unit.diagonal() == 1).all() and unit[blocks].sum() == 128
