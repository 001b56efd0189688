"""A Hub that serves one local folder's config.json and fails the test if weights are asked for."""

from __future__ import annotations

from pathlib import Path

import pytest

import core.sources as sources


def serve_config_only(monkeypatch, folder: Path) -> list[str]:
    """Every Hub id resolves to `folder`'s files one by one; snapshot_download fails the test.
    Returns the list of file names fetched so far."""
    fetched: list[str] = []

    def hf_hub_download(repo_id, filename, **_):
        fetched.append(filename)
        return str(Path(folder) / filename)

    monkeypatch.setattr(sources.huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(sources.huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("weights fetched"))
    return fetched
