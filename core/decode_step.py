"""What one decode step hands the model's layers besides their weights (CausalLM.decode_step).

The graph decoder (core/graph_decode.py) captures a step that must fix every shape and
address, so the layers read the token's position from a device tensor, rope angles from
tables, and a fixed bucket of cache positions; the ops are the fused kernels or their torch
twins. Where a product reads its input in an order of its own (EXL2, linear.input_slots), the
piece before it writes that order, or the product before hands the piece over whole
(kernels/handoff.py): the tables and handoff buffers for that are planned once by the
decoder and reach each layer as its LayerRoutes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from .cache import KVCache
from .kernels.handoff import OutputRoute, StagedInput
from .linear import project, project_slots


@dataclass(frozen=True)
class NormHandoff:
    """A norm that the product before it (o_proj or down) hands to the products after it: the
    product writes x + its output into `buffers` (one per consumer, in its slot order) and each
    row's sum of squares into staged.squares; the consumers stage `staged`."""

    slot_of: tuple[torch.Tensor, ...]
    buffers: list[torch.Tensor]
    staged: StagedInput

    def route(self, residual: torch.Tensor) -> OutputRoute:
        return OutputRoute(residual=residual, slot_of=self.slot_of, slots_out=tuple(self.buffers),
                           squares=self.staged.squares)


@dataclass(frozen=True)
class SwigluHandoff:
    """SwiGLU that gate and up hand to down: each writes its output in down's slot order."""

    gate: torch.Tensor
    up: torch.Tensor
    routes: tuple[OutputRoute, OutputRoute]

    @property
    def staged(self) -> StagedInput:
        return StagedInput(up=[self.up])


@dataclass(frozen=True)
class LayerRoutes:
    """How one layer's products meet their inputs in this step. Tables: the slot orders of the
    products after the input norm (q/k/v), after the post-attention norm (gate/up) and after
    SwiGLU (down); None where they read plain rows. o_slots: (slot of each input, buffer) in which
    the decode attention kernel writes o_proj's input. Handoffs: the norm after o_proj, SwiGLU,
    and the norm after down (the next layer's input norm or the final norm); None where that piece
    runs as a kernel of its own."""

    qkv_tables: list[torch.Tensor] | None = None
    gate_up_tables: list[torch.Tensor] | None = None
    down_tables: list[torch.Tensor] | None = None
    o_slots: tuple[torch.Tensor, torch.Tensor] | None = None
    mlp_norm: NormHandoff | None = None
    swiglu: SwigluHandoff | None = None
    next_norm: NormHandoff | None = None


@dataclass(frozen=True)
class ProductInput:
    """The input of the products after a norm, SwiGLU or attention: plain rows, or written in the
    products' slot orders (slots), or there still to be finished by them while staging (staged)."""

    rows: torch.Tensor | None = None
    slots: list[torch.Tensor] | None = None
    staged: StagedInput | None = None


@dataclass(frozen=True)
class StepRows:
    """The rows between two blocks: the residual stream x, and the last block's output, either not
    yet added (`pending`: the next norm adds it) or already added by its product, which also wrote
    the next products' input for them to finish the norm (`handed`)."""

    x: torch.Tensor
    pending: torch.Tensor | None = None
    handed: NormHandoff | None = None


@dataclass(frozen=True)
class DecodeStep:
    """One token per row, every row at the device-held `position`; attention reads the first
    `length` cache positions. With `attention_kernel`, one row runs the decode attention kernel
    (rope, cache append and attention in one launch, the future hidden by the kernel); else
    `rope_cache`, then SDPA with the additive `mask` [batch, 1, 1, length]."""

    ops: Any  # the built kernels (core/kernels/fused.cu) or core.kernels.reference: the same arguments
    cache: KVCache
    batch: int
    position: torch.Tensor
    cos_table: torch.Tensor
    sin_table: torch.Tensor
    length: int
    attention_kernel: bool
    attention_scratch: torch.Tensor | None
    mask: torch.Tensor | None
    rope_cache: Callable
    layers: list[LayerRoutes]
    head_tables: list[torch.Tensor] | None

    def project(self, source: ProductInput, layers: tuple, routes=()) -> list[torch.Tensor | None]:
        """project() of the rows through the layers, or of their input as the piece before left it
        (slots, staged); routes as project_slots takes them."""
        if source.slots or routes:
            return project_slots(source.slots, layers, (self.batch, 1), source.staged, routes,
                                 x=None if source.slots else source.rows.reshape(self.batch, -1))
        return project(source.rows, layers)
