"""Decode as one CUDA graph per context bucket, replayed token after token.

Decoding one token launches a few hundred small kernels; from Python each
launch costs more than the kernel itself on a slow host, so the step is
captured once and replayed. A graph fixes every shape and address, so the step
here reads the token and its position from device tensors: rope angles come
from a table, and attention reads a fixed-length prefix of the cache (the
bucket), hiding what lies past the position. A single row goes through the
decode attention kernel (core/kernels/attention.cu), which reads the position
itself and also rotates the token and appends it to the cache; several rows go
through rope with the cache append, then SDPA with a mask. The model's linear
layers run as they are; norms, rope with the cache append, and SwiGLU run as
fused kernels (core/kernels/fused.cu) or their torch twins, which compute what
CausalLM.forward computes. Where the next product is EXL2, the norm, SwiGLU or
decode attention before it also writes its output in the order that product
reads its inputs in (linear.input_slots), so no gather runs before the product.
Where the products on both sides of a norm or SwiGLU read that order, the piece
runs in neither kernel of its own: the product before writes its output summed
with the residual, in the next products' orders, with the row's sum of squares,
and the product after finishes the norm or SwiGLU while staging its inputs
(kernels/handoff.py), two kernel boundaries less a layer.

A batch of several rows decodes in lockstep (one shared position, as a
left-padded batch does): each row's key mask hides its padding, and rope with
the cache append runs as its torch twin, the fused kernel being batch-1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .cache import KVCache
from .kernels import dispatch, reference
from .kernels.handoff import OutputRoute, StagedInput
from .linear import input_slots, project, project_slots, share_input_weights
from .model import CausalLM, RMSNorm

# Attention reads the cache prefix rounded up to this many positions: few graphs, little wasted reading.
BUCKET = 256
# QUANTLAB_CUDA_GRAPHS=0 decodes with plain launches, to bisect a wrong answer.
GRAPHS_SWITCH = "QUANTLAB_CUDA_GRAPHS"


def graphs_wanted(device: torch.device) -> bool:
    """Whether decoding on `device` replays CUDA graphs: on a GPU, unless QUANTLAB_CUDA_GRAPHS=0."""
    return device.type == "cuda" and os.environ.get(GRAPHS_SWITCH, "1") != "0"


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
    """Owns the static buffers and graphs of one (model, cache) pair; the cache's batch size is the graphs'."""

    def __init__(self, model: CausalLM, cache: KVCache):
        if model.device.type != "cuda":
            raise ValueError("graph decoding needs the model on a CUDA device")
        self.model = model
        self.cache = cache
        share_input_weights(model)
        device, dtype = model.device, model.dtype
        positions = torch.arange(cache.max_seq_len, device=device, dtype=torch.float32)
        angles = torch.outer(positions, model.inv_freq.float())
        angles = torch.cat((angles, angles), dim=-1)
        self.cos_table, self.sin_table = angles.cos().to(dtype), angles.sin().to(dtype)
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
        keys_seen = self.key_positions[:length]
        allowed = keys_seen <= self.position
        window = self.model.config.sliding_window
        if window:
            allowed = allowed & (keys_seen > self.position - window)
        # As core.model.attention_mask: a row always sees its own token, so no row is left with no key at all.
        allowed = (allowed & self.key_mask[:, :length]) | (keys_seen == self.position)
        mask = torch.zeros(self.batch, 1, 1, length, dtype=self.model.dtype, device=allowed.device)
        return mask.masked_fill_(~allowed.view(self.batch, 1, 1, length), float("-inf"))

    def _norm(self, x: torch.Tensor, norm, residual: torch.Tensor | None, tables: list[torch.Tensor] | None):
        """(x + residual, its norm, the norm in the next product's slot orders or None). With slot
        tables the sum is a new tensor (several blocks read x), else x updated in place."""
        if tables:
            x, h, *slots = self.ops.rms_norm_slots(x, norm.weight, norm.eps, residual, tables)
            return x, h, slots
        return x, self.ops.rms_norm(x, norm.weight, norm.eps, residual), None

    def _project(self, h: torch.Tensor | None, slots: list[torch.Tensor] | None, layers,
                 staged: StagedInput | None = None, routes=()) -> list[torch.Tensor | None]:
        """Rows h through the layers, or their input as a producer left it (slots, staged); routes as
        project_slots takes them."""
        if slots or routes:
            return project_slots(slots, layers, (self.batch, 1), staged, routes,
                                 x=None if slots else h.reshape(self.batch, -1))
        return project(h, layers)

    def _forward(self, length: int) -> torch.Tensor:
        model, cache, ops = self.model, self.cache, self.ops
        heads, kv_heads, dim = model.config.num_heads, model.config.num_kv_heads, model.config.head_dim
        batch = self.batch
        window = model.config.sliding_window
        mask = None if self.attention_kernel else self._mask(length)
        rope_cache = ops.rope_cache if batch == 1 else reference.rope_cache
        layers = model.model.layers
        # A graph captured where the quantized layers take the torch reference (dispatch.reference_only)
        # runs their own forward, which reads plain rows.
        in_slot_order = self.slots is not None and dispatch.enabled(model.device)
        slots = self.slots if in_slot_order else [(None, None, None)] * len(layers)
        handoffs = self.handoffs if in_slot_order else None
        if handoffs:
            handoffs.squares.zero_()
        x = model.model.embed_tokens(self.tokens)
        x, h, h_slots = self._norm(x, layers[0].input_layernorm, None, slots[0][0])
        staged = None  # a norm the next product finishes (h is None then)
        for index, layer in enumerate(layers):
            attn = layer.self_attn
            q, k, v = self._project(h, h_slots, (attn.q_proj, attn.k_proj, attn.v_proj), staged)
            key_buffer, value_buffer = cache.keys[attn.layer_index], cache.values[attn.layer_index]
            # set_key_mask may have turned the attention kernel off since o_slots was made.
            o_slots = self.o_slots[index] if in_slot_order and self.o_slots and self.attention_kernel else None
            if self.attention_kernel:
                out = ops.decode_attention(q.view(-1), k, v, self.cos_table, self.sin_table, self.position, key_buffer,
                                           value_buffer, length, window or 0, self.attention_scratch,
                                           *(o_slots or ())).view(batch, 1, -1)
            else:
                rope_cache(q, k, v, self.cos_table, self.sin_table, self.position, key_buffer, value_buffer)
                out = F.scaled_dot_product_attention(q.view(batch, 1, heads, dim).transpose(1, 2),
                                                     key_buffer[:, :, :length], value_buffer[:, :, :length],
                                                     attn_mask=mask, enable_gqa=heads != kv_heads)
                out = out.transpose(1, 2).reshape(batch, 1, -1)
            mlp = layer.mlp
            _, gate_up_tables, down_tables = slots[index]
            handoff = handoffs.mlp_norms[index] if handoffs else None
            if handoff:  # o_proj adds itself into x and writes that in gate and up's orders
                self._project(out, [o_slots[1]] if o_slots else None, (attn.o_proj,), routes=[handoff.route(x)])
                h, h_slots, staged = None, handoff.buffers, handoff.staged
            else:
                o = self._project(out, [o_slots[1]] if o_slots else None, (attn.o_proj,))[0]
                x, h, h_slots = self._norm(x, layer.post_attention_layernorm, o, gate_up_tables)  # x + o, then the norm
                staged = None
            swiglu = handoffs.swiglus[index] if handoffs else None
            gate, up = self._project(h, h_slots, (mlp.gate_proj, mlp.up_proj), staged, swiglu.routes if swiglu else ())
            if swiglu:
                down_in, down_staged = [swiglu.gate], swiglu.staged
            elif down_tables:
                down_in, down_staged = [ops.silu_mul_slots(gate, up, down_tables[0])], None
            else:
                down_in, down_staged = None, None
            last = index + 1 == len(layers)
            handoff = (handoffs.head_norm if last else handoffs.attention_norms[index + 1]) if handoffs else None
            if handoff:  # down adds itself into x and writes that in the next products' orders
                self._project(None, down_in, (mlp.down_proj,), down_staged, [handoff.route(x)])
                h, h_slots, staged = None, handoff.buffers, handoff.staged
                continue
            if down_in:
                d = self._project(None, down_in, (mlp.down_proj,), down_staged)[0]
            else:
                d = mlp.down_proj(ops.silu_mul(gate, up))
            next_norm = model.model.norm if last else layers[index + 1].input_layernorm
            next_tables = (self.head_slots if in_slot_order else None) if last else slots[index + 1][0]
            x, h, h_slots = self._norm(x, next_norm, d, next_tables)
            staged = None
        return self._project(h, h_slots, (model.lm_head,), staged)[0].float()
