"""Where quantlab keeps what it makes: one root that every cache and model folder hangs from."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """quantlab's own cache: `$QUANTLAB_HOME`, else ~/.cache/quantlab."""
    home = os.environ.get("QUANTLAB_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "quantlab"
