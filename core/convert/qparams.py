"""Quantization settings of one matrix, the candidates the measurement pass tries,
and the exact number of bits a setting costs once written.

A setting splits a matrix's input rows (in act-order, most salient first) into
parts, each with its own bit width and group size, as ExLlamaV2's QParams does
(exllamav2/conversion/qparams.py, 0.3.2). Our measurement.json stores settings
in the same JSON shape as theirs, so either tool can read the other's file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from core.formats.exl2.layout import SCALE_BITS, SUPPORTED_BITS, packed_rows, padded_columns

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class QuantSetting:
    """parts: (bits, proportion of rows, group size) from the most salient rows down."""

    parts: tuple[tuple[int, float, int], ...]
    scale_bits: int = SCALE_BITS

    def __post_init__(self):
        parts = tuple((int(b), float(p), int(g)) for b, p, g in self.parts)
        object.__setattr__(self, "parts", parts)
        if not parts:
            raise ValueError("a setting needs at least one part")
        if self.scale_bits != SCALE_BITS:
            raise ValueError(f"EXL2 stores {SCALE_BITS}-bit scales, not {self.scale_bits}")
        widths = [b for b, _, _ in parts]
        # ExLlamaV2's loader walks q_weight as 8-, 6-, 5-, 4-, 3-, then 2-bit rows
        # (shuffle_kernel in q_matrix.cu), so the widths must strictly decrease.
        if widths != sorted(set(widths), reverse=True):
            raise ValueError(f"bit widths must strictly decrease, got {widths}")
        for bits, proportion, group_size in parts:
            if bits not in SUPPORTED_BITS:
                raise ValueError(f"unsupported bit width {bits}")
            if proportion <= 0:
                raise ValueError(f"proportion of {bits}-bit rows must be positive")
            # The kernels step through rows 32 at a time; 2-bit words hold 16 codes,
            # so 2-bit groups may be 16 rows (comment above the candidates in qparams.py).
            if group_size <= 0 or group_size % (16 if bits == 2 else 32):
                raise ValueError(f"group size {group_size} not allowed for {bits}-bit rows")
        if abs(sum(p for _, p, _ in parts) - 1.0) > 1e-6:
            raise ValueError(f"proportions sum to {sum(p for _, p, _ in parts)}, not 1")

    def to_dict(self) -> dict:
        """ExLlamaV2's QParams dict: group size keyed by bit width, widths and their shares."""
        return {
            "group_size": {b: g for b, _, g in self.parts},
            "bits": [b for b, _, _ in self.parts],
            "bits_prop": [p for _, p, _ in self.parts],
            "scale_bits": self.scale_bits,
        }

    @staticmethod
    def from_dict(qparams: dict) -> "QuantSetting":
        bits = [int(b) for b in qparams["bits"]]
        group_size = qparams["group_size"]
        # JSON turns the width keys into strings; older files hold one size or a list.
        if isinstance(group_size, dict):
            sizes = {int(b): int(g) for b, g in group_size.items()}
        elif isinstance(group_size, list):
            sizes = dict(zip(bits, (int(g) for g in group_size)))
        else:
            sizes = {b: int(group_size) for b in bits}
        return QuantSetting(
            tuple((b, float(p), sizes[b]) for b, p in zip(bits, qparams["bits_prop"])),
            int(qparams.get("scale_bits", SCALE_BITS)),
        )

    def describe(self) -> str:
        return "/".join(f"{p}:{b}b_{g}g" for b, p, g in self.parts) + f" s{self.scale_bits}"


def group_layout(setting: QuantSetting, rows: int) -> list[tuple[int, int]]:
    """(bits, rows) of every group, in the order they are stored.

    Each part gets whole groups covering at least its share of the rows, so
    the higher widths round up and the last part shrinks; the final group is
    cut at the matrix edge. Same arithmetic as AdaptiveGPTQ.configure() in
    ExLlamaV2, float expression included, so both pick the same groups.
    """
    groups_per_part = []
    remaining = rows
    for bits, proportion, group_size in setting.parts:
        count = max(0, math.ceil(min(rows * proportion, remaining) / group_size))
        groups_per_part.append(count)
        remaining -= count * group_size
    if remaining > 0:
        # Only reachable when proportions sum to a hair under 1; ExLlamaV2 would assert.
        last_size = setting.parts[-1][2]
        groups_per_part[-1] += math.ceil(remaining / last_size)
    layout = []
    row = 0
    for (bits, _, group_size), count in zip(setting.parts, groups_per_part):
        for _ in range(count):
            size = min(group_size, rows - row)
            if size <= 0:
                break
            layout.append((bits, size))
            row += size
    return layout


