"""Batch-1 decode as one CUDA graph per context bucket, replayed token after token.

Decoding one token launches a few hundred small kernels; from Python each
launch costs more than the kernel itself on a slow host, so the step is
captured once and replayed. A graph fixes every shape and address, so the step
here reads the token and its position from device tensors: rope angles come
from a table, the cache is written with index_copy_, and attention reads a
fixed-length prefix of the cache (the bucket) with a mask that hides what lies
past the position. The model's linear layers run as they are; norms, rope with
the cache append, and SwiGLU run as fused kernels (core/kernels/fused.cu) or
their torch twins, which compute what CausalLM.forward computes.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .cache import KVCache
from .model import CausalLM

# QUANTLAB_FUSED=0 takes the torch twins of the fused norm, rope and SwiGLU kernels.
FUSED_SWITCH = "QUANTLAB_FUSED"
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
        if cache.batch_size != 1:
            raise ValueError("graph decoding runs batch 1")
        # The fused kernels where they are built (fp16), else their torch twins: the same step either way.
        from .kernels import reference
        from .kernels.build import kernels

        built = kernels() if dtype == torch.float16 and os.environ.get(FUSED_SWITCH, "1") != "0" else None
        self.ops = built if built is not None else reference

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
        model, cache, ops = self.model, self.cache, self.ops
        heads, kv_heads, dim = model.config.num_heads, model.config.num_kv_heads, model.config.head_dim
        keys_seen = self.key_positions[:length]
        allowed = keys_seen <= self.position
        window = model.config.sliding_window
        if window:
            allowed = allowed & (keys_seen > self.position - window)
        mask = allowed.view(1, 1, 1, length)
        layers = model.model.layers
        x = model.model.embed_tokens(self.token)
        h = ops.rms_norm(x, layers[0].input_layernorm.weight, layers[0].input_layernorm.eps)
        for index, layer in enumerate(layers):
            attn = layer.self_attn
            q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
            key_buffer, value_buffer = cache.keys[attn.layer_index], cache.values[attn.layer_index]
            ops.rope_cache(q, k, v, self.cos_table, self.sin_table, self.position, key_buffer, value_buffer)
            out = F.scaled_dot_product_attention(q.view(1, 1, heads, dim).transpose(1, 2), key_buffer[:, :, :length],
                                                 value_buffer[:, :, :length], attn_mask=mask,
                                                 enable_gqa=heads != kv_heads)
            o = attn.o_proj(out.transpose(1, 2).reshape(1, 1, -1))
            norm = layer.post_attention_layernorm
            h = ops.rms_norm(x, norm.weight, norm.eps, o)  # x += o, then the norm
            mlp = layer.mlp
            d = mlp.down_proj(ops.silu_mul(mlp.gate_proj(h), mlp.up_proj(h)))
            norm = layers[index + 1].input_layernorm if index + 1 < len(layers) else model.model.norm
            h = ops.rms_norm(x, norm.weight, norm.eps, d)
        return model.lm_head(h).float()
