"""Writing an EXL2 model folder that ExLlamaV2, TabbyAPI and text-generation-webui load unchanged."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from ..model_folder import write_model_folder


def shard_names(count: int) -> list[str]:
    # ExLlamaV2's naming; every loader we target globs *.safetensors.
    if count == 1:
        return ["output.safetensors"]
    return [f"output-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_exl2_folder(output_dir: Path, source_folder: Path, tensors: Iterable[tuple[str, torch.Tensor]],
                      quantization_config: dict) -> Path:
    return write_model_folder(output_dir, source_folder, tensors, quantization_config, shard_names)
