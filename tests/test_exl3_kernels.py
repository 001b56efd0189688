"""The EXL3 CUDA kernels against their torch twins (run on the device machine; skipped elsewhere),
and the kernel entries' CPU fallback and refusals, checked everywhere.

- decode equals reference.decode_tiles bit for bit, at every bit width and codebook;
- the Hadamard equals hadamard.block_hadamard with the scales' fp16 multiplies bit for bit
  (both run the same fp32 butterfly stages in the same order);
- the Viterbi kernel returns the very states of core.convert.exl3.trellis.encode_tiles, run on
  the CPU (where its tie rule, the lowest predecessor, is the documented first argmin);
- the layer product agrees with reference.matmul within fp16 tolerance (cuBLAS rounds the sums
  to fp16 before the output Hadamard; the reference keeps them fp32).

Outputs are poisoned first: the block the kernel's output will take from the caching allocator
is filled with NaN, so an element the kernel forgets to write shows up.
"""

import pytest
import torch

from core.convert.exl3.trellis import decode_states, encode_tiles
from core.formats.exl3 import kernel, reference
from core.formats.exl3.codebook import CODEBOOKS
from core.formats.exl3.hadamard import block_hadamard
from core.formats.exl3.layout import SUPPORTED_BITS, pack_trellis, step_bits, unpack_trellis
from core.kernels.build import kernels
from tests.exl3_spec import float64_codes_matrix, float64_weight, random_layer, spec_hadamard

# fp16 output of an fp32-accumulated product: about 2^-11 relative per element, twice rounded here.
TOLERANCE = 2e-3
# (tiles_k, tiles_n): one tile, a block's 8 tiles and a partial block, rows of odd widths, a layer's size.
TILE_GRIDS = [(1, 1), (1, 8), (3, 9), (5, 17), (8, 64), (24, 40)]
_seed = iter(range(10**6))


@pytest.fixture(autouse=True)
def built(request, monkeypatch):
    if request.node.get_closest_marker("cuda"):
        # The product only takes the kernels where they are switched on (kernel.py says why).
        monkeypatch.setenv(kernel.EXL3_KERNELS_SWITCH, "1")
        assert kernels() is not None, "the kernels must build on the device machine"


def poison(numel: int, dtype=torch.float16) -> None:
    torch.full((numel,), float("nan"), dtype=dtype, device="cuda")


def random_trellis(tiles_k: int, tiles_n: int, bits: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(next(_seed))
    # Any words are a consistent tail-biting ring.
    return torch.randint(-(1 << 15), 1 << 15, (tiles_k, tiles_n, round(16 * bits)), generator=g).to(torch.int16)


def relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    assert not out.isnan().any(), "an output element was never written"
    return float((out.double() - expected.double()).norm() / expected.double().norm())


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(torch.int16), b.view(torch.int16))


# ---------------------------------------------------------------- everywhere: fallback and refusals

def test_entries_take_the_torch_twins_off_the_gpu():
    trellis = random_trellis(2, 3, 2.5)
    expected = float64_codes_matrix(trellis, "mul1").half()  # each value is one fp16 rounding
    assert same_bits(kernel.decode(trellis, "mul1"), expected)
    x = torch.randn(3, 256).half()
    suh, svh = torch.randn(256).half(), torch.randn(256).half()
    exact = ((x * suh).double().view(3, 2, 128) @ spec_hadamard()).view(3, 256)
    out = kernel.hadamard(x, suh, svh)
    assert out.dtype == torch.float16
    assert torch.allclose(out.double(), exact.half().double() * svh.double(), rtol=2e-3, atol=1e-3)
    assert kernel.plan_layer({"trellis": trellis}, "mul1", 32, 48) is None


def test_entries_refuse_what_no_kernel_takes():
    with pytest.raises(ValueError, match="not 2.25"):
        kernel.viterbi(torch.zeros(1, 256), 2.25, "mul1")
    with pytest.raises(ValueError, match=r"\[tiles, 256\] values, not \[2, 128\]"):
        kernel.viterbi(torch.zeros(2, 128), 2, "mul1")
    with pytest.raises(ValueError, match="whole 128-blocks, not a dimension of 100"):
        kernel.hadamard(torch.zeros(2, 100).half())
    with pytest.raises(ValueError, match="fp16 multiply"):
        kernel.hadamard(torch.zeros(2, 128), pre_scale=torch.ones(128).half())
    with pytest.raises(ValueError, match="unknown EXL3 codebook 'e8p'"):
        kernel._codebook_id("e8p")


# ---------------------------------------------------------------- decode

@pytest.mark.cuda
@pytest.mark.parametrize("codebook", CODEBOOKS)
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_exl3_decode_matches_reference_bit_for_bit(bits, codebook):
    for tiles_k, tiles_n in TILE_GRIDS:
        trellis = random_trellis(tiles_k, tiles_n, bits)
        expected = reference.decode_tiles(trellis, codebook)
        poison(expected.numel())
        out = kernel.decode(trellis.cuda(), codebook)
        assert not out.isnan().any(), f"{tiles_k}x{tiles_n} tiles: an element was never written"
        assert same_bits(out.cpu(), expected), f"{bits:g} bits, {tiles_k}x{tiles_n} tiles: decode differs"


