"""The EXL3 tensor layout and rotation: packing must produce the words ExLlamaV3 reads.

The bit-by-bit models below are written from ../shared/EXL3.md section 3, one bit
at a time, independently of core/formats/exl3/layout.py's vectorized code."""

import pytest
import torch

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
    unpack_trellis,
)

ALL_BITS = (1, 2, 3, 4, 5, 6, 7, 8, 1.5, 2.5, 3.5)


def spec_steps(bits) -> list[int]:
    if bits == int(bits):
        return [int(bits)] * 256
    # Half rates: odd positions take one extra bit.
    return [int(bits) + (1 if p % 2 else 0) for p in range(256)]


def spec_ring(words: list[int]) -> list[int]:
    """One tile's int16 words -> its ring bits: MSB-first in little-endian uint32 words."""
    ring = []
    for m in range(len(words) // 2):
        u = (words[2 * m] & 0xFFFF) | ((words[2 * m + 1] & 0xFFFF) << 16)
        ring.extend((u >> (31 - i)) & 1 for i in range(32))
    return ring


def spec_unpack(words: list[int], bits) -> list[int]:
    ring = spec_ring(words)
    size = len(ring)
    states, end = [], 0
    for step in spec_steps(bits):
        end += step
        state = 0
        for i in range(16):
            state = (state << 1) | ring[(end - 16 + i) % size]
        states.append(state)
    return states


def spec_pack(states: list[int], bits) -> list[int]:
    ring = []
    for state, step in zip(states, spec_steps(bits)):
        ring.extend((state >> (step - 1 - j)) & 1 for j in range(step))
    words = []
    for m in range(len(ring) // 32):
        u = 0
        for i in range(32):
            u |= ring[32 * m + i] << (31 - i)
        for half in (u & 0xFFFF, u >> 16):
            words.append(half - (1 << 16) if half >= 1 << 15 else half)
    return words


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
