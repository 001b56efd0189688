"""Writing an EXL3 model folder that ExLlamaV3 1.6 (and TabbyAPI, text-generation-webui) load unchanged.

What ExLlamaV3's compile step writes (../shared/EXL3.md section 1): shards named
model.safetensors or model-0000i-of-0000N.safetensors with an index, config.json
with the quantization_config and tie_word_embeddings off (the head is stored on
its own), and quantization_config.json holding the same dict.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from ..model_folder import write_model_folder

# ExLlamaV3's default shard size (its -ss flag, in MB).
SHARD_BYTES = 8192 * 1024**2


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_exl3_folder(output_dir: Path, source_folder: Path, tensors: Iterable[tuple[str, torch.Tensor]],
                      quantization_config: dict) -> Path:
    return write_model_folder(output_dir, source_folder, tensors, quantization_config, shard_names, SHARD_BYTES,
                              config_changes={"tie_word_embeddings": False}, write_index=True,
                              extra_json={"quantization_config.json": quantization_config})
