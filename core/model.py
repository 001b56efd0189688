"""The decoder-only transformer shared by Llama, Mistral and Qwen2.

Module names mirror the HF checkpoints (`model.layers.N.self_attn.q_proj`, ...)
so a safetensors key is also the path of the parameter it fills, for dense and
quantized files alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache
from .config import ModelConfig
from .decode_step import DecodeStep, LayerRoutes, ProductInput, StepRows
from .kernels import dispatch
from .linear import DenseLinear, project
from .rope import rope_inverse_frequencies, rotate_half


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(size, device=device, dtype=dtype), requires_grad=False)

    def decode_input(self, ops, rows: StepRows, tables: list[torch.Tensor] | None) -> tuple[torch.Tensor, ProductInput]:
        """A decode step's (x + the pending output, this norm of it as the next products read it).
        With slot tables the sum is a new tensor (several blocks read x), else x updated in place."""
        if rows.handed is not None:
            return rows.x, ProductInput(slots=rows.handed.buffers, staged=rows.handed.staged)
        if tables:
            x, h, *slots = ops.rms_norm_slots(rows.x, self.weight, self.eps, rows.pending, tables)
            return x, ProductInput(rows=h, slots=slots)
        return rows.x, ProductInput(rows=ops.rms_norm(rows.x, self.weight, self.eps, rows.pending))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernels = dispatch.fused(x)
        if kernels is not None:  # one launch instead of seven, rounding where this code rounds
            return kernels.rms_norm(x.contiguous(), self.weight, self.eps)
        # Normalise in float32 whatever the storage dtype: fp16 sums of squares overflow.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int, device=None, dtype=None):
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.sliding_window = config.sliding_window
        qkv_bias = config.attention_bias or config.qkv_bias
        hidden, q_size, kv_size = config.hidden_size, config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        self.q_proj = DenseLinear(hidden, q_size, qkv_bias, device, dtype)
        self.k_proj = DenseLinear(hidden, kv_size, qkv_bias, device, dtype)
        self.v_proj = DenseLinear(hidden, kv_size, qkv_bias, device, dtype)
        self.o_proj = DenseLinear(q_size, hidden, config.attention_bias, device, dtype)

    def forward(self, x, cos, sin, cache: KVCache | None, position: int, key_mask=None) -> torch.Tensor:
        batch, seq, _ = x.shape
        q, k, v = project(x, (self.q_proj, self.k_proj, self.v_proj))
        kernels = dispatch.fused(x) if cache is not None and cache.batch_size == 1 else None
        if kernels is not None:
            # Rope and the cache write as one kernel: a dozen launches per layer in a long prompt.
            q = q.contiguous()
            keys, values = cache.keys[self.layer_index], cache.values[self.layer_index]
            kernels.rope_cache_rows(q, k.contiguous(), v.contiguous(), cos, sin, position, keys, values)
            q = q.view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
            k, v = keys[:, :, : position + seq], values[:, :, : position + seq]
        else:
            q = q.view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
            k = k.view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
            v = v.view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            if cache is not None:
                k, v = cache.update(self.layer_index, position, k, v)
        # A prompt from position 0 with nothing else masked is plain causal
        # attention: is_causal lets SDPA take its flash kernels (GPU and CPU),
        # which an explicit mask rules out.
        causal = (key_mask is None and position == 0 and seq > 1 and seq == k.shape[2]
                  and (not self.sliding_window or seq <= self.sliding_window))
        mask = None if causal else attention_mask(seq, k.shape[2], position, self.sliding_window, x.device, key_mask)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=self.num_heads != self.num_kv_heads
        )
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))

    def decode(self, step: DecodeStep, x: torch.Tensor, source: ProductInput, routes: LayerRoutes) -> StepRows:
        """forward() of a decode step's token (batch 1 or a lockstep batch), o_proj's output left to the next norm."""
        q, k, v = step.project(source, (self.q_proj, self.k_proj, self.v_proj))
        keys, values = step.cache.keys[self.layer_index], step.cache.values[self.layer_index]
        if step.attention_kernel:
            out = step.ops.decode_attention(q.view(-1), k, v, step.cos_table, step.sin_table, step.position, keys,
                                            values, step.length, self.sliding_window or 0, step.attention_scratch,
                                            *(routes.o_slots or ())).view(step.batch, 1, -1)
        else:
            step.rope_cache(q, k, v, step.cos_table, step.sin_table, step.position, keys, values)
            out = F.scaled_dot_product_attention(q.view(step.batch, 1, self.num_heads, self.head_dim).transpose(1, 2),
                                                 keys[:, :, : step.length], values[:, :, : step.length],
                                                 attn_mask=step.mask, enable_gqa=self.num_heads != self.num_kv_heads)
            out = out.transpose(1, 2).reshape(step.batch, 1, -1)
        o_input = ProductInput(rows=out, slots=[routes.o_slots[1]] if routes.o_slots else None)
        return _block_output(step, x, o_input, self.o_proj, routes.mlp_norm)


def attention_mask(
    queries: int, keys: int, position: int, sliding_window: int | None, device, key_mask: torch.Tensor | None = None
) -> torch.Tensor | None:
    """Boolean [queries, keys] mask (True = may attend), or None when nothing is masked.

    key_mask [B, keys] marks real tokens in left-padded batches; with it the mask is [B, 1, queries, keys].
    """
    if key_mask is None and queries == 1 and (not sliding_window or keys <= sliding_window):
        return None
    query_pos = torch.arange(position, position + queries, device=device)[:, None]
    key_pos = torch.arange(keys, device=device)[None, :]
    real_keys = None if key_mask is None else key_mask[:, None, None, :keys]
    return allowed_keys(query_pos, key_pos, sliding_window, real_keys)


def allowed_keys(query_pos: torch.Tensor, key_pos: torch.Tensor, sliding_window: int | None,
                 key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The attention rule, True where a query may attend a key: the key is at or before the query,
    within the sliding window, and a real token (key_mask, broadcast against the positions).
    Positions are tensors that broadcast (a prompt's aranges; a decode step's device-held position
    against a bucket of keys), so a captured graph can build the mask without the host."""
    allowed = key_pos <= query_pos
    if sliding_window:
        allowed &= key_pos > query_pos - sliding_window
    if key_mask is None:
        return allowed
    # A padding query would see no key at all and turn into NaN, which then leaks
    # through its value vector; letting it see itself keeps everything finite.
    return (allowed & key_mask) | (key_pos == query_pos)


