"""The lowest bpw a model can reach, from its config.json alone.

Every module group's cheapest candidate still pays for its scales and the
act-order permutation, so narrow models cannot go as low as 2 bits. Knowing
the floor from the config lets a conversion refuse an unreachable target
before it downloads weights or writes calibration text.
"""

from __future__ import annotations

import math
from fractions import Fraction

from ..config import ModelConfig
from .measure import CANDIDATES
from .qparams import ATTENTION_MODULES, MLP_MODULES, setting_bits


class TargetBelowFloorError(ValueError):
    """The target bpw is below what the format can reach for this model."""


def linear_shapes(config: ModelConfig) -> dict[str, dict[str, tuple[int, int]]]:
    """(in_features, out_features) of each linear in one decoder layer, by module group."""
    hidden, inner = config.hidden_size, config.intermediate_size
    q_size, kv_size = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    attention = dict(zip(ATTENTION_MODULES, ((hidden, q_size), (hidden, kv_size), (hidden, kv_size), (q_size, hidden))))
    mlp = dict(zip(MLP_MODULES, ((hidden, inner), (hidden, inner), (inner, hidden))))
    return {"self_attn": attention, "mlp": mlp}


def lowest_bpw(config: ModelConfig) -> float:
    """The bpw of every module at its cheapest candidate, rounded up to 1/1000."""
    cheapest_bits = weights = 0
    for group, shapes in linear_shapes(config).items():
        cheapest_bits += min(
            sum(setting_bits(setting, *shapes[name]) for name, setting in candidate.items())
            for candidate in CANDIDATES[group]
        )
        weights += sum(rows * cols for rows, cols in shapes.values())
    # Every layer has the same shapes, so one layer's ratio is the model's.
    return math.ceil(Fraction(cheapest_bits, weights) * 1000) / 1000


def refuse_below_floor(config: ModelConfig, bpw: float, output_format: str = "exl2") -> None:
    if output_format != "exl2":
        return  # EXL3 counts K bits per weight and nothing else, so its floor is its lowest K for every model (targets.py)
    lowest = lowest_bpw(config)
    if bpw < lowest:
        raise TargetBelowFloorError(
            f"target {bpw} bpw is below {lowest:.3f} bpw, the lowest this model can reach "
            "(scales and the act-order permutation cost bits on top of 2-bit codes, more so for narrow layers)"
        )
