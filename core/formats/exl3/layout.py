"""The EXL3 tensor layout: the trellis ring of each 16x16 tile, packed and unpacked.

Shared by the converter (which packs) and the loader (which reads); it knows
nothing about codebooks or models (codebook.py decodes states, reference.py
whole layers). Facts from ExLlamaV3 1.6.5, collected in ../shared/EXL3.md
sections 1-3.

One quantized linear `<key>` with k inputs and n outputs (both padded to
multiples of 128, PAD) stores its rotated weight W_r [k, n] as

    <key>.trellis  int16 [k/16, n/16, 16*K]   one tile of 256 weights per [i, j]
    <key>.suh      fp16  [k]                  input scales (signed, full magnitude)
    <key>.svh      fp16  [n]                  output scales (signed; 0 for a dead column)
    <key>.mcg | <key>.mul1  int32 []          the codebook marker (none: 3INST; codebook.py)
    <key>.bias     fp16  [n or out_features]  only when the layer has one

Older files store `.su`/`.sv` instead: int16 [k/16] / [n/16] packed signs (pack_signs).

Each tile is a tail-biting ring of R = 256*K bits. Position p = 0..255 adds
D(p) new bits (step_bits); its 16-bit state is the ring window that ends at
E(p) = D(0) + ... + D(p), MSB-first, wrapping mod R. The ring is stored
MSB-first in little-endian uint32 words: word m = int16 pair (2m, 2m+1), ring
bit b = bit 31 - b%32 of word b//32 (exllamav3_ext/quant/pack.cu L36-56).
Position p sits at (tile_positions) row r(p), column c(p) of its tile, the
tensor-core B-fragment order (quantize.py L43-66).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from ...weights import WeightsError

TILE = 16  # a tile is TILE x TILE weights
PAD = 128  # k and n are zero-padded to multiples of this (and of the Hadamard block)
POSITIONS = TILE * TILE
STATE_BITS = 16
# Bits per weight EXL3 stores: 1..8, and the half rates of its fractional packer (MUL1 only,
# exllamav3_ext/quant/bits_k.cuh).
INTEGER_BITS = (1, 2, 3, 4, 5, 6, 7, 8)
HALF_BITS = (1.5, 2.5, 3.5)
SUPPORTED_BITS = tuple(sorted(INTEGER_BITS + HALF_BITS))
# Half rates give odd positions one extra bit (frac.cu L9-27).
_HALF_RATE_EXTRA = 0xAAAA
# Tiles unpacked per step: bounds the int64 temporaries (a few hundred MB at most).
_CHUNK_TILES = 1 << 13


def _check_bits(bits: float) -> float:
    if float(bits) not in SUPPORTED_BITS:
        raise ValueError(f"EXL3 stores {', '.join(f'{b:g}' for b in SUPPORTED_BITS)} bits per weight, not {bits:g}")
    return float(bits)


def bits_of_trellis(shape, key: str = "") -> float:
    """K of a trellis tensor, from its last dim (16*K words), the only place EXL3 keeps it."""
    shape = tuple(shape)
    name = f"{key}.trellis" if key else "an EXL3 trellis"
    if len(shape) != 3:
        raise WeightsError(f"{name} has shape {shape}; EXL3 stores [k/16, n/16, 16*bits]")
    words = shape[-1]
    bits = words / 16
    if bits not in SUPPORTED_BITS:
        raise WeightsError(f"{name} has {words} words per tile, which is not 16*K for a bit width EXL3 stores "
                         f"(K in {', '.join(f'{b:g}' for b in SUPPORTED_BITS)})")
    return bits


@lru_cache(maxsize=None)
def _step_bits(bits: float) -> torch.Tensor:
    base = int(bits)
    positions = torch.arange(POSITIONS, dtype=torch.int64)
    if bits == base:
        return torch.full((POSITIONS,), base, dtype=torch.int64)
    return base + ((_HALF_RATE_EXTRA >> (positions % 16)) & 1)


def step_bits(bits: float) -> torch.Tensor:
    """int64 [256]: D(p), the new ring bits position p adds (a shared table; clone before changing it)."""
    return _step_bits(_check_bits(bits))


@lru_cache(maxsize=None)
def _ring_ends(bits: float) -> torch.Tensor:
    return torch.cumsum(_step_bits(bits), 0)


@lru_cache(maxsize=None)
def _tile_positions() -> tuple[torch.Tensor, torch.Tensor]:
    p = torch.arange(POSITIONS, dtype=torch.int64)
    t, e = p // 8, p % 8
    rows = 2 * (t % 4) + (e & 1) + 8 * ((e >> 1) & 1)
    cols = t // 4 + 8 * (e >> 2)
    return rows, cols


def tile_positions() -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) int64 [256]: where position p of a tile's ring sits inside the 16x16 tile."""
    return _tile_positions()


