"""The Hugging Face Hub side of the app: model search, the model card, zips and pushes.

Tokens pass through as arguments only: never logged, never written, and scrubbed
from any error text before it reaches the page.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import uuid
import zipfile
from pathlib import Path

import huggingface_hub
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import validate_repo_id

from .common import scrub
from .library import SIDECAR, read_sidecar

MODEL_CARD = "README.md"


def hub_offline() -> bool:
    return bool(huggingface_hub.is_offline_mode())


def search_models(text: str, limit: int = 12) -> list[str]:
    """Hub model ids matching `text`, most downloaded first; [] offline or on any Hub trouble
    (search is a convenience: typing the full id still works)."""
    text = (text or "").strip()
    if len(text) < 2 or hub_offline():
        return []
    try:
        found = huggingface_hub.HfApi().list_models(search=text, pipeline_tag="text-generation", sort="downloads",
                                                     limit=limit)
        return [model.id for model in found]
    except Exception:  # network, rate limits, an old Hub client: the box keeps working without suggestions
        return []


# What a model card says about each format: the Hub's library tag and who loads the files.
PEERS = {
    "exl2": {"library": "exllamav2",
             "use": "The files follow ExLlamaV2's EXL2 layout: load the folder with ExLlamaV2, TabbyAPI or "
                    "text-generation-webui (ExLlamaV2 loader), or with quantlab:"},
    "exl3": {"library": "exllamav3",
             "use": "The files follow ExLlamaV3's EXL3 layout (1.6): load the folder with ExLlamaV3, TabbyAPI or "
                    "text-generation-webui (ExLlamaV3 loader), or with quantlab:"},
}


def model_card(meta: dict, repo_id: str, perplexity: dict | None = None) -> str:
    """README.md for a quantized model: Hub metadata up front, then what was done and how well it went.

    meta is the sidecar the app writes beside each model it makes (see conversions.run_conversion);
    perplexity: {"quantized": float, "reference": float | None, "text": str, "ctx": int}.
    """
    settings = meta.get("settings", {})
    result = meta.get("result", {})
    base_model = meta.get("base_model")
    front = ["---"]
    if base_model:
        front += [f"base_model: {base_model}", "base_model_relation: quantized"]
    output_format = settings.get("format", "exl2")
    peer = PEERS.get(output_format, PEERS["exl2"])
    front += [f"library_name: {peer['library']}", "tags:", f"- {output_format}", "- quantized", "- quantlab", "---"]
    name = repo_id.split("/")[-1]
    source = base_model or meta.get("base_name") or meta.get("source", "a local model")
    bpw = result.get("bpw")
    lines = [
        "\n".join(front),
        "",
        f"# {name}",
        "",
        f"[{source}](https://huggingface.co/{base_model})" if base_model else f"{source}",
        f"quantized to **{bpw:.2f} bits per weight** in the {output_format.upper()} format by quantlab." if bpw else
        f"quantized in the {output_format.upper()} format by quantlab.",
        "",
        "| | |",
        "|---|---|",
        f"| target bits per weight | {settings.get('bpw', meta.get('target_bpw', '?'))} |",
        f"| bits per weight (decoder layers) | {bpw:.3f} |" if bpw else "| bits per weight | ? |",
        f"| output layer bits | {settings.get('head_bits', '?')} ({result.get('head_bpw', 0):.2f} bpw) |",
        f"| size | {result.get('size_bytes', 0) / 1e6:.1f} MB |",
        f"| calibration | {settings.get('calibration') or 'text the model wrote itself'}, "
        f"{settings.get('rows', '?')} rows of {settings.get('length', '?')} tokens |",
        f"| bit allocation objective | {settings.get('objective', '?')} |",
    ]
    if perplexity and perplexity.get("quantized") is not None:
        reference = perplexity.get("reference")
        lines.append(f"| measured perplexity | {perplexity['quantized']:.2f}"
                     + (f" (unquantized: {reference:.2f})" if reference else "")
                     + f", on {perplexity.get('text', 'held-out text')} at context {perplexity.get('ctx', '?')} |")
    else:
        lines.append("| measured perplexity | not measured |")
    lines += [
        "",
        "## Use",
        "",
        peer["use"],
        "",
        "```",
        f"python -m core.chat -m <this folder>",
        "```",
        "",
    ]
    return "\n".join(lines)


def full_repo_id(repo_id: str, token: str | None) -> str:
    """"name" -> "user/name" using the token's account; "owner/name" as given. Raises ValueError."""
    repo_id = (repo_id or "").strip()
    if not repo_id:
        raise ValueError("give a repo name for the upload, e.g. my-model-exl2 or owner/my-model-exl2")
    if "/" not in repo_id:
        try:
            user = huggingface_hub.HfApi().whoami(token=token)["name"]
        except HfHubHTTPError:
            raise ValueError("the Hub did not accept this token; check it or sign in again") from None
        repo_id = f"{user}/{repo_id}"
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ValueError(f"{repo_id!r} is not a valid repo id: owner/name, letters, digits, '-', '_' and '.'") from None
    return repo_id


