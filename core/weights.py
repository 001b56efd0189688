"""Reading safetensors checkpoints one tensor at a time.

Pickle formats (.bin, .pt, .pth) are refused outright: unpickling runs
arbitrary code from the file, and no model is worth that.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


class WeightsError(ValueError):
    """The weight files are missing, unsafe to load, or unreadable."""


def weight_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError) as error:
            raise WeightsError(f"{index} is not a valid safetensors index: {error}") from None
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise WeightsError(f"{folder} is missing shards listed in its index: {', '.join(missing)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise WeightsError(
            f"{folder} holds only PyTorch pickle weights ({', '.join(pickles[:3])}); "
            "pickle files can run code when loaded, so they are never loaded here. "
            "Use a safetensors version of this model (many Hub repos have one, or convert it yourself)."
        )
    raise WeightsError(f"{folder} has no .safetensors weight files")


def iter_tensors(folder: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for every tensor in the checkpoint, one in memory at a time."""
    for path in weight_files(folder):
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():
                    yield name, handle.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as error:
            raise WeightsError(f"{path} could not be read (corrupt or truncated?): {error}") from None


def tensor_shapes(folder: str | Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, read from the headers only (no tensor data)."""
    shapes = {}
    for path in weight_files(folder):
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():
                    shapes[name] = tuple(handle.get_slice(name).get_shape())
        except (SafetensorError, OSError) as error:
            raise WeightsError(f"{path} could not be read (corrupt or truncated?): {error}") from None
    return shapes
