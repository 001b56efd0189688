"""The EXL3 tensor layout, rotation and reference decode: packing must produce the words
ExLlamaV3 reads, and the decode the weights its codes mean.

The bit-by-bit models (tests/exl3_spec.py) are written from ../shared/EXL3.md, one bit
at a time, independently of core/formats/exl3's vectorized code."""

import pytest
import torch

from core.formats.exl3 import reference
from core.formats.exl3.codebook import codebook_values
from core.formats.exl3.hadamard import block_hadamard, hadamard_128
from core.formats.exl3.layout import (
    PAD,
    SUPPORTED_BITS,
    TILE,
    bits_of_trellis,
    matrix_to_tiles,
    pack_trellis,
    step_bits,
    tile_positions,
    tiles_to_matrix,
    pack_signs,
    unpack_signs,
    unpack_trellis,
)
from core.weights import WeightsError
from tests.exl3_spec import float64_codes_matrix, float64_weight, random_layer, spec_codebook, spec_pack, spec_steps, spec_unpack

ALL_BITS = (1, 2, 3, 4, 5, 6, 7, 8, 1.5, 2.5, 3.5)


def random_trellis(tiles_k, tiles_n, bits, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(-(1 << 15), 1 << 15, (tiles_k, tiles_n, round(16 * bits)), generator=g)
    return words.to(torch.int16)


def test_supported_bits_are_exl3s():
    assert sorted(SUPPORTED_BITS) == sorted(ALL_BITS)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_step_bits_follow_the_spec(bits):
    steps = step_bits(bits)
    assert steps.dtype == torch.int64 and steps.tolist() == spec_steps(bits)
    assert int(steps.sum()) == round(256 * bits)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_unpack_matches_a_bit_by_bit_reading_of_the_ring(bits):
    trellis = random_trellis(2, 3, bits, seed=round(bits * 10))
    states = unpack_trellis(trellis, bits)
    assert states.shape == (2, 3, 256) and states.dtype == torch.int64
    for i in range(2):
        for j in range(3):
            assert states[i, j].tolist() == spec_unpack(trellis[i, j].tolist(), bits)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_pack_matches_a_bit_by_bit_writing_of_the_ring(bits):
    # States of a consistent (tail-biting) ring: those some random words hold.
    trellis = random_trellis(1, 2, bits, seed=7 + round(bits * 10))
    states = unpack_trellis(trellis, bits)
    packed = pack_trellis(states, bits)
    assert packed.dtype == torch.int16 and packed.shape == (1, 2, round(16 * bits))
    for j in range(2):
        assert packed[0, j].tolist() == spec_pack(states[0, j].tolist(), bits)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_pack_and_unpack_round_trip(bits):
    trellis = random_trellis(5, 4, bits, seed=3)
    states = unpack_trellis(trellis, bits)
    assert torch.equal(pack_trellis(states, bits), trellis)
    assert torch.equal(unpack_trellis(pack_trellis(states, bits), bits), states)


def test_ring_reads_uint32_words_not_a_uint16_stream():
    # Hand-derived: at 8 bits state p (p >= 1) is ring bytes p-1 and p. Words 0x5678, 0x1234 form the
    # uint32 0x12345678, whose MSB-first bytes start the ring: 0x12, 0x34, 0x56, 0x78.
    words = [0x5678, 0x1234] + [0] * 126
    states = unpack_trellis(torch.tensor(words, dtype=torch.int16)[None, None], 8)[0, 0].tolist()
    assert states[1:4] == [0x1234, 0x3456, 0x5678]
    assert states[0] == 0x0012  # wraps: the ring's last byte (0) then its first
    assert states[4] == 0x7800


def test_unpack_of_many_tiles_is_chunked_alike():
    trellis = random_trellis(300, 130, 2, seed=11)  # more tiles than one chunk
    states = unpack_trellis(trellis, 2)
    assert torch.equal(states[299, 129], unpack_trellis(trellis[299:, 129:], 2)[0, 0])
    assert torch.equal(pack_trellis(states, 2), trellis)


def test_bits_come_from_the_trellis_width():
    assert bits_of_trellis((8, 8, 64)) == 4
    assert bits_of_trellis((8, 8, 40)) == 2.5
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.up_proj.trellis has 20 words per tile, which is not 16\*K"):
        bits_of_trellis((8, 8, 20), "model.layers.0.mlp.up_proj")
    with pytest.raises(ValueError, match="not 16"):
        bits_of_trellis((8, 8, 144))
    with pytest.raises(ValueError, match="EXL3 stores"):
        step_bits(4.5)


def test_tile_positions_are_the_tensor_core_order():
    rows, cols = tile_positions()
    assert sorted((rows * TILE + cols).tolist()) == list(range(256))
    # p = 8t + e: rows 2(t%4) + (e&1) + 8((e>>1)&1), cols t//4 + 8(e>>2).
    expected = {0: (0, 0), 1: (1, 0), 2: (8, 0), 4: (0, 8), 8: (2, 0), 32: (0, 1), 255: (15, 15)}
    for p, place in expected.items():
        assert (int(rows[p]), int(cols[p])) == place


def test_tiles_map_to_their_block_of_the_matrix():
    values = torch.randn(3, 2, 256)
    matrix = tiles_to_matrix(values)
    rows, cols = tile_positions()
    assert matrix.shape == (48, 32)
    for i, j, p in [(0, 0, 0), (2, 1, 2), (1, 0, 255), (2, 0, 37)]:
        assert matrix[16 * i + rows[p], 16 * j + cols[p]] == values[i, j, p]
    assert torch.equal(matrix_to_tiles(matrix), values)


def test_hadamard_is_sylvester_orthogonal_and_self_inverse():
    h = hadamard_128()
    assert h.dtype == torch.float32 and h.shape == (PAD, PAD)
    signs = torch.tensor([[(-1) ** bin(i & j).count("1") for j in range(128)] for i in range(128)], dtype=torch.float32)
    assert torch.allclose(h, signs / 128 ** 0.5)
    assert torch.allclose(h @ h, torch.eye(128), atol=1e-6)
    assert torch.equal(h, h.t())


def test_block_hadamard_rotates_each_128_block():
    x = torch.randn(3, 384, dtype=torch.float64)
    h = hadamard_128().double()
    expected = torch.cat([x[:, b:b + 128] @ h for b in range(0, 384, 128)], dim=1)
    y = block_hadamard(x)
    assert y.dtype == torch.float32
    assert torch.allclose(y.double(), expected, atol=1e-5)
    assert torch.allclose(block_hadamard(y), x.float(), atol=1e-5)
    # Along another dim: the same rotation of each column block.
    assert torch.allclose(block_hadamard(x.t(), dim=0), y.t(), atol=1e-6)
    with pytest.raises(ValueError, match="whole 128-blocks"):
        block_hadamard(torch.randn(2, 100))


def test_legacy_sign_words_unpack_to_plus_minus_one():
    # Bit i of word j is element 16j + i; 1 means -1.
    words = torch.tensor([0b101, -(1 << 15)], dtype=torch.int16)
    signs = unpack_signs(words)
    assert signs.dtype == torch.float16 and signs.shape == (32,)
    assert [i for i in range(32) if signs[i] < 0] == [0, 2, 31]
    assert torch.equal(pack_signs(signs), words)


@pytest.mark.parametrize("name", ["3inst", "mcg", "mul1"])
def test_codebook_tables_equal_the_float64_formulas(name):
    states = torch.arange(65536)
    assert torch.equal(codebook_values(name).double(), spec_codebook(name, states))


@pytest.mark.parametrize("bits,codebook,legacy", [(4, "mul1", False), (2.5, "mul1", False), (3, "3inst", False),
                                                  (2, "mcg", True), (1.5, "mul1", False), (8, "mcg", False)])
def test_reference_dequantizer_equals_a_float64_decode_of_the_codes(bits, codebook, legacy):
    tensors = random_layer(128, 256, bits, codebook, seed=round(bits * 10), legacy_signs=legacy)
    exact = float64_weight(tensors, codebook, bit_by_bit=True)
    ours = reference.dequantize_exl3(tensors)  # the codebook from the marker
    assert ours.dtype == torch.float16 and ours.shape == (128, 256)
    # One fp16 rounding of a float32 result: half an fp16 ulp, plus float32's share of the sums.
    bound = exact.abs() * 2 ** -11 + 1e-6 * exact.abs().max()
    assert bool(((ours.double() - exact).abs() <= bound).all())
    # W_r alone: the codebook values, exactly, at their tile positions.
    assert torch.equal(reference.decode_tiles(tensors["trellis"], codebook).double(),
                       float64_codes_matrix(tensors["trellis"], codebook, bit_by_bit=True))


@pytest.mark.parametrize("in_features,out_features", [(128, 256), (100, 200), (250, 129)])
def test_reference_product_equals_x_times_the_float64_weight(in_features, out_features):
    tensors = random_layer(in_features, out_features, 3, "mul1", seed=in_features)
    exact = float64_weight(tensors, "mul1")[:in_features, :out_features]
    x = torch.randn(5, in_features, generator=torch.Generator().manual_seed(1))
    bias = torch.randn(out_features).half()
    expected = x.double() @ exact + bias.double()
    ours = reference.matmul(x, tensors, out_features, bias)
    assert ours.shape == (5, out_features) and ours.dtype == torch.float32
    assert float((ours.double() - expected).norm() / expected.norm()) < 2e-3
    dense = x.double() @ reference.dequantize_exl3(tensors)[:in_features, :out_features].double() + bias.double()
    assert float((dense - expected).norm() / expected.norm()) < 1e-3


def test_trellis_and_scales_that_disagree_are_refused_by_name():
    from core.formats.exl3.layout import check_layer_tensors
    tensors = random_layer(128, 256, 4, "mul1", seed=0)
    key = "model.layers.0.mlp.up_proj"
    assert check_layer_tensors(key, tensors["trellis"], tensors["suh"], tensors["svh"]) == 4
    with pytest.raises(WeightsError, match=rf"{key}.svh has shape \(128,\), but {key}.trellis \(8, 16, 64\) "
                                           r"holds a 128x256 weight, so it needs \(256,\)"):
        check_layer_tensors(key, tensors["trellis"], tensors["suh"], tensors["svh"][:128])
    with pytest.raises(WeightsError, match=rf"EXL3 layer {key} has no suh \(or su\) tensor"):
        check_layer_tensors(key, tensors["trellis"], None, tensors["svh"])
    with pytest.raises(WeightsError, match="pads both to multiples of 128"):
        check_layer_tensors(key, tensors["trellis"][:4], tensors["suh"][:64], tensors["svh"])