def push_to_hub(folder: Path, repo_id: str, token: str | None, private: bool = True,
                perplexity: dict | None = None) -> str:
    """Create (or reuse) the model repo, write the model card into the folder, upload it; the repo URL."""
    if not token:
        raise ValueError("pushing needs a Hugging Face token with write access (or sign in on the Space)")
    folder = Path(folder)
    try:
        repo_id = full_repo_id(repo_id, token)
        meta = read_sidecar(folder)
        output_format = meta.get("settings", {}).get("format", "exl2")
        card = model_card(meta, repo_id, perplexity)
        (folder / MODEL_CARD).write_text(card, encoding="utf-8")
        url = huggingface_hub.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
        huggingface_hub.upload_folder(
            repo_id=repo_id, folder_path=str(folder), token=token, repo_type="model",
            commit_message=f"Upload {folder.name} ({output_format.upper()}, made with quantlab)",
            ignore_patterns=[SIDECAR, ".*"],
        )
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status in (401, 403):
            raise ValueError(f"the Hub refused the upload to {repo_id} (HTTP {status}): the token needs write access "
                             "to that namespace") from None
        raise ValueError(scrub(f"the upload to {repo_id} failed: {error}", token)) from None
    except OSError as error:
        raise ValueError(scrub(f"the upload to {repo_id} failed: {error}", token)) from None
    return str(url)


def zip_model(folder: Path, perplexity: dict | None = None, downloads: Path | None = None) -> Path:
    """The model folder as one zip (with its model card), in the temp dir the web server may serve.

    Made once per model: while the folder and its card are unchanged, the zip made last time is
    handed out again, and its bytes are the same each time, so gradio's cached copy is reused too.
    Only the KEPT_ZIPS zips used last stay on disk.
    """
    folder = Path(folder)
    downloads = downloads or Path(tempfile.gettempdir()) / DOWNLOADS_FOLDER
    card = model_card(read_sidecar(folder), folder.name, perplexity)
    # Keyed by the folder's path: two visitors' libraries may each hold a model of the same name.
    target = downloads / hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16] / f"{folder.name}.zip"
    if not _zip_is_current(target, folder, card):
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")
        try:
            with zipfile.ZipFile(temporary, "w", compression=zipfile.ZIP_STORED) as archive:
                # Packed weights barely compress; storing them keeps a multi-GB zip quick to make.
                for path in _zipped_files(folder):
                    archive.write(path, f"{folder.name}/{path.relative_to(folder)}")
                # A fixed date keeps the bytes the same for the same card.
                archive.writestr(zipfile.ZipInfo(f"{folder.name}/{MODEL_CARD}", date_time=_CARD_DATE), card)
            os.replace(temporary, target)
        finally:
            temporary.unlink(missing_ok=True)
    os.utime(target)  # used now: the last to be cleaned up
    _remove_old_zips(downloads, keep=KEPT_ZIPS)
    return target


DOWNLOADS_FOLDER = "quantlab-downloads"
KEPT_ZIPS = 4
_CARD_DATE = (2024, 1, 1, 0, 0, 0)


def _zipped_files(folder: Path) -> list[Path]:
    return [path for path in sorted(folder.rglob("*"))
            if path.is_file() and not path.name.startswith(".") and path.name not in (SIDECAR, MODEL_CARD)]


def _zip_is_current(target: Path, folder: Path, card: str) -> bool:
    try:
        made = target.stat().st_mtime
        if any(path.stat().st_mtime > made for path in _zipped_files(folder)):
            return False
        with zipfile.ZipFile(target) as archive:
            return archive.read(f"{folder.name}/{MODEL_CARD}").decode("utf-8") == card
    except (OSError, KeyError, zipfile.BadZipFile):
        return False


def _remove_old_zips(downloads: Path, keep: int) -> None:
    zips = sorted(downloads.glob("*/*.zip"), key=lambda path: path.stat().st_mtime, reverse=True)
    for old in zips[keep:]:
        old.unlink(missing_ok=True)
        try:
            old.parent.rmdir()
        except OSError:
            pass  # not empty: another zip is being made there
