"""Batch-1 decode as one CUDA graph per context bucket, replayed token after token.

Decoding one token launches a few hundred small kernels; from Python each
launch costs more than the kernel itself on a slow host, so the step is
captured once and replayed. A graph fixes every shape and address, so the step
here reads the token and its position from device tensors: rope angles come
from a table, the cache is written with index_copy_, and attention reads a
fixed-length prefix of the cache (the bucket) with a mask that hides what lies
past the position. The model's own modules (norms, linear layers) do the rest,
so the graph computes what CausalLM.forward computes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .cache import KVCache
from .model import CausalLM, rotate_half

# Attention reads the cache prefix rounded up to this many positions: few graphs, little wasted reading.
BUCKET = 256


class GraphDecoder:
    """Owns the static buffers and graphs of one (model, cache) pair, batch 1."""

    def __init__(self, model: CausalLM, cache: KVCache):
        if model.device.type != "cuda":
            raise ValueError("graph decoding needs the model on a CUDA device")
        self.model = model
        self.cache = cache
        device, dtype = model.device, model.dtype
        positions = torch.arange(cache.max_seq_len, device=device, dtype=torch.float32)
        angles = torch.outer(positions, model.inv_freq.float())
        angles = torch.cat((angles, angles), dim=-1)
        self.cos_table, self.sin_table = angles.cos().to(dtype), angles.sin().to(dtype)
        self.key_positions = torch.arange(cache.max_seq_len, device=device)
        self.token = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    @torch.inference_mode()
    def step(self, token: int, position: int) -> torch.Tensor:
        """float32 logits [vocab] of the token placed at `position`; the cache grows by one."""
        self.cache.check_room(position + 1)
        self.token.fill_(token)
        self.position.fill_(position)
        length = min(-(-(position + 1) // BUCKET) * BUCKET, self.cache.max_seq_len)
        if length not in self.graphs:
            self.graphs[length] = self._capture(length)
        graph, logits = self.graphs[length]
        graph.replay()
        self.cache.length = position + 1
        return logits[0, 0].clone()  # the graph overwrites its output buffer on the next replay

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

    def _forward(self, length: int) -> torch.Tensor:
        model, cache = self.model, self.cache
        x = model.model.embed_tokens(self.token)
        cos = self.cos_table.index_select(0, self.position)
        sin = self.sin_table.index_select(0, self.position)
        keys_seen = self.key_positions[:length]
        allowed = keys_seen <= self.position
        window = model.config.sliding_window
        if window:
            allowed = allowed & (keys_seen > self.position - window)
        mask = allowed.view(1, 1, 1, length)
        for layer in model.model.layers:
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(1, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(1, 1, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(1, 1, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            key_buffer = cache.keys[attn.layer_index][:1]
            value_buffer = cache.values[attn.layer_index][:1]
            key_buffer.index_copy_(2, self.position, k)
            value_buffer.index_copy_(2, self.position, v)
            out = F.scaled_dot_product_attention(q, key_buffer[:, :, :length], value_buffer[:, :, :length],
                                                 attn_mask=mask, enable_gqa=attn.num_heads != attn.num_kv_heads)
            x = x + attn.o_proj(out.transpose(1, 2).reshape(1, 1, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return model.lm_head(model.model.norm(x)).float()
