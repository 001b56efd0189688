"""The checkpoint formats the loader reads, and which one a folder's config names.

A new format is a folder beside exl2/, exl3/ and gptq/ whose reader.py makes a
CheckpointFormat, and one more entry in FORMATS. GGUF is not here: a .gguf file
is imported into an unquantized folder before anything loads it (core/sources.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config import UnsupportedModelError
from ..weights import WeightsError
from .checkpoint import CheckpointFormat
from .exl2 import reader as exl2
from .exl3 import reader as exl3
from .gptq import reader as gptq

# In the order the loader swaps their layers in.
FORMATS: tuple[CheckpointFormat, ...] = (exl2.FORMAT, exl3.FORMAT, gptq.FORMAT)


def quantization_of(folder: str | Path) -> tuple[CheckpointFormat | None, Any]:
    """The format a model folder's config names and its settings; (None, None) for an unquantized model.

    config.json's `quantization_config` comes first; without it, a format's own settings file
    (AutoGPTQ's quantize_config.json, which has no quant_method: being there says GPTQ).
    """
    folder = Path(folder)
    config = _read_json(folder / "config.json").get("quantization_config")
    source = "config.json quantization_config"
    if not config:
        for candidate in FORMATS:
            if candidate.settings_file and (folder / candidate.settings_file).is_file():
                config = _read_json(folder / candidate.settings_file)
                config.setdefault("quant_method", candidate.method)
                source = candidate.settings_file
                break
    if not config:
        return None, None
    method = str(config.get("quant_method", "")).lower()
    for candidate in FORMATS:
        if candidate.method == method:
            return candidate, candidate.settings(config, source)
    raise UnsupportedModelError(
        f"{source}: quantization method {method or '(none given)'!r} is not supported; "
        "quantlab loads EXL2, EXL3 and GPTQ 4-bit checkpoints, and unquantized fp16/bf16/fp32 ones")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise WeightsError(f"{path} is not valid JSON: {error}") from None
    return value if isinstance(value, dict) else {}
