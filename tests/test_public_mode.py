"""The public server's limits without a browser: sources and calibration files, per-visitor
libraries, the upload cap, zips made once and cleaned up, and a long chat history fitted fast."""

from __future__ import annotations

import json
import os
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from core.convert.calibration import CalibrationError
from core.convert.job import ConversionSettings
from core.errors import ModelSourceError
from core.sources import PUBLIC_SOURCE_REFUSAL, resolve_model_source
from tests.tiny_models import save_tiny_chat_model
from webui import hub
from webui.access import Access
from webui.chats import fit_to_context
from webui.conversions import ConversionRequest, chosen_source, conversion_command
from webui.services import Services

CALIBRATION_REFUSAL = "is not available here: upload a text file, or name a Hub dataset file as hf:<dataset id>:<file>"


@pytest.fixture
def uploads(tmp_path):
    folder = tmp_path / "gradio-uploads"
    folder.mkdir()
    return folder


@pytest.fixture
def public(uploads):
    return Access(public=True, max_upload_bytes=1000, upload_roots=(uploads,))


def fake_model(folder: Path, bpw: float | None = 4.0) -> Path:
    folder.mkdir(parents=True)
    config = {"architectures": ["LlamaForCausalLM"]}
    if bpw:
        config["quantization_config"] = {"quant_method": "exl2", "bits": bpw}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"weights")
    return folder


# ---------------------------------------------------------------- sources and calibration


def test_server_paths_are_refused_as_sources_with_one_sentence(public, tmp_path):
    existing_model = fake_model(tmp_path / "server-model", bpw=None)
    for source in ("/some/server/path/model.gguf", str(existing_model), "/etc/passwd", "../models", "x.gguf"):
        with pytest.raises(ModelSourceError) as refusal:
            public.check_source(source)
        assert str(refusal.value) == PUBLIC_SOURCE_REFUSAL
        # core refuses the same way, for a caller that skipped the page's check
        with pytest.raises(ModelSourceError, match="paths on the server are not available here"):
            resolve_model_source(source, allowed_roots=public.roots)


def test_demo_hub_ids_and_uploads_are_sources_in_public_mode(public, uploads):
    for source in ("demo", "owner/name", "gpt2", str(uploads / "abc" / "model.gguf")):
        public.check_source(source)
    # Locally every path is the owner's to use.
    Access().check_source("/some/server/path/model.gguf")


def test_a_hub_id_is_never_read_as_a_relative_server_path(public, tmp_path, monkeypatch):
    fake_model(tmp_path / "owner" / "local-model", bpw=None)
    monkeypatch.chdir(tmp_path)
    asked = []
    monkeypatch.setattr("core.sources._hub_snapshot", lambda repo_id, token: asked.append(repo_id) or Path("hub"))
    assert resolve_model_source("owner/local-model", allowed_roots=public.roots) == Path("hub")
    assert asked == ["owner/local-model"]


def test_calibration_in_public_mode_is_an_upload_or_a_hub_file(public, uploads):
    for source in ("/etc/passwd", "/proc/self/environ", "/no/such/file.txt"):
        with pytest.raises(CalibrationError) as refusal:
            public.check_calibration(source)
        assert str(refusal.value) == f"calibration file {source} {CALIBRATION_REFUSAL}"
    public.check_calibration(str(uploads / "abc" / "text.txt"))
    public.check_calibration("hf:someone/texts:train.parquet")
    Access().check_calibration("/etc/passwd")


# ---------------------------------------------------------------- libraries


def test_each_visitor_sees_the_demo_and_their_own_models_only(public, tmp_path):
    services = Services.create(tmp_path / "models", tmp_path / "work", access=public)
    alice = services.library(SimpleNamespace(session_hash="s1"), SimpleNamespace(username="alice"))
    bob = services.library(SimpleNamespace(session_hash="s2"), None)
    assert alice == tmp_path / "models" / "users" / "user-alice"
    assert bob == tmp_path / "models" / "users" / "session-s2"
    fake_model(alice / "gated-model-exl2-4.00bpw-h6")
    fake_model(tmp_path / "models" / "gguf-imported-from-a-server-path", bpw=None)

    assert services.model_names(alice) == ["demo", "gated-model-exl2-4.00bpw-h6"]
    assert services.model_names(bob) == ["demo"]
    assert services.model_names() == ["demo"]  # before the page knows who asks
    with pytest.raises(ValueError, match="no local model called 'gated-model-exl2-4.00bpw-h6'"):
        services.find_model("gated-model-exl2-4.00bpw-h6", bob)
    with pytest.raises(ValueError, match="no local model called"):
        services.find_model(str(alice / "gated-model-exl2-4.00bpw-h6"), bob)
    assert services.find_model("gated-model-exl2-4.00bpw-h6", alice).spec == str(alice / "gated-model-exl2-4.00bpw-h6")


