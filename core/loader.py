"""Folder -> model: build the module tree without memory, then fill it tensor by tensor."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .config import ModelConfig
from .formats.checkpoint import CheckpointFormat
from .formats.registry import FORMATS, quantization_of
from .kernels import dispatch
from .linear import QuantizedLinear
from .model import CausalLM
from .rope import rope_inverse_frequencies
from .sources import resolve_model_source
from .tokenizer import Tokenizer
from .weights import WeightsError, iter_tensors, tensor_shapes

# Tensors some checkpoints carry that the model derives itself.
_DERIVED_SUFFIXES = (".rotary_emb.inv_freq",)


def default_dtype(device: torch.device | str) -> torch.dtype:
    # fp32 on the CPU: fp16 matmuls there are slow and buy nothing.
    return torch.float32 if torch.device(device).type == "cpu" else torch.float16


def load_model(folder, device="cpu", dtype: torch.dtype | None = None) -> CausalLM:
    config = ModelConfig.from_folder(folder)
    dtype = dtype or default_dtype(device)
    named_format, settings = quantization_of(folder)
    shapes = tensor_shapes(folder)
    config.check_tensor_shapes(shapes)
    with torch.device("meta"):
        model = CausalLM(config, dtype=dtype)
    names = list(shapes)
    present = set(names)
    quantized = _use_quantized_layers(model, names, present, dtype, named_format, settings)
    expected = {name for name, _ in model.named_parameters()}
    # Quantized layers' buffers are still empty (None) here, which named_buffers() skips.
    for swapped in quantized:
        expected |= swapped.format.stored_tensors(swapped.prefix, swapped.settings, present)
    stored_dtype = {name for checkpoint_format in FORMATS for name in checkpoint_format.tensors}
    filled = set()
    for name, tensor in iter_tensors(folder):
        if name.endswith(_DERIVED_SUFFIXES):
            continue
        if name not in expected:
            raise WeightsError(f"unexpected tensor {name!r} in {folder}; is config.json the model's own?")
        # Packed integer codes and their fp16 scales keep the dtype the format fixes.
        keeps_dtype = name.rpartition(".")[2] in stored_dtype
        tensor = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() and not keeps_dtype else None)
        _set_tensor(model, name, tensor)
        filled.add(name)
    if "lm_head.weight" in expected and "lm_head.weight" not in filled and config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
        filled.add("lm_head.weight")
    missing = sorted(expected - filled)
    if missing:
        raise WeightsError(f"{folder} lacks {len(missing)} tensors, e.g. {', '.join(missing[:3])}")
    for swapped in quantized:
        swapped.format.finish_layer(swapped.layer, swapped.settings)
    model.inv_freq = rope_inverse_frequencies(config).to(device)
    return model.eval()


class _Swapped(NamedTuple):
    """A dense layer the loader replaced with a checkpoint format's layer."""

    format: CheckpointFormat
    settings: Any
    prefix: str
    layer: QuantizedLinear


def _use_quantized_layers(model: CausalLM, names: list[str], present: set[str], dtype: torch.dtype,
                          named_format: CheckpointFormat | None, settings: Any) -> list[_Swapped]:
    """Swap each dense layer whose checkpoint tensors are a quantized format's for that format's layer.
    Formats go in registry order; only the format the config names gets its settings (None for the rest)."""
    quantized = []
    for checkpoint_format in FORMATS:
        layer_settings = settings if checkpoint_format is named_format else None
        for prefix in checkpoint_format.detect(layer_settings, names):
            parent_path, _, leaf = prefix.rpartition(".")
            try:
                dense = model.get_submodule(prefix)
            except AttributeError:
                raise WeightsError(f"quantized tensors for {prefix}, which this model does not have") from None
            layer = checkpoint_format.build_layer(dense, prefix, dtype, layer_settings, present)
            setattr(model.get_submodule(parent_path), leaf, layer)
            quantized.append(_Swapped(checkpoint_format, layer_settings, prefix, layer))
    return quantized


def _set_tensor(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_path, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_path)
    if leaf in module._buffers:
        module._buffers[leaf] = tensor
        return
    expected_shape = getattr(module, leaf).shape
    if tensor.shape != expected_shape:
        raise WeightsError(f"{name} has shape {tuple(tensor.shape)}, config.json implies {tuple(expected_shape)}")
    setattr(module, leaf, torch.nn.Parameter(tensor, requires_grad=False))


@dataclass
class LoadedModel:
    """A model ready to chat: weights, tokenizer, and the ids that end an answer."""

    name: str
    folder: Path
    model: CausalLM
    tokenizer: Tokenizer
    stop_token_ids: frozenset[int]
    sampling_defaults: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def model_bytes(self) -> int:
        """Memory the model holds once it has run: its tensors, plus the dense copy the torch
        reference path keeps of every quantized layer."""
        total = sum(t.numel() * t.element_size() for t in list(self.model.parameters()) + list(self.model.buffers())
                    if t is not None)
        if self.device.type == "cpu":
            for module in self.model.modules():
                if isinstance(module, QuantizedLinear):
                    total += module.in_features * module.out_features * torch.finfo(module.compute_dtype).bits // 8
        return total

    def kernel_path(self) -> str:
        """Which code runs the products: what a speed figure was measured on."""
        if self.device.type != "cuda":
            return "CPU reference"
        quantized = [module for module in self.model.modules() if isinstance(module, QuantizedLinear)]
        if not quantized:
            return "fp16 (cuBLAS)"
        # Quantized layers take the kernels when the extension built; otherwise their torch twin.
        if not dispatch.enabled(self.device):
            return "torch reference on CUDA"
        # A format without kernels of its own here (EXL3 until its kernels are switched on) runs dequantized.
        if any(module.kernel_plan() is None for module in quantized):
            return "dequantized fp16 (cuBLAS)"
        return "CUDA kernels"

    def memory_in_use(self) -> str:
        if self.device.type == "cuda":
            return f"{torch.cuda.memory_allocated(self.device) / 1024**3:.2f} GiB GPU memory in use"
        return f"{self.model_bytes() / 1024**2:.0f} MiB model memory (CPU)"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load(spec: str, device: str | None = None, dtype: torch.dtype | None = None, token: str | None = None) -> LoadedModel:
    """Load `demo`, a folder, a GGUF file or a Hub id."""
    folder = resolve_model_source(spec, token=token)
    device = device or default_device()
    model = load_model(folder, device=device, dtype=dtype)
    tokenizer = Tokenizer.from_folder(folder)
    generation_config = _read_json(folder / "generation_config.json")
    stop_ids = set(model.config.eos_token_ids)
    stop_ids.update(_as_ids(generation_config.get("eos_token_id")))
    if tokenizer.eos_token_id is not None:
        stop_ids.add(tokenizer.eos_token_id)
    defaults = {k: generation_config[k] for k in _SAMPLING_KEYS if k in generation_config}
    return LoadedModel(spec, Path(folder), model, tokenizer, frozenset(stop_ids), defaults)


# generation_config.json keys that mean the same as our SamplingSettings fields.
_SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}


def _as_ids(value) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else [int(v) for v in value]
