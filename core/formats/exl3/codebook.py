"""The three EXL3 codebooks: each maps a 16-bit trellis state to one fp16 value.

Facts from ExLlamaV3 1.6.5 (exllamav3_ext/quant/codebook.cuh; ../shared/EXL3.md
section 2). Every value is the result of fp16 arithmetic with one rounding, so
the tables here are built in wider floats and rounded once, which gives the
same bits: the products involved are exact in float64.

A tensor says which codebook it uses by a marker tensor beside its trellis
(`<key>.mcg` or `<key>.mul1`, an int32 scalar holding the multiplier); no
marker means 3INST.
"""

from __future__ import annotations

from functools import lru_cache

import torch

CODEBOOKS = ("3inst", "mcg", "mul1")
STATE_BITS = 16
STATES = 1 << STATE_BITS

# The multipliers, as the markers store them (bit-cast to int32).
MCG_MULTIPLIER = 0xCBAC1FED
MUL1_MULTIPLIER = 0x83DCD12D
MARKERS = {"mcg": MCG_MULTIPLIER, "mul1": MUL1_MULTIPLIER}

# 3INST's constants (QTIP's "3INST" code, as ExLlamaV3 uses them).
_LCG_A, _LCG_B = 89226354, 64248484
_MASK, _XOR = 0x8FFF8FFF, 0x3B603B60
# MUL1: fp16 fma(h, 0x1EEE, 0xC931), h = 1024 + byte sum.
_MUL1_SCALE = 0.00676727294921875  # fp16 bits 0x1EEE
_MUL1_OFFSET = -10.3828125  # fp16 bits 0xC931


def _unsigned16_as_int16(values: torch.Tensor) -> torch.Tensor:
    return torch.where(values >= 1 << 15, values - (1 << 16), values).to(torch.int16)


@lru_cache(maxsize=None)
def _table(name: str) -> torch.Tensor:
    states = torch.arange(STATES, dtype=torch.int64)
    if name == "3inst":
        words = (states * _LCG_A + _LCG_B) & 0xFFFFFFFF
    elif name == "mcg":
        words = (states * MCG_MULTIPLIER) & 0xFFFFFFFF
    elif name == "mul1":
        words = (states * MUL1_MULTIPLIER) & 0xFFFFFFFF
        byte_sum = sum((words >> shift) & 0xFF for shift in (0, 8, 16, 24))
        h = (1024 + byte_sum).double()  # exactly fp16 0x6400 + byte_sum, as the kernel builds it
        return (h * _MUL1_SCALE + _MUL1_OFFSET).to(torch.float16)  # exact in float64, then one rounding: the fma
    else:
        raise ValueError(f"unknown EXL3 codebook {name!r}; known: {', '.join(CODEBOOKS)}")
    words = (words & _MASK) ^ _XOR
    low = _unsigned16_as_int16(words & 0xFFFF)
    high = _unsigned16_as_int16((words >> 16) & 0xFFFF)
    total = low.view(torch.float16).float() + high.view(torch.float16).float()
    return total.to(torch.float16)


def codebook_values(name: str) -> torch.Tensor:
    """fp16 [65536]: the value each 16-bit state decodes to (a read-only shared table; clone before changing it)."""
    return _table(name)


def codebook_of_marker(marker: torch.Tensor | None, key: str = "") -> str:
    """The codebook a tensor's marker names: None (no marker) is 3INST; an unknown value is refused."""
    if marker is None:
        return "3inst"
    value = int(marker.reshape(-1)[0].item()) & 0xFFFFFFFF
    for name, multiplier in MARKERS.items():
        if value == multiplier:
            return name
    raise ValueError(f"{key or 'an EXL3 tensor'} names an unknown codebook (marker 0x{value:08X}); "
                     "quantlab reads the 3INST, MCG and MUL1 codebooks of ExLlamaV3 1.6")


def marker_tensor(name: str) -> torch.Tensor:
    """The int32 scalar that marks a tensor as using codebook `name` (MCG or MUL1; 3INST has none)."""
    value = MARKERS[name]
    return torch.tensor(value - (1 << 32) if value >= 1 << 31 else value, dtype=torch.int32)


def codebook_of_layer(key: str, markers: dict[str, torch.Tensor | None]) -> str:
    """The codebook of layer `key` from its marker tensors (name -> tensor or None): none is 3INST;
    a marker must hold its own multiplier."""
    present = {name: tensor for name, tensor in markers.items() if tensor is not None}
    if len(present) > 1:
        raise ValueError(f"EXL3 layer {key} has both {' and '.join(f'{key}.{name}' for name in sorted(present))}; "
                         "a layer has at most one codebook marker")
    if not present:
        return "3inst"
    (name, marker), = present.items()
    named = codebook_of_marker(marker, f"{key}.{name}")
    if named != name:
        raise ValueError(f"{key}.{name} holds the {named.upper()} multiplier, not {name.upper()}'s; "
                         "the marker's name and value disagree")
    return name