@pytest.mark.cuda
@pytest.mark.parametrize("codebook", CODEBOOKS)
def test_exl3_decode_gives_every_state_its_codebook_value(codebook):
    # At 8 bits the state of position p is ring bytes (p - 1, p). Tiles of a fixed byte a at even
    # positions and 128 others at odd ones hold every state (a, y) and (y, a): 512 tiles, all 65536.
    a = torch.arange(256).repeat_interleave(2)
    y = torch.arange(256).view(2, 128).repeat(256, 1)
    ring_bytes = torch.stack((a[:, None].expand(512, 128), y), dim=2).reshape(512, 256)
    trellis = pack_trellis(ring_bytes, 8)  # stores each position's low byte
    assert unpack_trellis(trellis, 8).unique().numel() == 65536
    trellis = trellis.view(16, 32, 128)
    out = kernel.decode(trellis.cuda(), codebook).cpu()
    assert same_bits(out, reference.decode_tiles(trellis, codebook))


# ---------------------------------------------------------------- Hadamard

def hadamard_twin(x, pre_scale=None, post_scale=None):
    if pre_scale is not None:
        x = x * pre_scale
    out = block_hadamard(x).to(torch.float16)
    return out if post_scale is None else out * post_scale


@pytest.mark.cuda
@pytest.mark.parametrize("rows", [1, 3, 16, 100])
@pytest.mark.parametrize("dim", [128, 384, 4096, 11008])
def test_exl3_hadamard_matches_block_hadamard_bit_for_bit(rows, dim):
    x = (torch.randn(rows, dim, device="cuda") * 3).half()
    suh = (torch.randn(dim, device="cuda") * 0.05).half()
    svh = torch.randn(dim, device="cuda").half()
    svh[::7] = 0  # dead columns
    for pre, post in [(None, None), (suh, None), (None, svh), (suh, svh)]:
        poison(x.numel())
        out = kernel.hadamard(x, pre, post)
        assert not out.isnan().any(), "an element was never written"
        assert same_bits(out, hadamard_twin(x, pre, post)), f"scales {pre is not None}, {post is not None}"
    sums = torch.randn(rows, dim, device="cuda") * 40  # fp32 rows: a product's sums
    assert same_bits(kernel.hadamard(sums, post_scale=svh), hadamard_twin(sums, None, svh))


@pytest.mark.cuda
def test_exl3_hadamard_in_place_and_batched_rows():
    x = torch.randn(2, 5, 512, device="cuda").half()
    expected = hadamard_twin(x)
    out = kernels().exl3_hadamard(x, out=x)
    assert out.data_ptr() == x.data_ptr() and same_bits(x, expected)
    # Applied twice it is the identity, up to the fp16 rounding in between.
    twice = kernel.hadamard(kernel.hadamard(x))
    assert torch.allclose(twice.float(), x.float(), rtol=0, atol=4e-3 * float(x.abs().max()))


# ---------------------------------------------------------------- Viterbi

