"""The library of local models: the demo, and every model folder the app made or imported,
each with the sidecar (quantlab.json) that says where it came from and how it was made."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from core.demo import DEMO_FOLDER_NAME
from core.formats.model_folder import OUR_METHODS
from core.paths import cache_dir
from core.sources import is_hub_id

DEMO = "demo"
DEMO_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
SIDECAR = "quantlab.json"  # what the app knows about a model it made: source, settings, result, quality


def models_dir() -> Path:
    return cache_dir() / "models"


@dataclass(frozen=True)
class LocalModel:
    name: str  # what the dropdowns and the API show
    spec: str  # what core.loader.load takes
    bpw: float | None  # None: unquantized
    meta: dict = field(default_factory=dict, compare=False)


def read_sidecar(folder: Path) -> dict:
    try:
        return json.loads((Path(folder) / SIDECAR).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def write_sidecar(folder: Path, meta: dict) -> None:
    temporary = Path(folder) / f".{SIDECAR}.tmp"
    temporary.write_text(json.dumps(meta, indent=1), encoding="utf-8")
    os.replace(temporary, Path(folder) / SIDECAR)


DEMO_MODEL = LocalModel(DEMO, DEMO, None, {"source": DEMO})


def local_models(folder: Path | None = None) -> list[LocalModel]:
    """`demo` first, then every complete model folder in the models folder, by name.

    Hidden folders are the writer's and importer's unfinished work; they never show.
    """
    folder = folder or models_dir()
    found = [DEMO_MODEL]
    if folder.is_dir():
        for child in sorted(folder.iterdir()):
            if child.name.startswith(".") or child.name == DEMO_FOLDER_NAME or not (child / "config.json").is_file():
                continue
            meta = read_sidecar(child)
            bpw = meta.get("result", {}).get("bpw") or _config_bits(child)
            found.append(LocalModel(child.name, str(child), bpw, meta))
    return found


def _config_bits(folder: Path) -> float | None:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    quantization = config.get("quantization_config") or {}
    return quantization.get("bits") if quantization.get("quant_method") in OUR_METHODS else None


def base_name(source: str) -> str:
    """A short folder-friendly name for what is being converted."""
    if source == DEMO:
        return DEMO_BASE_MODEL.split("/")[-1]
    path = Path(source)
    if source.lower().endswith(".gguf"):
        name = path.stem
    elif is_hub_id(source) and not path.exists():
        name = source.split("/")[-1]
    else:
        name = path.name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"


def hub_base_model(source: str) -> str | None:
    """The Hub id a model card can name as base_model, when the source has one."""
    if source == DEMO:
        return DEMO_BASE_MODEL
    if is_hub_id(source) and "/" in source and not Path(source).exists():
        return source
    return None


def newest_quantized(folder: Path | None = None) -> str | None:
    """The quantized model made last, or None."""
    quantized = [model for model in local_models(folder) if model.bpw is not None]
    if not quantized:
        return None
    return max(quantized, key=lambda model: Path(model.spec).stat().st_mtime).name
