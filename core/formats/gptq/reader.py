"""What the loader asks of a GPTQ checkpoint: its settings, which layers are GPTQ,
the tensors each needs, and the layer that runs them.

The settings come from config.json's `quantization_config` (transformers, GPTQModel
and later AutoGPTQ write it) or, in older AutoGPTQ folders, quantize_config.json,
whose being there says GPTQ (core/formats/registry.py reads either). The zero
convention, read from GPTQModel's v1 <-> v2 conversion:

- checkpoint_format "gptq" (v1, AutoGPTQ and older GPTQModel) stores zero - 1
  in each nibble and readers add the one back per nibble, so a stored 0xF reads
  as 16 (a real zero of 0 cannot be written in v1).
- "gptq_v2" (GPTQModel) stores the zero itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...config import UnsupportedModelError
from ...weights import WeightsError
from ..checkpoint import CheckpointFormat
from .layout import LAYER_TENSORS
from .linear import GPTQLinear

SUPPORTED_BITS = (4,)
# Value added to a stored nibble to get the zero point, per checkpoint_format.
ZERO_OFFSETS = {"gptq": 1, "gptq_v2": 0}


@dataclass(frozen=True)
class GPTQSettings:
    bits: int
    group_size: int  # -1: one group over all inputs
    desc_act: bool
    sym: bool
    checkpoint_format: str

    @property
    def zero_offset(self) -> int:
        return ZERO_OFFSETS[self.checkpoint_format]


def gptq_settings(config: dict, source: str = "quantization_config") -> GPTQSettings:
    """The settings of a quantization config whose quant_method is gptq, with what to do where we cannot load them."""
    bits = config.get("bits")
    if bits not in SUPPORTED_BITS:
        raise UnsupportedModelError(
            f"{source}: GPTQ with {bits} bits is not supported; quantlab loads GPTQ checkpoints of "
            f"{', '.join(map(str, SUPPORTED_BITS))} bits only (look for a 4-bit version of this model)")
    if config.get("is_marlin_format"):
        raise UnsupportedModelError(f"{source}: GPTQ in AutoGPTQ's Marlin layout is not supported; "
                                    "use the checkpoint in its plain GPTQ layout (checkpoint_format gptq or gptq_v2)")
    checkpoint_format = str(config.get("checkpoint_format") or "gptq").lower()
    if checkpoint_format not in ZERO_OFFSETS:
        raise UnsupportedModelError(
            f"{source}: GPTQ checkpoint_format {checkpoint_format!r} is not supported; "
            f"supported: {', '.join(ZERO_OFFSETS)}")
    pack_dtype = str(config.get("pack_dtype") or "int32").replace("torch.", "")
    if pack_dtype != "int32":
        raise UnsupportedModelError(f"{source}: GPTQ packed in {pack_dtype} is not supported; only int32 packing is")
    group_size = config.get("group_size")
    group_size = -1 if group_size is None else int(group_size)
    if group_size == 0 or group_size < -1:
        raise UnsupportedModelError(f"{source}: GPTQ group_size {group_size} is not valid; use -1 or a positive size")
    return GPTQSettings(bits=int(bits), group_size=group_size, desc_act=bool(config.get("desc_act", False)),
                        sym=bool(config.get("sym", True)), checkpoint_format=checkpoint_format)


def detect(settings: GPTQSettings | None, tensor_names: list[str]) -> list[str]:
    """Prefixes of the layers stored as GPTQ (those with a `qweight`)."""
    prefixes = sorted({name.rpartition(".")[0] for name in tensor_names if name.endswith(".qweight")})
    if prefixes and settings is None:
        raise WeightsError(f"{prefixes[0]}.qweight looks like a GPTQ layer, but neither config.json's "
                           "quantization_config nor quantize_config.json says the model is GPTQ")
    return prefixes


def build_layer(dense: nn.Module, prefix: str, dtype: torch.dtype, settings: GPTQSettings,
                present: set[str]) -> GPTQLinear:
    # Some GPTQ writers store a bias for every layer, zeros where the model has none; it is used as stored.
    bias = dense.bias is not None or f"{prefix}.bias" in present
    return GPTQLinear(dense.in_features, dense.out_features, bias, "meta", dtype, settings.zero_offset, prefix)


def stored_tensors(prefix: str, settings: GPTQSettings, present: set[str]) -> set[str]:
    """g_idx only with act-order (without it, it follows from group_size)."""
    return {f"{prefix}.{name}" for name in LAYER_TENSORS
            if name != "g_idx" or settings.desc_act or f"{prefix}.g_idx" in present}


def finish_layer(layer: GPTQLinear, settings: GPTQSettings) -> None:
    layer.prepare(settings.group_size)


FORMAT = CheckpointFormat(
    method="gptq", tensors=LAYER_TENSORS, settings=gptq_settings, detect=detect, build_layer=build_layer,
    stored_tensors=stored_tensors, finish_layer=finish_layer, settings_file="quantize_config.json")