def gaussian_tiles(tiles: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(tiles, 256, generator=torch.Generator().manual_seed(next(_seed))) * scale


def tie_tiles(bits: float, codebook: str) -> torch.Tensor:
    """Tiles rich in equal costs: all zeros, a constant, and the exact values of a random valid ring
    (which some other rings decode to as well, where the codebook repeats values)."""
    g = torch.Generator().manual_seed(next(_seed))
    words = torch.randint(-(1 << 15), 1 << 15, (1, round(16 * bits)), generator=g).to(torch.int16)
    ring_values = decode_states(unpack_trellis(words, bits), codebook).float()
    return torch.cat((torch.zeros(1, 256), torch.full((1, 256), 0.5), ring_values))


def check_viterbi(values: torch.Tensor, bits: float, codebook: str) -> None:
    expected = encode_tiles(values, bits, codebook)  # on the CPU: the first minimum on ties
    states = kernel.viterbi(values.cuda(), bits, codebook).cpu()
    # Whatever the tie rule, the kernel's rings must be valid and no worse than the encoder's.
    steps = step_bits(bits)
    overlap = (states >> steps) == (states.roll(1, dims=1) & ((1 << (16 - steps)) - 1))
    assert bool(overlap.all()) and bool(((states >= 0) & (states < 65536)).all()), "an invalid ring"
    assert torch.equal(unpack_trellis(pack_trellis(states, bits), bits), states)
    error = ((decode_states(states, codebook).float() - values) ** 2).sum(dim=1)
    expected_error = ((decode_states(expected, codebook).float() - values) ** 2).sum(dim=1)
    differing = (states != expected).any(dim=1).nonzero().flatten().tolist()
    assert not differing, (f"{bits:g} bits {codebook}: tiles {differing} differ from the encoder's states "
                           f"(errors {error[differing].tolist()} vs {expected_error[differing].tolist()})")


@pytest.mark.cuda
@pytest.mark.parametrize("codebook", CODEBOOKS)
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_exl3_viterbi_finds_the_encoders_states(bits, codebook):
    check_viterbi(torch.cat((gaussian_tiles(3), gaussian_tiles(1, 0.3), tie_tiles(bits, codebook))), bits, codebook)


@pytest.mark.cuda
@pytest.mark.parametrize("bits", [2, 3.5, 4])
def test_exl3_viterbi_more_tiles_than_blocks(bits):
    # More tiles than multiprocessors: each block of the persistent grid takes several in turn.
    tiles = torch.cuda.get_device_properties(0).multi_processor_count * 2 + 5
    check_viterbi(gaussian_tiles(tiles), bits, "mul1")


@pytest.mark.cuda
def test_exl3_viterbi_states_decode_to_what_the_kernels_decode():
    # Packed as the converter will store them, the kernel's states decode on the decode kernel to their values.
    values = gaussian_tiles(8 * 4)
    states = kernel.viterbi(values.cuda(), 3, "mul1").cpu()
    trellis = pack_trellis(states, 3).view(4, 8, 48)
    decoded = kernel.decode(trellis.cuda(), "mul1").cpu()
    expected = reference.decode_tiles(trellis, "mul1")
    assert same_bits(decoded, expected)


# ---------------------------------------------------------------- the on-the-fly product

@pytest.mark.cuda
@pytest.mark.parametrize("codebook", CODEBOOKS)
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_exl3_gemv_matches_the_decoded_product(bits, codebook):
    # (tiles_k, tiles_n): one tile, partial column groups, k cut into many splits and into one.
    for tiles_k, tiles_n in [(1, 1), (8, 9), (40, 24), (256, 16), (16, 256)]:
        trellis = random_trellis(tiles_k, tiles_n, bits).cuda()
        w_r = reference.decode_tiles(trellis, codebook).float()
        for rows in (1, 3, 8):
            x = torch.randn(rows, tiles_k * 16, device="cuda").half()
            expected = x.float() @ w_r
            for split in (None, 1, 7, 64):
                out = kernel.gemv(x, trellis, codebook, split)
                assert out.shape == (rows, tiles_n * 16) and out.dtype == torch.float32
                error = relative_error(out, expected)
                assert error < 1e-5, f"{tiles_k}x{tiles_n} tiles, {rows} rows, split {split}: relative error {error:.2e}"


@pytest.mark.cuda
def test_exl3_gemv_refuses_more_rows_than_it_takes():
    trellis = random_trellis(2, 2, 4).cuda()
    with pytest.raises(RuntimeError, match="rows <= 8"):
        kernel.gemv(torch.zeros(9, 32, device="cuda").half(), trellis, "mul1")


def test_gemv_splits_fill_the_gpu_within_the_kernels_limit():
    # A 4096x4096 layer on 132 SMs: 32 column groups want 17 splits of k, 16 tile rows each.
    assert kernel.gemv_tiles_per_split(256, 256, 132) == 16
    # A layer too narrow to fill the GPU is cut as finely as the kernel's staging allows, and
    # a deep one never beyond it.
    assert kernel.gemv_tiles_per_split(8, 4, 132) == 1
    assert kernel.gemv_tiles_per_split(1024, 4096, 132) == 64


# ---------------------------------------------------------------- the layer product

@pytest.mark.cuda
@pytest.mark.parametrize("codebook", CODEBOOKS)
@pytest.mark.parametrize("bits", [1.5, 2, 2.5, 3, 4, 6, 8])
@pytest.mark.parametrize("shape", [(128, 128), (256, 384), (200, 300), (1024, 640)])
def test_exl3_layer_product_matches_reference(shape, bits, codebook):
    if bits != int(bits) and codebook != "mul1":
        pytest.skip("EXL3 stores half rates with MUL1 only")
    in_features, out_features = shape
    tensors = {name: t.cuda() for name, t in random_layer(in_features, out_features, bits, codebook, next(_seed)).items()}
    plan = kernel.plan_layer(tensors, codebook, in_features, out_features)
    assert plan is not None
    bias = torch.randn(out_features, device="cuda").half()
    exact_weight = float64_weight({k: v.cpu() for k, v in tensors.items()}, codebook)[:in_features, :out_features].cuda()
    for rows in (1, 2, 7, 16, 33, 100):
        x = torch.randn(rows, in_features, device="cuda").half()
        for b in (None, bias):
            out = kernel.matmul(x, tensors, plan, b, out_features)
            assert out.shape == (rows, out_features) and out.dtype == torch.float16
            expected = reference.matmul(x, tensors, out_features, b, codebook)
            error = relative_error(out, expected)
            assert error < TOLERANCE, f"{rows} rows: relative error {error:.2e} to reference.matmul"
            exact = x.double() @ exact_weight + (0 if b is None else b.double())
            error = relative_error(out, exact)
            assert error < TOLERANCE, f"{rows} rows: relative error {error:.2e} to the float64 product"
