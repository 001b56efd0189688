"""The EXL3 trellis search: valid tail-biting rings, QTIP-class error, and no worse than other rings."""

import pytest
import torch

from core.convert.exl3 import trellis
from core.convert.exl3.trellis import decode_states, encode_through_wrap_nodes, encode_tiles
from core.formats.exl3.layout import pack_trellis, step_bits, unpack_trellis

TILES = 6


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py says why


def gaussian_tiles(tiles=TILES, seed=0):
    return torch.randn(tiles, 256, generator=torch.Generator().manual_seed(seed))


def ring_is_valid(states, bits):
    """Every state's high 16-D(p) bits are the previous state's low bits, around the ring."""
    steps = step_bits(bits)
    previous = states.roll(1, dims=1)
    overlap_mask = (1 << (16 - steps)) - 1
    return bool(((states >> steps) == (previous & overlap_mask)).all()) and bool(((states >= 0) & (states < 65536)).all())


def squared_error(states, values, codebook):
    return ((decode_states(states, codebook).float() - values) ** 2).sum(dim=1)


def greedy_rings(values, bits, codebook):
    """A valid ring built left to right: each position takes the best new bits that the
    closing of the ring leaves free (the last 16-D(0) ring bits are fixed by s(0))."""
    steps = [int(d) for d in step_bits(bits)]
    ring_bits = sum(steps)
    table = decode_states(torch.arange(65536), codebook).float()
    tiles = values.shape[0]
    first = ((table.unsqueeze(0) - values[:, :1]) ** 2).argmin(dim=1)
    ring = torch.zeros(tiles, ring_bits, dtype=torch.int64)
    fixed = torch.zeros(ring_bits, dtype=torch.bool)
    # s(0) is ring bits [R-16+D0, R) then [0, D0), MSB first.
    window0 = list(range(ring_bits - 16 + steps[0], ring_bits)) + list(range(steps[0]))
    for place, bit in enumerate(window0):
        ring[:, bit] = (first >> (15 - place)) & 1
        fixed[bit] = True
    states = [first]
    end = steps[0]
    for p in range(1, 256):
        d = steps[p]
        new_bits = list(range(end, end + d))
        candidates = torch.arange(1 << d)
        allowed = torch.ones(tiles, 1 << d, dtype=torch.bool)
        for place, bit in enumerate(new_bits):
            if fixed[bit]:
                allowed &= ((candidates >> (d - 1 - place)) & 1).unsqueeze(0) == ring[:, bit:bit + 1]
        options = ((states[-1] << d) & 0xFFFF).unsqueeze(1) | candidates.unsqueeze(0)
        error = (table[options] - values[:, p:p + 1]) ** 2
        error[~allowed] = float("inf")
        choice = options.gather(1, error.argmin(dim=1, keepdim=True)).squeeze(1)
        for place, bit in enumerate(new_bits):
            ring[:, bit] = (choice >> (d - 1 - place)) & 1
        states.append(choice)
        end += d
    return torch.stack(states, dim=1)


@pytest.fixture(scope="module")
def encoded():
    values = gaussian_tiles()
    return values, {bits: encode_tiles(values, bits, "mul1") for bits in (2, 2.5, 3, 4)}


@pytest.mark.parametrize("bits", [2, 2.5, 3, 4])
def test_rings_are_valid_and_survive_packing(encoded, bits):
    values, by_bits = encoded
    states = by_bits[bits]
    assert states.shape == values.shape and states.dtype == torch.int64
    assert ring_is_valid(states, bits)
    assert torch.equal(unpack_trellis(pack_trellis(states, bits), bits), states)


# Lloyd-Max (the best scalar quantizer) on a unit Gaussian: MSE 0.1175 at 2 bits, 0.03454 at 3, 0.009497 at 4.
# Trellis codes of this size measure about 0.068, 0.018 and 0.0049 on these tiles.
@pytest.mark.parametrize("bits, bound, lloyd_max", [(2, 0.078, 0.1175), (3, 0.021, 0.03454), (4, 0.0057, 0.009497)])
def test_error_on_gaussian_tiles_is_trellis_class(encoded, bits, bound, lloyd_max):
    values, by_bits = encoded
    mse = squared_error(by_bits[bits], values, "mul1").sum().item() / values.numel()
    assert mse < bound
    assert mse < 0.7 * lloyd_max


def test_error_falls_with_bits(encoded):
    values, by_bits = encoded
    errors = [squared_error(by_bits[bits], values, "mul1").sum().item() for bits in (2, 2.5, 3, 4)]
    assert errors == sorted(errors, reverse=True)


@pytest.mark.parametrize("bits", [2, 3])
def test_no_worse_than_a_greedy_ring(encoded, bits):
    values, by_bits = encoded
    greedy = greedy_rings(values, bits, "mul1")
    assert ring_is_valid(greedy, bits)
    viterbi_error = squared_error(by_bits[bits], values, "mul1")
    assert (viterbi_error <= squared_error(greedy, values, "mul1")).all()
    assert viterbi_error.sum() < 0.8 * squared_error(greedy, values, "mul1").sum()


def test_no_worse_than_rings_through_fixed_wrap_nodes(encoded):
    values, by_bits = encoded
    bits = 2
    best = squared_error(by_bits[bits], values, "mul1")
    for node in (0, 0x1234, 0x3FFF):
        forced = encode_through_wrap_nodes(values, bits, "mul1", torch.full((values.shape[0],), node))
        assert ring_is_valid(forced, bits)
        assert (forced[:, 0] >> 2 == node).all()
        assert (best <= squared_error(forced, values, "mul1")).all()


@pytest.mark.parametrize("codebook, bits", [("3inst", 2), ("mcg", 3), ("mul1", 4), ("mul1", 1.5)])
def test_a_decoded_ring_is_encoded_back_exactly(codebook, bits):
    generator = torch.Generator().manual_seed(1)
    words = torch.randint(-32768, 32768, (2, int(16 * bits)), generator=generator, dtype=torch.int32).to(torch.int16)
    states = unpack_trellis(words, bits)
    assert ring_is_valid(states, bits)
    values = decode_states(states, codebook).float()
    found = encode_tiles(values, bits, codebook)
    assert ring_is_valid(found, bits)
    assert squared_error(found, values, codebook).max().item() == 0.0


def test_chunking_does_not_change_the_result(encoded):
    values, by_bits = encoded
    assert torch.equal(encode_tiles(values[:4], 3, "mul1", chunk_tiles=3), by_bits[3][:4])


def test_refuses_values_that_are_not_tiles():
    with pytest.raises(ValueError, match="256"):
        encode_tiles(torch.zeros(3, 255), 2, "mul1")


@pytest.mark.cuda
def test_cuda_search_gives_a_valid_ring_as_good_as_the_cpu():
    values = gaussian_tiles(8, seed=3)
    cpu = encode_tiles(values, 3, "mul1")
    gpu = encode_tiles(values.cuda(), 3, "mul1").cpu()
    assert ring_is_valid(gpu, 3)
    assert torch.allclose(squared_error(gpu, values, "mul1"), squared_error(cpu, values, "mul1"), rtol=1e-5)


@pytest.mark.parametrize("bits", [2, 2.5])
def test_back_pointers_and_recomputed_costs_choose_the_same_states(encoded, monkeypatch, bits):
    # The CPU traces back by recomputing predecessor costs; a GPU keeps uint8 back-pointers.
    values, by_bits = encoded
    monkeypatch.setattr(trellis, "_keeps_pointers", lambda device: True)
    assert torch.equal(encode_tiles(values[:3], bits, "mul1"), by_bits[bits][:3])