def test_locally_there_is_one_library(tmp_path):
    services = Services.create(tmp_path / "models", tmp_path / "work")
    fake_model(tmp_path / "models" / "made-here")
    assert services.library(SimpleNamespace(session_hash="s1"), None) == tmp_path / "models"
    assert services.model_names() == services.model_names(services.library()) == ["demo", "made-here"]


def test_a_conversion_goes_to_its_visitors_library_and_is_not_shared(public, tmp_path):
    services = Services.create(tmp_path / "models", tmp_path / "work", access=public)
    settings = ConversionSettings(bpw=4.0)
    libraries = [services.library(SimpleNamespace(session_hash=h), None) for h in ("a", "b")]
    paths = [services.conversions.paths_for(ConversionRequest("owner/gated", settings, "cpu", library=library))
             for library in libraries]
    assert [output.parent for _, output in paths] == libraries
    assert paths[0][0] != paths[1][0]  # separate work dirs: neither watches nor resumes the other's


# ---------------------------------------------------------------- uploads


def test_an_upload_over_the_cap_is_refused_and_deleted(public, uploads):
    big = uploads / "h1" / "big.gguf"
    big.parent.mkdir()
    big.write_bytes(b"GGUF" + bytes(2000))
    with pytest.raises(ValueError, match=r"^big.gguf is 0.0 GB, over this server's upload limit of 0.0 GB$"):
        public.accept_upload(str(big))
    assert not big.exists()


def test_an_upload_that_is_not_gguf_is_deleted_when_refused(public, uploads):
    text = uploads / "h2" / "notes.gguf"
    text.parent.mkdir()
    text.write_bytes(b"hello")
    with pytest.raises(ValueError, match="notes.gguf is not a GGUF file"):
        public.accept_upload(str(text), check=lambda path: chosen_source(None, path))
    assert not text.exists()


def test_a_local_file_refused_as_upload_stays_where_its_owner_put_it(tmp_path):
    mine = tmp_path / "mine.gguf"
    mine.write_bytes(b"not gguf")
    with pytest.raises(ValueError, match="not a GGUF file"):
        Access(upload_roots=(tmp_path / "uploads",)).accept_upload(str(mine), check=lambda p: chosen_source(None, p))
    assert mine.exists()


def test_a_space_or_the_public_flag_turns_the_limits_on(monkeypatch):
    monkeypatch.delenv("SPACE_ID", raising=False)
    monkeypatch.delenv("QUANTLAB_MAX_UPLOAD_GB", raising=False)
    local = Access.for_environment()
    assert not local.public and local.roots is None and local.max_upload_bytes is None
    flagged = Access.for_environment(public=True)
    assert flagged.public and flagged.roots == flagged.upload_roots and flagged.max_upload_bytes == 6 * 1024**3
    monkeypatch.setenv("SPACE_ID", "user/quantlab")
    assert Access.for_environment().public


def test_launch_passes_the_cap_to_gradio(public):
    assert public.launch_options() == {"max_file_size": 1000}
    assert Access().launch_options() == {}


# ---------------------------------------------------------------- zips


def test_zip_is_made_once_per_model_and_remade_when_the_model_changes(tmp_path):
    model = fake_model(tmp_path / "models" / "m-exl2-4.00bpw-h6")
    downloads = tmp_path / "downloads"
    first = hub.zip_model(model, downloads=downloads)
    made = first.stat().st_mtime_ns
    first_bytes = first.read_bytes()
    time.sleep(0.01)
    again = hub.zip_model(model, downloads=downloads)
    assert again == first and again.read_bytes() == first_bytes  # same bytes: gradio's copy is reused too
    assert len(list(downloads.rglob("*.zip"))) == 1 and not list(downloads.rglob("*.part"))

    os.utime(model / "model.safetensors", ns=(made + 10**9, made + 10**9))
    (model / "model.safetensors").write_bytes(b"new weights")
    os.utime(model / "model.safetensors", ns=(made + 10**9, made + 10**9))
    remade = hub.zip_model(model, downloads=downloads)
    with zipfile.ZipFile(remade) as archive:
        assert archive.read(f"{model.name}/model.safetensors") == b"new weights"