def _words_to_u32(trellis: torch.Tensor) -> torch.Tensor:
    low = trellis[..., 0::2].to(torch.int64) & 0xFFFF
    high = trellis[..., 1::2].to(torch.int64) & 0xFFFF
    return low | (high << 16)


def _u32_to_words(u32: torch.Tensor) -> torch.Tensor:
    halves = torch.stack((u32 & 0xFFFF, (u32 >> 16) & 0xFFFF), dim=-1).flatten(-2)
    return torch.where(halves >= 1 << 15, halves - (1 << 16), halves).to(torch.int16)


def unpack_trellis(trellis: torch.Tensor, bits: float) -> torch.Tensor:
    """int16 [..., 16*K] -> int64 [..., 256]: the 16-bit state at every position of each tile's ring."""
    bits = _check_bits(bits)
    words = trellis.shape[-1]
    if words != round(16 * bits):
        raise ValueError(f"a {bits:g}-bit EXL3 trellis has {round(16 * bits)} words per tile, not {words}")
    ring = 16 * words
    device = trellis.device
    # The window of position p starts at ring bit E(p) - 16; it lies inside the 48 bits made of
    # the uint32 word that holds its start and the top half of the next word (wrapping).
    start = (_ring_ends(bits) - STATE_BITS) % ring
    first = (start // 32).to(device)
    second = ((first + 1) % (ring // 32)).to(device)
    shift = (32 - start % 32).to(device)
    leading = trellis.shape[:-1]
    flat = trellis.reshape(-1, words)
    states = torch.empty(flat.shape[0], POSITIONS, dtype=torch.int64, device=device)
    for begin in range(0, flat.shape[0], _CHUNK_TILES):
        u32 = _words_to_u32(flat[begin:begin + _CHUNK_TILES])
        window = (u32[:, first] << 16) | (u32[:, second] >> 16)
        states[begin:begin + _CHUNK_TILES] = (window >> shift) & 0xFFFF
    return states.reshape(*leading, POSITIONS)


@lru_cache(maxsize=None)
def _ring_sources(bits: float) -> tuple[torch.Tensor, torch.Tensor]:
    """For every ring bit b: the position whose symbol holds it and that bit's place in the state."""
    steps = _step_bits(bits)
    ends = torch.cumsum(steps, 0)
    position = torch.repeat_interleave(torch.arange(POSITIONS), steps)
    ring_bit = torch.arange(int(ends[-1]))
    # Symbol p fills ring bits [E(p) - D(p), E(p)) MSB-first: ring bit b holds state bit E(p) - 1 - b.
    return position, ends[position] - 1 - ring_bit


def pack_trellis(states: torch.Tensor, bits: float) -> torch.Tensor:
    """int [..., 256] 16-bit states in position order -> int16 [..., 16*K]: the low D(p) bits of each.

    The states of a valid trellis overlap (each is the previous shifted left by D(p) plus
    D(p) new bits, tail-biting); only their low bits are stored, so pack then unpack
    returns them exactly when they do."""
    bits = _check_bits(bits)
    if states.shape[-1] != POSITIONS:
        raise ValueError(f"an EXL3 tile has {POSITIONS} states, not {states.shape[-1]}")
    position, state_bit = (t.to(states.device) for t in _ring_sources(bits))
    ring = position.numel()
    leading = states.shape[:-1]
    flat = states.reshape(-1, POSITIONS).to(torch.int64)
    weights = torch.tensor([1 << (31 - i) for i in range(32)], dtype=torch.int64, device=states.device)
    out = torch.empty(flat.shape[0], ring // 16, dtype=torch.int16, device=states.device)
    for begin in range(0, flat.shape[0], _CHUNK_TILES):
        ring_bits = (flat[begin:begin + _CHUNK_TILES, position] >> state_bit) & 1
        u32 = (ring_bits.view(-1, ring // 32, 32) * weights).sum(-1)
        out[begin:begin + _CHUNK_TILES] = _u32_to_words(u32)
    return out.reshape(*leading, ring // 16)


def tiles_to_matrix(values: torch.Tensor) -> torch.Tensor:
    """[k/16, n/16, 256] in position order -> [k, n]: tile [i, j] covers rows 16i.., cols 16j.."""
    tiles_k, tiles_n = values.shape[0], values.shape[1]
    rows, cols = tile_positions()
    inverse = torch.empty(POSITIONS, dtype=torch.int64)
    inverse[rows * TILE + cols] = torch.arange(POSITIONS)
    row_major = values[..., inverse.to(values.device)]
    return row_major.view(tiles_k, tiles_n, TILE, TILE).transpose(1, 2).reshape(tiles_k * TILE, tiles_n * TILE)


def matrix_to_tiles(matrix: torch.Tensor) -> torch.Tensor:
    """[k, n] -> [k/16, n/16, 256] in position order (the inverse of tiles_to_matrix)."""
    k, n = matrix.shape
    if k % TILE or n % TILE:
        raise ValueError(f"an EXL3 matrix is whole 16x16 tiles, not {k}x{n}")
    rows, cols = tile_positions()
    tiles = matrix.reshape(k // TILE, TILE, n // TILE, TILE).transpose(1, 2).reshape(k // TILE, n // TILE, POSITIONS)
    return tiles[..., (rows * TILE + cols).to(matrix.device)]


# A layer's stored tensors (after its prefix), as ExLlamaV3 writes them; the loader keeps their dtypes.
SCALE_TENSORS = ("suh", "svh", "su", "sv")
MARKER_TENSORS = ("mcg", "mul1")
# Some writers keep a `.scale` that ExLlamaV3 never reads (modules/linear.py L445); loaded, then dropped.
IGNORED_TENSORS = ("scale",)
LAYER_TENSORS = ("trellis",) + SCALE_TENSORS + MARKER_TENSORS + IGNORED_TENSORS


def unpack_signs(words: torch.Tensor) -> torch.Tensor:
    """Legacy `.su`/`.sv`: int16 [m] -> fp16 [16m] of +-1; bit i of word j is element 16j+i, 1 meaning -1
    (exllamav3_ext/quant/pack.cu L188-213)."""
    bits = (words.to(torch.int32).unsqueeze(-1) >> torch.arange(16, device=words.device, dtype=torch.int32)) & 1
    return (1 - 2 * bits).flatten(-2).to(torch.float16)


def pack_signs(scales: torch.Tensor) -> torch.Tensor:
    """The inverse of unpack_signs: the signs of [16m] scales (negative -> 1) as int16 [m]."""
    if scales.shape[-1] % 16:
        raise ValueError(f"EXL3 packs signs 16 to a word, not {scales.shape[-1]}")
    bits = (scales < 0).to(torch.int32).view(*scales.shape[:-1], -1, 16)
    words = (bits << torch.arange(16, device=scales.device, dtype=torch.int32)).sum(-1)
    return torch.where(words >= 1 << 15, words - (1 << 16), words).to(torch.int16)


def check_layer_tensors(key: str, trellis: torch.Tensor | None, suh: torch.Tensor | None,
                        svh: torch.Tensor | None) -> float:
    """Refuse a layer whose trellis and scales (suh/svh, already unpacked from su/sv) disagree; its bits."""
    for name, tensor in (("trellis", trellis), ("suh (or su)", suh), ("svh (or sv)", svh)):
        if tensor is None:
            raise WeightsError(f"EXL3 layer {key} has no {name} tensor")
    if trellis.dtype != torch.int16:
        raise WeightsError(f"{key}.trellis is {trellis.dtype}; EXL3 stores int16")
    bits = bits_of_trellis(trellis.shape, key)
    k, n = trellis.shape[0] * TILE, trellis.shape[1] * TILE
    if k % PAD or n % PAD:
        raise WeightsError(f"{key}.trellis has shape {tuple(trellis.shape)}, a {k}x{n} weight; EXL3 pads both "
                         f"to multiples of {PAD}")
    for name, tensor, length in (("suh", suh, k), ("svh", svh, n)):
        if tuple(tensor.shape) != (length,):
            raise WeightsError(f"{key}.{name} has shape {tuple(tensor.shape)}, but {key}.trellis "
                             f"{tuple(trellis.shape)} holds a {k}x{n} weight, so it needs ({length},)")
    return bits
