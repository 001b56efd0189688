"""What the loader asks of an EXL2 checkpoint (as ExLlamaV2 writes it, and writer.py):
which layers are EXL2, the tensors each needs, and the layer that runs them.

Its quantization_config only describes how the model was made; every fact the
loader needs is in the tensors (layout.py), so it has no settings to check.
"""

from __future__ import annotations

import torch
from torch import nn

from ..checkpoint import CheckpointFormat
from .layout import LAYER_TENSORS
from .linear import EXL2Linear


def settings(quantization_config: dict, source: str) -> None:
    return None


def detect(settings: None, tensor_names: list[str]) -> list[str]:
    """Prefixes of the layers stored as EXL2 (those with a `q_weight`)."""
    return sorted({name.rpartition(".")[0] for name in tensor_names if name.endswith(".q_weight")})


def build_layer(dense: nn.Module, prefix: str, dtype: torch.dtype, settings: None, present: set[str]) -> EXL2Linear:
    return EXL2Linear(dense.in_features, dense.out_features, dense.bias is not None, "meta", dtype)


def stored_tensors(prefix: str, settings: None, present: set[str]) -> set[str]:
    return {f"{prefix}.{name}" for name in LAYER_TENSORS}


FORMAT = CheckpointFormat(method="exl2", tensors=LAYER_TENSORS, settings=settings, detect=detect,
                          build_layer=build_layer, stored_tensors=stored_tensors)
