"""Writing a finished model: an HF-style folder of shards, config.json and the
source's tokenizer files. Each format's writer (exl2/writer.py, exl3/writer.py)
names the shards and says what changes in config.json.

Everything is written into a hidden sibling folder and renamed into place at
the end, so a folder with the output's name is always complete.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

# Files copied from the source model as they are; config.json is rewritten.
COPIED_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
)
DEFAULT_SHARD_BYTES = 4 * 1024**3


class OutputError(OSError):
    """The output folder cannot be written (disk full, not ours to replace, ...)."""


def check_free_space(folder: Path, needed_bytes: int) -> None:
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    # Leave a margin: metadata, the old copy kept until the rename, filesystem slack.
    if free < needed_bytes * 1.1 + 64 * 1024**2:
        raise OutputError(
            f"not enough disk space in {probe}: the output needs about {needed_bytes / 1e9:.2f} GB, "
            f"{free / 1e9:.2f} GB is free"
        )


# The quantization methods whose folders a conversion may replace: ours.
OUR_METHODS = ("exl2", "exl3")


def plan_shards(tensors: list[tuple[str, torch.Tensor]], shard_bytes: int) -> list[list[tuple[str, torch.Tensor]]]:
    shards, current, size = [], [], 0
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, tensor))
        size += nbytes
    if current:
        shards.append(current)
    return shards


def write_model_folder(
    output_dir: Path,
    source_folder: Path,
    tensors: Iterable[tuple[str, torch.Tensor]],
    quantization_config: dict,
    naming,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    config_changes: dict | None = None,
    write_index: bool = False,
    extra_json: dict[str, dict] | None = None,
) -> Path:
    """The folder: shards named by `naming(count)`, config.json with `quantization_config`
    (and `config_changes`), with `write_index` a model.safetensors.index.json when there
    is more than one shard, `extra_json` files, and the source's tokenizer files."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not _is_our_output(output_dir):
        raise OutputError(f"{output_dir} exists and is not a quantized model folder; choose another output folder")
    tensors = [(name, tensor.contiguous().cpu()) for name, tensor in tensors]
    total = sum(t.numel() * t.element_size() for _, t in tensors)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    check_free_space(output_dir.parent, total)

    staging = output_dir.parent / f".{output_dir.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        shards = plan_shards(tensors, shard_bytes)
        names = naming(len(shards))
        for name, shard in zip(names, shards):
            save_file(dict(shard), str(staging / name), metadata={"format": "pt"})
        if write_index and len(shards) > 1:
            weight_map = {tensor: name for name, shard in zip(names, shards) for tensor, _ in shard}
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        config = json.loads((Path(source_folder) / "config.json").read_text(encoding="utf-8"))
        config.update(config_changes or {})
        config["quantization_config"] = quantization_config
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        for name, value in (extra_json or {}).items():
            (staging / name).write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
        for name in COPIED_FILES:
            if (Path(source_folder) / name).is_file():
                shutil.copyfile(Path(source_folder) / name, staging / name)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise OutputError(f"writing {output_dir} failed: {error}") from error
    _replace(staging, output_dir)
    return output_dir


def _is_our_output(folder: Path) -> bool:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return not any(folder.iterdir()) if folder.is_dir() else False
    return config.get("quantization_config", {}).get("quant_method") in OUR_METHODS


def _replace(staging: Path, output_dir: Path) -> None:
    if output_dir.exists():
        old = output_dir.parent / f".{output_dir.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        output_dir.rename(old)
        staging.rename(output_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(output_dir)


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())
