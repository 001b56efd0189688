"""Folder -> model: build the module tree without memory, then fill it tensor by tensor."""

from __future__ import annotations

import torch

from .config import ModelConfig
from .model import CausalLM, rope_inverse_frequencies
from .weights import WeightsError, iter_tensors

# Tensors some checkpoints carry that the model derives itself.
_DERIVED_SUFFIXES = (".rotary_emb.inv_freq",)


def default_dtype(device: torch.device | str) -> torch.dtype:
    # fp32 on the CPU: fp16 matmuls there are slow and buy nothing.
    return torch.float32 if torch.device(device).type == "cpu" else torch.float16


def load_model(folder, device="cpu", dtype: torch.dtype | None = None) -> CausalLM:
    config = ModelConfig.from_folder(folder)
    dtype = dtype or default_dtype(device)
    with torch.device("meta"):
        model = CausalLM(config)
    expected = {name for name, _ in model.named_parameters()}
    filled = set()
    for name, tensor in iter_tensors(folder):
        if name.endswith(_DERIVED_SUFFIXES):
            continue
        if name not in expected:
            raise WeightsError(f"unexpected tensor {name!r} in {folder}; is config.json the model's own?")
        _set_parameter(model, name, tensor.to(device=device, dtype=dtype))
        filled.add(name)
    if "lm_head.weight" not in filled and config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
        filled.add("lm_head.weight")
    missing = sorted(expected - filled)
    if missing:
        raise WeightsError(f"{folder} lacks {len(missing)} tensors, e.g. {', '.join(missing[:3])}")
    model.inv_freq = rope_inverse_frequencies(config).to(device)
    return model.eval()


def _set_parameter(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_path, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_path)
    expected_shape = getattr(module, leaf).shape
    if tensor.shape != expected_shape:
        raise WeightsError(f"{name} has shape {tuple(tensor.shape)}, config.json implies {tuple(expected_shape)}")
    setattr(module, leaf, torch.nn.Parameter(tensor, requires_grad=False))
