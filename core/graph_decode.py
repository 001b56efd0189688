"""Decode as one CUDA graph per context bucket, replayed token after token.

Decoding one token launches a few hundred small kernels; from Python each
launch costs more than the kernel itself on a slow host, so the step is
captured once and replayed. A graph fixes every shape and address, so the step
reads the token and its position from device tensors: rope angles come from a
table, and attention reads a fixed-length prefix of the cache (the bucket),
hiding what lies past the position. The step is the model's own layers
(CausalLM.decode_step and the decode methods of its blocks, given a
decode_step.DecodeStep); this module owns what a graph needs around them: the
capture and replay per bucket, the static buffers (token, position, key mask,
rope tables), the choice of ops, and the slot tables and handoff buffers below.

A single row goes through the decode attention kernel (core/kernels/attention.cu),
which reads the position itself and also rotates the token and appends it to the
cache; several rows go through rope with the cache append, then SDPA with a mask.
Norms, rope with the cache append, and SwiGLU run as fused kernels
(core/kernels/fused.cu) or their torch twins, which compute what CausalLM.forward
computes. Where the next product is EXL2, the norm, SwiGLU or decode attention
before it also writes its output in the order that product reads its inputs in
(linear.input_slots), so no gather runs before the product. Where the products on
both sides of a norm or SwiGLU read that order, the piece runs in neither kernel
of its own: the product before writes its output summed with the residual, in the
next products' orders, with the row's sum of squares, and the product after
finishes the norm or SwiGLU while staging its inputs (kernels/handoff.py), two
kernel boundaries less a layer.

A batch of several rows decodes in lockstep (one shared position, as a
left-padded batch does): each row's key mask hides its padding, and rope with
the cache append runs as its torch twin, the fused kernel being batch-1.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .cache import KVCache
from .decode_step import DecodeStep, LayerRoutes, NormHandoff, SwigluHandoff
from .kernels import dispatch, reference
from .kernels.handoff import OutputRoute, StagedInput
from .linear import input_slots, share_input_weights
from .model import CausalLM, RMSNorm, allowed_keys

# Attention reads the cache prefix rounded up to this many positions: few graphs, little wasted reading.
BUCKET = 256
# QUANTLAB_CUDA_GRAPHS=0 decodes with plain launches, to bisect a wrong answer.
GRAPHS_SWITCH = "QUANTLAB_CUDA_GRAPHS"


def graphs_wanted(device: torch.device) -> bool:
    """Whether decoding on `device` replays CUDA graphs: on a GPU, unless QUANTLAB_CUDA_GRAPHS=0."""
    return device.type == "cuda" and os.environ.get(GRAPHS_SWITCH, "1") != "0"


@dataclass(frozen=True)
class Handoffs:
    """Per layer, the norm before q/k/v (None for the first layer, whose input is the embedding),
    the norm before gate/up and SwiGLU, each None where a side does not read slot order; then the
    final norm before the head. `squares` holds every norm's sums, zeroed at each step's start."""

    attention_norms: list[NormHandoff | None]
    mlp_norms: list[NormHandoff | None]
    swiglus: list[SwigluHandoff | None]
    head_norm: NormHandoff | None
    squares: torch.Tensor


class GraphDecoder:
    """Owns the static buffers and graphs of one (model, cache) pair; the cache's batch size is the graphs'.

    capture=False runs the same step with plain launches, on any device: a wrong answer then
    tells the step from its capture, and the CPU can check the step against CausalLM.forward."""

    def __init__(self, model: CausalLM, cache: KVCache, capture: bool = True):
        if capture and model.device.type != "cuda":
            raise ValueError("graph decoding needs the model on a CUDA device")
        self.model = model
        self.cache = cache
        self.capture = capture
        share_input_weights(model)
        device, dtype = model.device, model.dtype
        self.cos_table, self.sin_table = model.rotary(0, cache.max_seq_len, dtype)
        self.key_positions = torch.arange(cache.max_seq_len, device=device)
        self.batch = cache.batch_size
        self.tokens = torch.zeros(self.batch, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        # True = a real token; only left-padded batches hide anything (see set_key_mask).
        self.key_mask = torch.ones(self.batch, cache.max_seq_len, dtype=torch.bool, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        # The fused kernels where they are built (fp16), else their torch twins: the same step either way.
        built = dispatch.fused(self.tokens.new_empty(0, dtype=dtype))
        self.ops = built if built is not None else reference
        # One row with nothing masked but the future (and a sliding window): the decode attention
        # kernel, which takes the position from the device and rotates and appends the token's key
        # itself; else rope with the cache append, then SDPA with a mask. Its scratch holds a
        # running max, sum and weighted values per head and chunk of keys, and counts that start at 0.
        config = model.config
        self.attention_kernel = (built is not None and self.batch == 1 and config.head_dim % 8 == 0
                                 and config.head_dim <= 256)
        self.attention_scratch = (torch.zeros(built.decode_attention_scratch(config.num_heads, config.head_dim,
                                                                            cache.max_seq_len), device=device)
                                  if self.attention_kernel else None)
        # The norms and SwiGLU write their outputs in the order the next product reads them, where
        # that product has one (EXL2; see linear.input_slots): per layer, the tables of q/k/v,
        # gate/up and down, then those of the head.
        self.slots, self.head_slots = None, None
        if built is not None and built.rms_norm_takes_slots(config.hidden_size):
            self.slots = [(input_slots((layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj),
                                       self.batch),
                           input_slots((layer.mlp.gate_proj, layer.mlp.up_proj), self.batch),
                           input_slots((layer.mlp.down_proj,), self.batch)) for layer in model.model.layers]
            self.head_slots = input_slots((model.lm_head,), self.batch)
        # The decode attention kernel scatters its output into o_proj's slot order: per layer, each
        # input's slot, and a buffer that stays zero in the slots that have no input.
        self.o_slots = None
        if self.slots and self.attention_kernel:
            tables = [input_slots((layer.self_attn.o_proj,), 1) for layer in model.model.layers]
            if all(tables):
                self.o_slots = [(reference.slot_of_inputs(table), torch.zeros(1, table.numel(), dtype=dtype, device=device))
                                for table, in tables]
        self.handoffs = self._handoffs() if self.slots else None

    def _handoffs(self) -> Handoffs:
        model, batch, layers = self.model, self.batch, self.model.model.layers
        squares = torch.zeros(2 * len(layers) + 1, batch, dtype=torch.float32, device=model.device)

        def buffers(tables):  # zero where a slot has no input, and never written there
            return [torch.zeros(batch, table.numel(), dtype=model.dtype, device=model.device) for table in tables]

        def norm(producer, rms: RMSNorm, tables, site: int) -> NormHandoff | None:
            if not tables or input_slots((producer,), batch) is None:
                return None
            weights = [reference.slot_gather(rms.weight, table).view(-1) for table in tables]
            staged = StagedInput(norm_weight=weights, squares=squares[site], eps=rms.eps, hidden=rms.weight.numel())
            return NormHandoff(tuple(reference.slot_of_inputs(table) for table in tables), buffers(tables), staged)

        def swiglu(gate_up_tables, down_tables) -> SwigluHandoff | None:
            if not gate_up_tables or not down_tables:
                return None
            slot_of = (reference.slot_of_inputs(down_tables[0]),)
            gate, up = buffers(down_tables * 2)
            return SwigluHandoff(gate, up, (OutputRoute(slot_of=slot_of, slots_out=(gate,)),
                                            OutputRoute(slot_of=slot_of, slots_out=(up,))))

        attention_norms, mlp_norms, swiglus = [None], [], []
        for index, layer in enumerate(layers):
            _, gate_up_tables, down_tables = self.slots[index]
            mlp_norms.append(norm(layer.self_attn.o_proj, layer.post_attention_layernorm, gate_up_tables, 2 * index + 1))
            swiglus.append(swiglu(gate_up_tables, down_tables))
            if index + 1 < len(layers):
                attention_norms.append(norm(layer.mlp.down_proj, layers[index + 1].input_layernorm,
                                            self.slots[index + 1][0], 2 * index + 2))
        head_norm = norm(layers[-1].mlp.down_proj, model.model.norm, self.head_slots, 2 * len(layers))
        return Handoffs(attention_norms, mlp_norms, swiglus, head_norm, squares)

    def set_key_mask(self, key_mask: torch.Tensor) -> None:
        """Rows' real tokens [batch, n] (True = attend) for the first n positions; later positions are all real."""
        self.key_mask.fill_(True)
        self.key_mask[:, : key_mask.shape[1]].copy_(key_mask)
        if self.attention_kernel:  # it hides only the future; a masked row needs SDPA, so new graphs
            self.attention_kernel = False
            self.graphs.clear()

    @torch.inference_mode()
    def step(self, token: int, position: int) -> torch.Tensor:
        """Batch 1: float32 logits [vocab] of the token placed at `position`; the cache grows by one."""
        if self.batch != 1:
            raise ValueError(f"step() decodes one row; this decoder holds {self.batch} (use step_rows)")
        self.tokens.fill_(token)
        return self._replay(position)[0, 0].clone()  # the graph overwrites its output buffer on the next replay

    @torch.inference_mode()
    def step_rows(self, tokens: torch.Tensor, position: int) -> torch.Tensor:
        """float32 logits [batch, vocab] of one token per row (a device tensor [batch]) placed at `position`."""
        self.tokens.copy_(tokens.view(self.batch, 1))
        return self._replay(position)[:, 0].clone()

    def _replay(self, position: int) -> torch.Tensor:
        self.cache.check_room(position + 1)
        self.position.fill_(position)
        length = min(-(-(position + 1) // BUCKET) * BUCKET, self.cache.max_seq_len)
        if not self.capture:
            logits = self._forward(length)
        else:
            if length not in self.graphs:
                self.graphs[length] = self._capture(length)
            graph, logits = self.graphs[length]
            graph.replay()
        self.cache.length = position + 1
        return logits

    def _capture(self, length: int):
        # Warm-up on a side stream builds the kernels' tables and the allocator's blocks before capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(length)
        # The warm-up wrote this token's key and value at its position; the replay writes the same again.
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._forward(length)
        self.pool = graph.pool()
        return graph, logits

    def _mask(self, length: int) -> torch.Tensor:
        """SDPA's additive mask [batch, 1, 1, length], made once per step: with a boolean mask SDPA
        converts it again in every layer."""
        allowed = allowed_keys(self.position, self.key_positions[:length], self.model.config.sliding_window,
                               self.key_mask[:, :length])
        mask = torch.zeros(self.batch, 1, 1, length, dtype=self.model.dtype, device=allowed.device)
        return mask.masked_fill_(~allowed.view(self.batch, 1, 1, length), float("-inf"))

    def _layer_routes(self, in_slot_order: bool) -> list[LayerRoutes]:
        layers = self.model.model.layers
        handoffs = self.handoffs if in_slot_order else None
        routes = []
        for index in range(len(layers)):
            qkv_tables, gate_up_tables, down_tables = self.slots[index] if in_slot_order else (None, None, None)
            last = index + 1 == len(layers)
            routes.append(LayerRoutes(
                qkv_tables=qkv_tables, gate_up_tables=gate_up_tables, down_tables=down_tables,
                # set_key_mask may have turned the attention kernel off since o_slots was made.
                o_slots=self.o_slots[index] if in_slot_order and self.o_slots and self.attention_kernel else None,
                mlp_norm=handoffs.mlp_norms[index] if handoffs else None,
                swiglu=handoffs.swiglus[index] if handoffs else None,
                next_norm=(handoffs.head_norm if last else handoffs.attention_norms[index + 1]) if handoffs else None,
            ))
        return routes

    def _forward(self, length: int) -> torch.Tensor:
        # A graph captured where the quantized layers take the torch reference (dispatch.reference_only)
        # runs their own forward, which reads plain rows.
        in_slot_order = self.slots is not None and dispatch.enabled(self.model.device)
        step = DecodeStep(
            ops=self.ops, cache=self.cache, batch=self.batch, position=self.position, cos_table=self.cos_table,
            sin_table=self.sin_table, length=length, attention_kernel=self.attention_kernel,
            attention_scratch=self.attention_scratch, mask=None if self.attention_kernel else self._mask(length),
            # The fused rope with the cache append is batch-1.
            rope_cache=self.ops.rope_cache if self.batch == 1 else reference.rope_cache,
            layers=self._layer_routes(in_slot_order), head_tables=self.head_slots if in_slot_order else None,
        )
        if in_slot_order and self.handoffs:
            self.handoffs.squares.zero_()
        return self.model.decode_step(step, self.tokens)
