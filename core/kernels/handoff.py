"""What one kernel of the decode step leaves to the EXL2 product after it.

A norm or SwiGLU between two products is a kernel of its own, and every kernel
boundary of the step costs a few microseconds of drain and ramp. So the product
before such a piece can write its output already summed with the residual, in
the next product's slot orders, with each row's sum of squares; and the next
product finishes the piece while it stages its inputs (RMSNorm's scale and
weight, or SwiGLU). reference.staged_input and reference.routed_output are the
torch twins of the two halves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Consumers one product writes for (exl2.h, EXL2_ROUTES_MOST): q, k and v.
ROUTES_MOST = 3


@dataclass(frozen=True)
class StagedInput:
    """What a product makes of its inputs (x_slots, one per layer) while staging them.

    SwiGLU: x_slots hold gate and `up[i]` holds up, both in layer i's slot order; the input is
    fp16(silu(gate)) * up. RMSNorm: x_slots hold the rows before the norm, whose sums of squares
    the producer added into `squares` [rows]; `norm_weight[i]` is the norm's weight in layer
    i's slot order (zero where a slot has no input); the input is the norm's output."""

    up: list[torch.Tensor] | None = None
    norm_weight: list[torch.Tensor] | None = None
    squares: torch.Tensor | None = None
    eps: float = 0.0
    hidden: int = 0


@dataclass(frozen=True)
class OutputRoute:
    """Where one layer's product goes instead of a tensor of its own.

    With `residual` [rows, out_features], fp16(product + residual) is written back into it. The
    result is also written in up to three consumers' slot orders (slots_out[t] [rows, slots],
    column c at slot slot_of[t][c], from reference.slot_of_inputs), and each row's sum of squares
    of it added into `squares` [rows] (fp32) where given."""

    residual: torch.Tensor | None = None
    slot_of: tuple[torch.Tensor, ...] = ()
    slots_out: tuple[torch.Tensor, ...] = ()
    squares: torch.Tensor | None = None

    def __post_init__(self):
        if len(self.slot_of) != len(self.slots_out) or len(self.slot_of) > ROUTES_MOST:
            raise ValueError(f"an output route takes one slot_of per slots_out, at most {ROUTES_MOST} consumers "
                             f"(got {len(self.slot_of)} and {len(self.slots_out)})")
