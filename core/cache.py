"""Preallocated key/value cache: one buffer per layer, sized once for the whole
context, so decoding never reallocates and (on CUDA) addresses stay fixed for
graph replay."""

from __future__ import annotations

import torch

from .config import ModelConfig


class ContextOverflowError(ValueError):
    """More tokens than the cache was sized for."""


class KVCache:
    def __init__(self, config: ModelConfig, max_seq_len: int, batch_size: int = 1, device="cpu", dtype=torch.float32):
        shape = (batch_size, config.num_kv_heads, max_seq_len, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.max_seq_len = max_seq_len
        self.batch_size = batch_size
        # Number of positions already written; the model appends after it.
        self.length = 0

    def reset(self) -> None:
        self.length = 0

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows, moved to the front, in this order: batched
        generation drops the rows that finished so they cost no more compute."""
        for buffers in (self.keys, self.values):
            for buffer in buffers:
                buffer[: len(rows)] = buffer[rows]

    def check_room(self, end: int) -> None:
        if end > self.max_seq_len:
            raise ContextOverflowError(f"{end} tokens do not fit in a context of {self.max_seq_len} tokens")

    def update(self, layer: int, position: int, key: torch.Tensor, value: torch.Tensor):
        """Write [B, kvH, T, D] at `position` and return the keys and values up to its end."""
        end = position + key.shape[2]
        batch = key.shape[0]
        self.keys[layer][:batch, :, position:end] = key
        self.values[layer][:batch, :, position:end] = value
        return self.keys[layer][:batch, :, :end], self.values[layer][:batch, :, :end]