def test_only_the_latest_zips_stay_on_disk(tmp_path):
    downloads = tmp_path / "downloads"
    for index in range(hub.KEPT_ZIPS + 3):
        hub.zip_model(fake_model(tmp_path / "models" / f"m{index}"), downloads=downloads)
    kept = sorted(path.name for path in downloads.rglob("*.zip"))
    assert kept == [f"m{index}.zip" for index in range(3, hub.KEPT_ZIPS + 3)]


def test_same_model_name_in_two_libraries_gives_two_zips(tmp_path):
    downloads = tmp_path / "downloads"
    a = hub.zip_model(fake_model(tmp_path / "users" / "a" / "m"), downloads=downloads)
    b = hub.zip_model(fake_model(tmp_path / "users" / "b" / "m"), downloads=downloads)
    assert a != b and a.name == b.name == "m.zip"


# ---------------------------------------------------------------- chat history


def reference_fit(loaded, messages, max_seq_len, room):
    """The old way: drop the oldest pair and encode everything again, until it fits."""
    messages = list(messages)
    first = 1 if messages and messages[0]["role"] == "system" else 0
    while True:
        ids = loaded.tokenizer.encode_chat(messages, add_generation_prompt=True)
        if len(ids) + room <= max_seq_len or len(messages) - first <= 1:
            return ids
        del messages[first : first + 2]


def history(turns: int, system: bool = True) -> list[dict]:
    messages = [{"role": "system", "content": "You are terse."}] if system else []
    for turn in range(turns):
        messages.append({"role": "user", "content": f"Question {turn}: what is {turn} plus {turn * 7 % 13}?"})
        messages.append({"role": "assistant", "content": f"It is {turn + turn * 7 % 13}." + " Indeed." * (turn % 5)})
    messages.append({"role": "user", "content": "And the last one?"})
    return messages


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    from core.loader import load

    folder = tmp_path_factory.mktemp("chat") / "tiny-chat"
    save_tiny_chat_model("llama-gqa", folder)
    return load(str(folder), device="cpu")


@pytest.mark.parametrize("turns, system", [(0, True), (3, False), (40, True), (41, False)])
@pytest.mark.parametrize("max_seq_len, room", [(256, 64), (512, 128), (4096, 256), (40, 30)])
def test_fitting_a_history_keeps_what_dropping_pair_by_pair_kept(chat_model, turns, system, max_seq_len, room):
    messages = history(turns, system)
    assert fit_to_context(chat_model, messages, max_seq_len, room) == reference_fit(chat_model, messages,
                                                                                    max_seq_len, room)


def test_a_2500_turn_history_fits_in_well_under_a_few_seconds(chat_model):
    messages = history(2500)
    start = time.perf_counter()
    ids = fit_to_context(chat_model, messages, 2048, 256)
    assert time.perf_counter() - start < 3.0
    assert len(ids) + 256 <= 2048
    assert ids == reference_fit(chat_model, messages[:1] + messages[-301:], 2048, 256)


def test_the_child_conversion_gets_the_public_roots_and_the_checked_folder(public, uploads, tmp_path):
    request = ConversionRequest("owner/model", ConversionSettings(bpw=4.0, calibration="hf:someone/texts:a.txt"),
                                "cpu", roots=public.roots)
    command = conversion_command(request, tmp_path / "work", tmp_path / "out", source="/hub/cache/snapshot")
    assert "--in-dir=/hub/cache/snapshot" in command and f"--calibration-root={uploads}" in command
    local = conversion_command(ConversionRequest("owner/model", ConversionSettings(bpw=4.0), "cpu"),
                               tmp_path / "work", tmp_path / "out")
    assert "--in-dir=owner/model" in local and not any(arg.startswith("--calibration-root") for arg in local)