def setting_bits(setting: QuantSetting, rows: int, cols: int) -> int:
    """Bits the stored tensors take for a matrix of `rows` inputs and `cols` outputs.

    Counts what the writer emits: q_weight with each group rounded up to whole
    int32 rows and columns padded to 32, q_scale, q_scale_max (fp16), q_groups
    (two int16 per group) and q_invperm (int32 per input). ExLlamaV2's own
    total_bits() skips the two roundings; on shapes with in_features and
    out_features multiples of 32 both agree.
    """
    layout = group_layout(setting, rows)
    width = padded_columns(cols)
    groups = len(layout)
    weight_bits = sum(packed_rows(r, b) for b, r in layout) * 32 * width
    return weight_bits + groups * width * SCALE_BITS + groups * 16 + groups * 2 * 16 + rows * 32


def setting_bpw(setting: QuantSetting, rows: int, cols: int) -> float:
    return setting_bits(setting, rows, cols) / (rows * cols)


def _setting(*parts: tuple[int, float, int]) -> QuantSetting:
    return QuantSetting(tuple(parts))


def _uniform(bits: int, group_size: int) -> QuantSetting:
    return _setting((bits, 1.0, group_size))


# Candidate settings per module group, from about 2.1 to 8 bits per weight.
# Values follow qparams_attn / qparams_mlp / qparams_headoptions in ExLlamaV2
# 0.3.2 so that our measurements and bit budgets are comparable with theirs.
# v_proj and down_proj get more bits: their errors reach the residual stream
# most directly.


def _attention(q: QuantSetting, k: QuantSetting, v: QuantSetting, o: QuantSetting) -> dict[str, QuantSetting]:
    return dict(zip(ATTENTION_MODULES, (q, k, v, o)))


def _mlp(gate: QuantSetting, up: QuantSetting, down: QuantSetting) -> dict[str, QuantSetting]:
    return dict(zip(MLP_MODULES, (gate, up, down)))


_3_2_05 = _setting((3, 0.05, 64), (2, 0.95, 64))
_3_2_10 = _setting((3, 0.1, 64), (2, 0.9, 64))
_3_2_25 = _setting((3, 0.25, 64), (2, 0.75, 64))
_3_2_30 = _setting((3, 0.3, 64), (2, 0.7, 64))
_4_3_g128 = _setting((4, 0.1, 128), (3, 0.9, 128))
_4_3_g64 = _setting((4, 0.1, 64), (3, 0.9, 64))
_5_4_g128 = _setting((5, 0.1, 128), (4, 0.9, 128))
_5_4_g64 = _setting((5, 0.1, 64), (4, 0.9, 64))
_5_4_g32 = _setting((5, 0.1, 32), (4, 0.9, 32))
_6_5_g128 = _setting((6, 0.1, 128), (5, 0.9, 128))
_6_5_g32 = _setting((6, 0.1, 32), (5, 0.9, 32))

# Beyond ExLlamaV2's lists: one all-2-bit, 128-row-group floor per module group, so
# targets down to about 2.1 bpw stay reachable (2.08 on the demo model; ExLlamaV2 stops near 2.3 there).
_2_g128 = _uniform(2, 128)

ATTENTION_CANDIDATES: tuple[dict[str, QuantSetting], ...] = (
    _attention(_2_g128, _2_g128, _2_g128, _2_g128),
    _attention(_3_2_05, _3_2_05, _3_2_05, _3_2_05),
    _attention(_3_2_10, _3_2_10, _3_2_25, _3_2_10),
    _attention(_3_2_10, _3_2_10, _4_3_g128, _3_2_10),
    _attention(_3_2_10, _3_2_10, _4_3_g128, _4_3_g128),
    _attention(_4_3_g128, _4_3_g128, _4_3_g128, _4_3_g128),
    _attention(_4_3_g128, _4_3_g128, _4_3_g64, _4_3_g128),
    _attention(_uniform(4, 128), _uniform(4, 128), _uniform(4, 128), _uniform(4, 128)),
    _attention(_uniform(4, 128), _uniform(4, 128), _uniform(4, 64), _uniform(4, 128)),
    _attention(_uniform(4, 64), _uniform(4, 64), _uniform(4, 32), _uniform(4, 64)),
    _attention(_uniform(4, 32), _uniform(4, 32), _uniform(4, 32), _uniform(4, 32)),
    _attention(_5_4_g128, _5_4_g128, _5_4_g64, _5_4_g128),
    _attention(_5_4_g64, _5_4_g64, _5_4_g32, _5_4_g64),
    _attention(_5_4_g64, _5_4_g64, _uniform(5, 64), _5_4_g64),
    _attention(_5_4_g32, _5_4_g32, _uniform(5, 32), _5_4_g32),
    _attention(_6_5_g128, _6_5_g128, _uniform(6, 128), _6_5_g128),
    _attention(_6_5_g32, _6_5_g32, _uniform(6, 32), _6_5_g32),
    _attention(_uniform(6, 128), _uniform(6, 128), _uniform(6, 128), _uniform(6, 128)),
    _attention(_uniform(6, 32), _uniform(6, 32), _uniform(8, 32), _uniform(6, 32)),
    _attention(_uniform(8, 128), _uniform(8, 128), _uniform(8, 128), _uniform(8, 128)),
)

