"""What the loader asks of an EXL3 checkpoint (as ExLlamaV3 1.6 writes it): its settings,
which layers are EXL3, the tensors each needs, and the layer that runs them.

config.json's `quantization_config` (quant_method "exl3") describes how the model was made
(../shared/EXL3.md section 1); the loader checks its version and codebook name, but each
layer's codebook comes from its own marker tensor, as in ExLlamaV3. The embedding is stored
unquantized; lm_head is either an EXL3 layer (head_bits) or a plain `lm_head.weight`.
ExLlamaV3 writes tie_word_embeddings false, so a stored head is always the model's own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ...config import UnsupportedModelError
from ...weights import WeightsError
from ..checkpoint import CheckpointFormat
from .codebook import CODEBOOKS
from .layout import IGNORED_TENSORS, LAYER_TENSORS, MARKER_TENSORS
from .linear import EXL3Linear

# quantization_config versions read: ExLlamaV3's 1.x (checked against 1.6.5).
READ_MAJOR = 1
DEFAULT_CODEBOOK = "mul1"


@dataclass(frozen=True)
class EXL3Settings:
    version: str | None
    bits: float | None  # the decoder's average, as the writer budgeted it (informative)
    head_bits: float | None
    codebook: str  # the writer's choice; each layer's marker decides what it decodes with


def exl3_settings(config: dict, source: str = "quantization_config") -> EXL3Settings:
    """The settings of a quantization config whose quant_method is exl3, refusing what we cannot read.

    A config without a version is read as 1.x, the only one there is."""
    version = config.get("version")
    if version is not None:
        major = re.match(r"\s*(\d+)(\.|$)", str(version))
        if major is None or int(major.group(1)) != READ_MAJOR:
            raise UnsupportedModelError(
                f"{source}: EXL3 format version {version!r} is not supported; quantlab reads EXL3 version "
                f"{READ_MAJOR}.x (as ExLlamaV3 1.x writes it)")
    codebook = str(config.get("codebook") or DEFAULT_CODEBOOK).lower()
    if codebook not in CODEBOOKS:
        raise UnsupportedModelError(f"{source}: EXL3 codebook {config.get('codebook')!r} is not supported; "
                                    f"quantlab reads {', '.join(CODEBOOKS)}")
    return EXL3Settings(version=None if version is None else str(version), bits=_number(config.get("bits")),
                        head_bits=_number(config.get("head_bits")), codebook=codebook)


def _number(value) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def detect(settings: EXL3Settings | None, tensor_names: list[str]) -> list[str]:
    """Prefixes of the layers stored as EXL3: those with any of a trellis or its scales
    (a layer missing one of them is then refused by name, not taken for stray tensors)."""
    suffixes = tuple(f".{name}" for name in ("trellis", "suh", "svh", "su", "sv"))
    prefixes = sorted({name.rpartition(".")[0] for name in tensor_names if name.endswith(suffixes)})
    if not prefixes:
        return []
    names = set(tensor_names)
    for prefix in prefixes:
        if prefix.endswith("embed_tokens") or f"{prefix}.signs" in names:
            raise UnsupportedModelError(f"{prefix} is stored with ExLlamaV3's embedding codec (--embed_bits), which "
                                        "quantlab does not read; convert with the embedding unquantized (the default)")
    if settings is None:
        raise WeightsError(f"{prefixes[0]} looks like an EXL3 layer, but config.json's quantization_config "
                           "does not say the model is EXL3 (quant_method \"exl3\")")
    return prefixes


def build_layer(dense: nn.Module, prefix: str, dtype: torch.dtype, settings: EXL3Settings,
                present: set[str]) -> EXL3Linear:
    return EXL3Linear(dense.in_features, dense.out_features, dense.bias is not None, "meta", dtype, prefix)


def stored_tensors(prefix: str, settings: EXL3Settings, present: set[str]) -> set[str]:
    """trellis; suh or legacy su, svh or sv (the scales where neither is there, to name what lacks);
    a codebook marker and a bias where stored."""
    names = {f"{prefix}.trellis"}
    for scales, signs in (("suh", "su"), ("svh", "sv")):
        names.add(f"{prefix}.{signs}" if f"{prefix}.{signs}" in present and f"{prefix}.{scales}" not in present
                  else f"{prefix}.{scales}")
    names |= {f"{prefix}.{name}" for name in (*MARKER_TENSORS, *IGNORED_TENSORS, "bias") if f"{prefix}.{name}" in present}
    return names


def finish_layer(layer: EXL3Linear, settings: EXL3Settings) -> None:
    layer.prepare()


FORMAT = CheckpointFormat(method="exl3", tensors=LAYER_TENSORS, settings=exl3_settings, detect=detect,
                          build_layer=build_layer, stored_tensors=stored_tensors, finish_layer=finish_layer)
