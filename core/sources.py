"""Where a model comes from: one spec string in, one Hugging Face model folder out.

A spec is "demo", a local model folder, a .gguf file, or a Hub id ("owner/name").
Everything downstream (loader, converter, chat) only ever sees the folder, and every
way of failing to get one ends in a `ModelSourceError` that says what to do next.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import huggingface_hub
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import (
    GatedRepoError,
    HFValidationError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
)
from huggingface_hub.utils import filter_repo_objects, validate_repo_id

from .config import ModelConfig
from .demo import demo_model_folder
from .errors import ModelSourceError
from .formats.gguf import reader as gguf_reader
from .formats.registry import quantization_of
from .paths import cache_dir


# What a model folder needs from a Hub repo. Pickled weights (.bin, .pt, .pth) are never
# fetched: unpickling runs code from the file.
HUB_FILES = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "quantize_config.json",  # older AutoGPTQ repos keep their GPTQ settings only here
]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")

_PICKLE_REFUSAL = (
    "we never load pickle files because they can run code; look for a safetensors version "
    "of this model (many repos have one, or a copy under another owner)"
)


def is_hub_id(spec: str) -> bool:
    """True for a well-formed Hub model id: "name" or "owner/name"."""
    if spec.count("/") > 1 or spec.endswith(".gguf"):
        return False
    try:
        validate_repo_id(spec)
    except HFValidationError:
        return False
    return True


def resolve_model_source(spec: str, token: str | None = None, allowed_roots: Sequence[str | Path] | None = None) -> Path:
    """The HF-layout folder for `spec`: "demo", a model folder, a .gguf file, or a Hub id.

    With `allowed_roots` (a public server's upload folders) only the demo, Hub ids and
    paths inside those roots are taken; see `refuse_outside_roots`.
    """
    spec = spec.strip()
    if not spec:
        raise ModelSourceError('no model given: name a model folder, a .gguf file, a Hub id like "owner/name", or "demo"')
    if spec == "demo":
        return demo_model_folder()
    if allowed_roots is not None:
        if refuse_outside_roots(spec, allowed_roots) == "hub":
            return _hub_snapshot(spec, token or os.environ.get("HF_TOKEN") or None)

    path = Path(spec).expanduser()
    if path.is_dir():
        return _model_folder(path)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return _imported_gguf(path)
        raise ModelSourceError(f"{spec} is a file; give the model folder that holds config.json, or a .gguf file")
    if _looks_like_path(spec):
        raise ModelSourceError(f"{spec} does not exist; check the path (a Hub id looks like owner/name)")
    if not is_hub_id(spec):
        raise ModelSourceError(
            f"{spec!r} is not a folder, a .gguf file or a Hugging Face model id; "
            'a Hub id looks like "owner/name": letters, digits, "-", "_" and "." only'
        )
    return _hub_snapshot(spec, token or os.environ.get("HF_TOKEN") or None)


PUBLIC_SOURCE_REFUSAL = (
    "this server takes only the demo, a Hugging Face model id (owner/name) or an uploaded file; "
    "paths on the server are not available here"
)


def refuse_outside_roots(spec: str, allowed_roots: Sequence[str | Path]) -> str:
    """"hub" or "path" for a spec a public server takes, else one sentence whether or not the path exists.

    A well-formed Hub id is always a Hub id here, never a relative path on the server.
    """
    spec = spec.strip()
    if spec == "demo" or (is_hub_id(spec) and not _looks_like_path(spec)):
        return "hub"
    # realpath resolves symlinks without asking whether the path exists.
    real = Path(os.path.realpath(Path(spec).expanduser()))
    if any(real.is_relative_to(os.path.realpath(root)) for root in allowed_roots):
        return "path"
    raise ModelSourceError(PUBLIC_SOURCE_REFUSAL)


def resolve_model_config(spec: str, token: str | None = None,
                         allowed_roots: Sequence[str | Path] | None = None) -> ModelConfig:
    """`spec`'s config, fetching nothing else: for a Hub id only config.json comes down.

    Lets a conversion refuse an unreachable target before any weights are downloaded.
    `allowed_roots` limits other sources as resolve_model_source does.
    """
    spec = spec.strip()
    if is_hub_id(spec) and spec != "demo" and not Path(spec).expanduser().exists():
        return ModelConfig.from_folder(_hub_config_folder(spec, token or os.environ.get("HF_TOKEN") or None))
    return ModelConfig.from_folder(resolve_model_source(spec, token, allowed_roots))


# ---------------------------------------------------------------- local


def _looks_like_path(spec: str) -> bool:
    return (
        spec.startswith(("/", ".", "~", "\\"))
        or spec.count("/") > 1
        or "\\" in spec
        or re.match(r"^[A-Za-z]:", spec) is not None
        or spec.lower().endswith((".gguf", ".safetensors", *PICKLE_SUFFIXES))
    )


def _model_folder(folder: Path) -> Path:
    if not (folder / "config.json").is_file():
        gguf_files = sorted(folder.glob("*.gguf"))
        hint = f"; to use a GGUF, give the file itself, e.g. {gguf_files[0]}" if gguf_files else ""
        raise ModelSourceError(
            f"{folder} has no config.json; give the Hugging Face model folder that holds "
            f"config.json and *.safetensors{hint}"
        )
    _require_safetensors(str(folder), [p.name for p in folder.iterdir()])
    ModelConfig.from_folder(folder)
    return folder


def _require_safetensors(label: str, file_names: list[str]) -> None:
    if any(name.endswith(".safetensors") for name in file_names):
        return
    if any(name.endswith(PICKLE_SUFFIXES) for name in file_names):
        raise ModelSourceError(f"{label} has its weights only as PyTorch pickle files (.bin/.pt/.pth): {_PICKLE_REFUSAL}")
    if any(name.endswith(".gguf") for name in file_names):
        raise ModelSourceError(f"{label} has GGUF weights only; download one .gguf file and give its path instead")
    raise ModelSourceError(f"{label} has no .safetensors weights")


def _imported_gguf(gguf_path: Path) -> Path:
    folder = cache_dir() / "models" / f"gguf-{gguf_path.stem}-{_gguf_fingerprint(gguf_path)}"
    if gguf_reader.is_complete_import(folder):
        return folder
    return gguf_reader.import_gguf(gguf_path, folder)


def _gguf_fingerprint(gguf_path: Path) -> str:
    # Hashing a multi-GB file on every start would take longer than loading it; size, mtime
    # and the metadata at the head of the file tell apart any two files a user really has.
    stat = gguf_path.stat()
    digest = hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}:".encode())
    with open(gguf_path, "rb") as head:
        digest.update(head.read(1 << 20))
    return digest.hexdigest()[:12]


# ---------------------------------------------------------------- Hub


def _hub_config_folder(repo_id: str, token: str | None) -> Path:
    with _readable_hub_errors(repo_id):
        return Path(huggingface_hub.hf_hub_download(repo_id, "config.json", token=token)).parent


def _hub_snapshot(repo_id: str, token: str | None) -> Path:
    config_folder = _hub_config_folder(repo_id, token)
    # Checked before the weights come down, so an unsupported model (or quantization) costs one small file.
    ModelConfig.from_folder(config_folder)
    quantization_of(config_folder)
    if not huggingface_hub.is_offline_mode():
        with _readable_hub_errors(repo_id):
            _refuse_without_room(repo_id, token)
    with _readable_hub_errors(repo_id):
        folder = Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=HUB_FILES, token=token))

    file_names = [str(p.relative_to(folder)) for p in folder.rglob("*")]
    if not any(name.endswith(".safetensors") for name in file_names) and not huggingface_hub.is_offline_mode():
        # The pickles were filtered out of the download; only the Hub's listing shows them.
        with _readable_hub_errors(repo_id):
            file_names = huggingface_hub.list_repo_files(repo_id, token=token)
    _require_safetensors(f"The Hub repo {repo_id}", file_names)
    return folder


# Room left beside a download: the Hub cache's own files, and other writers on the same disk.
DOWNLOAD_HEADROOM_BYTES = 512 * 1024**2


def _refuse_without_room(repo_id: str, token: str | None) -> None:
    """Refuse a download that cannot fit, before it starts; the sizes come from the Hub's listing."""
    info = huggingface_hub.HfApi().model_info(repo_id, files_metadata=True, token=token)
    wanted = list(filter_repo_objects(info.siblings or [], allow_patterns=HUB_FILES, key=lambda f: f.rfilename))
    needed = sum(
        entry.size or 0 for entry in wanted
        # Files already in the cache for this revision are not fetched again.
        if not isinstance(huggingface_hub.try_to_load_from_cache(repo_id, entry.rfilename, revision=info.sha), str)
    )
    probe = Path(hub_constants.HF_HUB_CACHE)
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed + DOWNLOAD_HEADROOM_BYTES > free:
        raise ModelSourceError(
            f"not enough disk space to download {repo_id}: it needs {needed / 1e9:.1f} GB and {probe} "
            f"has {free / 1e9:.1f} GB free; free some space or point HF_HUB_CACHE at a larger disk"
        )


@contextmanager
def _readable_hub_errors(repo_id: str):
    offline = huggingface_hub.is_offline_mode()
    try:
        yield
    except GatedRepoError:
        raise ModelSourceError(
            f"{repo_id} is a gated model: accept its license on https://huggingface.co/{repo_id}, "
            "then log in with `hf auth login` or pass an access token"
        ) from None
    except RepositoryNotFoundError:
        raise ModelSourceError(
            f"{repo_id} was not found on the Hugging Face Hub: check the spelling; private repos need a token"
        ) from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as error:
        if offline:
            raise ModelSourceError(
                f"{repo_id} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                "unset HF_HUB_OFFLINE to download it, or give a local folder"
            ) from None
        raise ModelSourceError(
            f"could not reach the Hugging Face Hub and {repo_id} is not in the local cache; "
            f"check the network connection ({error})"
        ) from None
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status in (401, 403):
            raise ModelSourceError(
                f"the Hub refused access to {repo_id} (HTTP {status}); check that your token is valid "
                "and may read this repo"
            ) from None
        raise ModelSourceError(f"downloading {repo_id} from the Hugging Face Hub failed: {error}") from None