_down_6_3_2 = _setting((6, 0.05, 32), (3, 0.2, 64), (2, 0.75, 64))
_down_8_4_3_g128 = _setting((8, 0.05, 32), (4, 0.1, 128), (3, 0.85, 128))
_down_8_4_3_g32 = _setting((8, 0.05, 32), (4, 0.1, 32), (3, 0.85, 32))
_down_8_4_g128 = _setting((8, 0.05, 32), (4, 0.95, 128))
_down_8_5_4_g128 = _setting((8, 0.05, 32), (5, 0.1, 128), (4, 0.85, 128))
_down_8_5_4_g32 = _setting((8, 0.05, 32), (5, 0.1, 32), (4, 0.85, 32))
_down_8_6_5_g128 = _setting((8, 0.05, 32), (6, 0.1, 128), (5, 0.85, 128))
_down_8_6_5_g32 = _setting((8, 0.05, 32), (6, 0.1, 32), (5, 0.85, 32))
_8_6_10 = _setting((8, 0.1, 128), (6, 0.9, 128))

MLP_CANDIDATES: tuple[dict[str, QuantSetting], ...] = (
    _mlp(_2_g128, _2_g128, _2_g128),
    _mlp(_3_2_05, _3_2_05, _down_6_3_2),
    _mlp(_3_2_10, _3_2_25, _down_6_3_2),
    _mlp(_3_2_10, _3_2_30, _setting((5, 0.05, 32), (3, 0.95, 32))),
    _mlp(_3_2_10, _3_2_30, _setting((5, 0.05, 32), (4, 0.95, 32))),
    _mlp(_4_3_g128, _setting((4, 0.25, 128), (3, 0.75, 128)), _down_8_4_3_g128),
    _mlp(_setting((4, 0.1, 32), (3, 0.9, 32)), _setting((4, 0.25, 32), (3, 0.75, 32)), _down_8_4_3_g32),
    _mlp(_setting((4, 0.1, 32), (3, 0.9, 32)), _setting((4, 0.25, 32), (3, 0.75, 32)), _down_8_4_g128),
    _mlp(_uniform(4, 128), _uniform(4, 32), _down_8_4_g128),
    _mlp(_uniform(4, 32), _uniform(4, 32), _setting((8, 0.05, 32), (4, 0.95, 32))),
    _mlp(_5_4_g128, _setting((5, 0.25, 128), (4, 0.75, 128)), _down_8_5_4_g128),
    _mlp(_5_4_g32, _setting((5, 0.25, 32), (4, 0.75, 32)), _down_8_5_4_g32),
    _mlp(_6_5_g128, _setting((6, 0.25, 128), (5, 0.75, 128)), _down_8_6_5_g128),
    _mlp(_6_5_g32, _setting((6, 0.25, 32), (5, 0.75, 32)), _down_8_6_5_g32),
    _mlp(_uniform(6, 128), _uniform(6, 128), _setting((8, 0.05, 32), (6, 0.95, 128))),
    _mlp(_8_6_10, _8_6_10, _setting((8, 0.15, 128), (6, 0.85, 128))),
    _mlp(_8_6_10, _8_6_10, _uniform(8, 128)),
    _mlp(_uniform(8, 128), _uniform(8, 128), _uniform(8, 128)),
)

# lm_head settings by nominal bits (the converter's head_bits option; 6 by default).
HEAD_OPTIONS: dict[int, QuantSetting] = {
    2: _setting((4, 0.3, 32), (2, 0.7, 32)),
    3: _setting((4, 0.15, 32), (3, 0.85, 32)),
    4: _setting((6, 0.15, 32), (4, 0.85, 32)),
    5: _setting((6, 0.15, 128), (5, 0.85, 128)),
    6: _setting((8, 0.15, 128), (6, 0.85, 128)),
    8: _uniform(8, 128),
}


def all_candidate_settings() -> list[QuantSetting]:
    """Every distinct setting any module group or the head may get."""
    seen: dict[QuantSetting, None] = {}
    for candidate in (*ATTENTION_CANDIDATES, *MLP_CANDIDATES):
        for setting in candidate.values():
            seen.setdefault(setting)
    for setting in HEAD_OPTIONS.values():
        seen.setdefault(setting)
    return list(seen)
