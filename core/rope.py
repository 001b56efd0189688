"""Rotary position embedding: the inverse frequencies a config asks for (with its
scaling) and the half rotation that applies them. The model and the kernels'
torch twins both rotate with these, so they live below both."""

from __future__ import annotations

import math

import torch

from .config import ModelConfig


def rope_inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    dim = config.head_dim
    # On the CPU even inside a meta-device context (the loader's): meta arithmetic
    # runs through torch._refs, whose first use imports torch._dynamo (the load stage of
    # python3 -m bench.convert_speed shows its cost).
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    inv_freq = 1.0 / (config.rope_theta**exponents)
    scaling = config.rope_scaling or {}
    if config.rope_type == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif config.rope_type == "llama3":
        inv_freq = _llama3_scaled(inv_freq, scaling)
    return inv_freq


def _llama3_scaled(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    # Llama 3.1 stretches only the long wavelengths (those longer than the original
    # context / low_freq_factor) by `factor`, keeps the short ones, and blends between.
    factor = float(scaling["factor"])
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    original = float(scaling.get("original_max_position_embeddings", 8192))
    wavelength = 2 * math.pi / inv_freq
    blend = ((original / wavelength - low) / (high - low)).clamp(0.0, 1.0)
    return (1 - blend) * inv_freq / factor + blend * inv_freq


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
