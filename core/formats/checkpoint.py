"""What a checkpoint format tells the loader: the quant_method it answers to, which
layers of a folder are its own, the tensors each needs, and the layer that runs them.

Each format folder (exl2/, gptq/) makes one CheckpointFormat in its reader.py;
registry.py lists them. The loader knows nothing of any format beyond this.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..linear import QuantizedLinear


def _nothing_to_finish(layer: QuantizedLinear, settings: Any) -> None:
    return None


@dataclass(frozen=True)
class CheckpointFormat:
    # quantization_config's quant_method for this format.
    method: str
    # A layer's stored tensors (after its prefix): integer codes and scales that keep the dtype the format fixes.
    tensors: tuple[str, ...]
    # (quantization_config, where it was found) -> the format's settings, refusing what it cannot load.
    settings: Callable[[dict, str], Any]
    # (settings, or None where the folder's config names no such format; tensor names) -> prefixes of its layers.
    detect: Callable[[Any, list[str]], list[str]]
    # (the dense layer it replaces, prefix, dtype, settings, tensor names present) -> its layer, on the meta device.
    build_layer: Callable[[nn.Module, str, torch.dtype, Any, set[str]], QuantizedLinear]
    # (prefix, settings, tensor names present) -> the whole names the layer at prefix needs from the files.
    stored_tensors: Callable[[str, Any, set[str]], set[str]]
    # (layer, settings): run once its tensors are filled.
    finish_layer: Callable[[QuantizedLinear, Any], None] = _nothing_to_finish
    # A file of its own that some writers keep the settings in instead of quantization_config;
    # being there says the folder is in this format.
    settings_file: str | None = None