def _block_output(step: DecodeStep, x: torch.Tensor, source: ProductInput, layer, handoff) -> StepRows:
    """A decode step's block ends in one product (o_proj, down): its output is left for the next
    norm to add into x, or, where that norm is handed over, the product adds it itself and writes
    the next products' input (core/kernels/handoff.py)."""
    if handoff is not None:
        step.project(source, (layer,), [handoff.route(x)])
        return StepRows(x, handed=handoff)
    return StepRows(x, pending=step.project(source, (layer,))[0])


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, device=None, dtype=None):
        super().__init__()
        hidden, inner, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = DenseLinear(hidden, inner, bias, device, dtype)
        self.up_proj = DenseLinear(hidden, inner, bias, device, dtype)
        self.down_proj = DenseLinear(inner, hidden, bias, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project(x, (self.gate_proj, self.up_proj))
        kernels = dispatch.fused(gate)
        hidden = kernels.silu_mul(gate.contiguous(), up.contiguous()) if kernels is not None else F.silu(gate) * up
        return self.down_proj(hidden)

    def decode(self, step: DecodeStep, x: torch.Tensor, source: ProductInput, routes: LayerRoutes) -> StepRows:
        """forward() in a decode step, down's output left to the next norm. SwiGLU runs as its own
        kernel (writing down's slot order where down reads one), or inside the products: gate and up
        write their outputs in down's order and down finishes SwiGLU while staging them."""
        swiglu = routes.swiglu
        gate, up = step.project(source, (self.gate_proj, self.up_proj), swiglu.routes if swiglu else ())
        if swiglu:
            down_input = ProductInput(slots=[swiglu.gate], staged=swiglu.staged)
        elif routes.down_tables:
            down_input = ProductInput(slots=[step.ops.silu_mul_slots(gate, up, routes.down_tables[0])])
        else:
            down_input = ProductInput(rows=step.ops.silu_mul(gate, up))
        return _block_output(step, x, down_input, self.down_proj, routes.next_norm)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int, device=None, dtype=None):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, device, dtype)
        self.self_attn = Attention(config, layer_index, device, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, device, dtype)
        self.mlp = MLP(config, device, dtype)

    def forward(self, x, cos, sin, cache, position, key_mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, position, key_mask)
        return x + self.mlp(self.post_attention_layernorm(x))

    def decode_step(self, step: DecodeStep, rows: StepRows, routes: LayerRoutes) -> StepRows:
        """forward() in a decode step: each norm also adds in the output of the block before it."""
        x, source = self.input_layernorm.decode_input(step.ops, rows, routes.qkv_tables)
        rows = self.self_attn.decode(step, x, source, routes)
        x, source = self.post_attention_layernorm.decode_input(step.ops, rows, routes.gate_up_tables)
        return self.mlp.decode(step, x, source, routes)


