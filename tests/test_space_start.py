"""`python app.py` started exactly as a Hugging Face Space starts it, driven by gradio_client.

The Space's environment is set as Hugging Face sets it (SYSTEM=spaces, SPACE_ID and the
OAuth variables), so gradio mounts its real OAuth routes (they need gradio[oauth]). Only
the network is kept away: HF_HUB_OFFLINE, and an OpenID provider that is never asked
(gradio reads its metadata at the first sign-in, which this test does not do).
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

gradio_client = pytest.importorskip("gradio_client")

from core.demo import DEMO_FOLDER_NAME  # noqa: E402
from core.sources import PUBLIC_SOURCE_REFUSAL  # noqa: E402
from tests.app_server import ROOT, free_port, running_app  # noqa: E402

pytestmark = pytest.mark.slow

SPACE_ENVIRONMENT = {
    "SYSTEM": "spaces",
    "SPACE_ID": "user/quantlab",
    "SPACE_HOST": "user-quantlab.hf.space",
    "OAUTH_CLIENT_ID": "00000000-0000-0000-0000-000000000000",
    "OAUTH_CLIENT_SECRET": "not-a-real-secret",
    "OAUTH_SCOPES": "openid profile",
    "OPENID_PROVIDER_URL": "https://huggingface.co",
}

UPLOAD_LIMIT_GB = 1e-5  # about 10 kB, so the test can go over it cheaply


@pytest.fixture(scope="module")
def space(demo_folder, tmp_path_factory):
    """The app as a Space runs it, with its own QUANTLAB_HOME: the demo, and a model a local
    user once imported from a server path (which no visitor of the Space may see)."""
    home = tmp_path_factory.mktemp("space-home")
    (home / "models").mkdir()
    (home / "models" / DEMO_FOLDER_NAME).symlink_to(demo_folder)
    imported = home / "models" / "gguf-from-a-server-path"
    imported.mkdir()
    (imported / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (imported / "model.safetensors").write_bytes(b"")
    port = free_port()
    log_path = home / "app.log"
    env = dict(SPACE_ENVIRONMENT, QUANTLAB_HOME=str(home), GRADIO_SERVER_PORT=str(port), HF_HUB_OFFLINE="1",
               GRADIO_ANALYTICS_ENABLED="False", QUANTLAB_MAX_UPLOAD_GB=str(UPLOAD_LIMIT_GB),
               GRADIO_TEMP_DIR=str(home / "gradio"))
    with running_app([], env, log_path, port, what="the app run as a Space") as (url, server):
        yield url, server, log_path


def still_serving(url: str, server) -> bool:
    return server.poll() is None and urllib.request.urlopen(url, timeout=10).status == 200


def test_the_space_signs_in_through_hugging_face(space):
    url, server, _ = space
    # The real OAuth routes are mounted (mocked ones would sign in as a local user at once).
    opener = urllib.request.build_opener(type("NoRedirect", (urllib.request.HTTPRedirectHandler,),
                                              {"redirect_request": lambda *args: None}))
    with pytest.raises(urllib.request.HTTPError) as redirect:
        opener.open(url + "logout", timeout=10)
    assert redirect.value.code in (302, 307)
    assert still_serving(url, server)


def test_models_lists_the_demo_and_nothing_from_server_paths(space):
    url, server, _ = space
    models = gradio_client.Client(url, verbose=False).predict(api_name="/models")
    assert [model["name"] for model in models] == ["demo"]


def test_chat_answers_on_the_demo(space):
    url, server, _ = space
    result = gradio_client.Client(url, verbose=False).predict(
        "What is the capital of France?", "demo", api_name="/chat", max_new_tokens=12)
    assert result["done"] and "Paris" in result["answer"]
    assert still_serving(url, server)


@pytest.mark.parametrize("source", ["/some/server/path/model.gguf", str(ROOT), "gguf-from-a-server-path/../.."])
def test_a_server_path_as_source_is_refused_with_one_sentence(space, source):
    url, server, _ = space
    client = gradio_client.Client(url, verbose=False)
    with pytest.raises(gradio_client.exceptions.AppError) as refusal:
        client.predict(source, 4.0, api_name="/quantize")
    assert str(refusal.value) == PUBLIC_SOURCE_REFUSAL
    assert still_serving(url, server)
    assert [model["name"] for model in client.predict(api_name="/models")] == ["demo"]


@pytest.mark.parametrize("calibration", ["/etc/passwd", "/proc/self/environ", "/no/such/file.txt"])
def test_a_server_file_as_calibration_is_refused_with_one_sentence(space, calibration):
    url, server, _ = space
    with pytest.raises(gradio_client.exceptions.AppError) as refusal:
        gradio_client.Client(url, verbose=False).predict("demo", 4.0, calibration=calibration, api_name="/quantize")
    assert str(refusal.value) == (f"calibration file {calibration} is not available here: upload a text file, "
                                  "or name a Hub dataset file as hf:<dataset id>:<file>")
    assert still_serving(url, server)


def raw_call(url: str, endpoint: str, body: str) -> str:
    """gradio's HTTP API with a hand-written body: JSON can carry 1e999 (inf), which no client sends."""
    start = urllib.request.Request(f"{url}gradio_api/call/{endpoint}", data=body.encode(),
                                   headers={"Content-Type": "application/json"})
    event_id = json.loads(urllib.request.urlopen(start, timeout=30).read())["event_id"]
    return urllib.request.urlopen(f"{url}gradio_api/call/{endpoint}/{event_id}", timeout=300).read().decode()


def test_infinite_temperature_gets_a_sentence(space):
    url, server, _ = space
    # message, model, system, history, temperature, top_k, top_p, min_p, repetition_penalty, max_new_tokens, seed
    stream = raw_call(url, "chat", '{"data": ["Hello", "demo", "", [], 1e999, 50, 1.0, 0.0, 1.0, 8, -1]}')
    assert "event: error" in stream and "temperature must be a finite number, not inf" in stream
    assert still_serving(url, server)


def test_max_new_tokens_below_one_gets_a_sentence(space):
    url, server, _ = space
    with pytest.raises(gradio_client.exceptions.AppError, match="max_new_tokens must be a whole number >= 1, not 0"):
        gradio_client.Client(url, verbose=False).predict("Hello", "demo", api_name="/chat", max_new_tokens=0)
    assert still_serving(url, server)


def test_an_upload_over_the_cap_is_refused_and_not_kept(space):
    url, server, log_path = space
    boundary = "quantlab-test-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.gguf\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + b"GGUF" + bytes(50_000) + \
        f"\r\n--{boundary}--\r\n".encode()
    upload = urllib.request.Request(f"{url}gradio_api/upload", data=body,
                                    headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with pytest.raises(urllib.request.HTTPError) as refusal:
        urllib.request.urlopen(upload, timeout=30)
    assert refusal.value.code == 413
    assert refusal.value.read().decode() == f"File size exceeded maximum allowed size of {int(UPLOAD_LIMIT_GB * 1024**3)} bytes."
    assert not list((Path(log_path.parent) / "gradio").rglob("big.gguf"))
    assert still_serving(url, server)


def test_no_refusal_left_a_traceback_in_the_log(space):
    *_, log_path = space
    # (asyncio's own noise about closed event loops may be there; no frame of ours may be)
    assert f'File "{ROOT}' not in log_path.read_text()