class DecoderStack(nn.Module):
    """Everything below the head; named `model` in the checkpoint."""

    def __init__(self, config: ModelConfig, device=None, dtype=None):
        super().__init__()
        # An uninitialised weight: the checkpoint fills it, and a random init built
        # on the meta device goes through torch._refs, whose first use imports
        # torch._dynamo on every model load (the load stage of python3 -m bench.convert_speed).
        weight = torch.empty(config.vocab_size, config.hidden_size, device=device, dtype=dtype)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, _weight=weight, _freeze=True)
        self.layers = nn.ModuleList(DecoderLayer(config, i, device, dtype) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, device, dtype)


class CausalLM(nn.Module):
    def __init__(self, config: ModelConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.model = DecoderStack(config, device, dtype)
        self.lm_head = DenseLinear(config.hidden_size, config.vocab_size, False, device, dtype)
        self.register_buffer("inv_freq", rope_inverse_frequencies(config).to(device), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def rotary(self, position: int, seq: int, dtype: torch.dtype):
        positions = torch.arange(position, position + seq, device=self.inv_freq.device, dtype=torch.float32)
        angles = torch.outer(positions, self.inv_freq.float())
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def hidden_states(
        self, input_ids: torch.Tensor, cache: KVCache | None = None, position: int = 0, key_mask=None
    ) -> torch.Tensor:
        """Final-norm hidden states [B, T, hidden] for tokens placed at `position`.

        key_mask [B, position + T] (True = real token) lets a left-padded batch ignore its padding."""
        seq = input_ids.shape[1]
        if cache is not None:
            cache.check_room(position + seq)
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary(position, seq, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, cache, position, key_mask)
        if cache is not None:
            cache.length = position + seq
        return self.model.norm(x)

    def forward(
        self, input_ids: torch.Tensor, cache: KVCache | None = None, position: int = 0, last_only: bool = False,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """float32 logits [B, T, vocab] (or [B, 1, vocab] with last_only)."""
        x = self.hidden_states(input_ids, cache, position, key_mask)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(x).float()

    def decode_step(self, step: DecodeStep, tokens: torch.Tensor) -> torch.Tensor:
        """forward() of one token a row [batch, 1] at step.position, as a captured graph runs it
        (core/graph_decode.py): float32 logits [batch, 1, vocab]; the cache gets the token's keys."""
        rows = StepRows(self.model.embed_tokens(tokens))
        for layer, routes in zip(self.model.layers, step.layers):
            rows = layer.decode_step(step, rows, routes)
        _, source = self.model.norm.decode_input(step.ops, rows, step.head_tables)
        return step.project(source, (self.lm_head,))[0].float()
