"""What the web app promises without a browser: the conversion queue, readable refusals,
chat sessions that keep to themselves, the model card, the zip and the charts."""

from __future__ import annotations

import re
import threading
import zipfile
from collections import namedtuple
from pathlib import Path

import pytest

from core.convert.job import ConversionSettings
from core.convert.progress import ProgressEvent
from core.errors import ModelSourceError
from tests.fake_hub import serve_config_only
from tests.tiny_models import sample_text, save_tiny_chat_model
from webui import hub, plots
from webui.common import history_messages, message_text
from webui.chats import ChatSessions, ModelCache, stream_answer
from webui.conversions import (
    CANCELLED, DONE, FAILED, ConversionQueue, ConversionRequest, check_disk_space, chosen_source, conversion_request,
)
from webui.library import local_models


def request_for(source: str, bpw: float = 4.0, token: str | None = None, **settings) -> ConversionRequest:
    return ConversionRequest(source, ConversionSettings(bpw=bpw, **settings), device="cpu", token=token)


class GatedRunner:
    """Stands in for a conversion: waits until the test lets it finish, or raises what it was given."""

    def __init__(self, error: Exception | None = None):
        self.release = threading.Event()
        self.started = threading.Event()
        self.error = error

    def __call__(self, task, models_folder):
        self.started.set()
        if self.error is not None:
            raise self.error
        self.release.wait(30)
        if task.cancel.is_set():
            from core.convert.progress import ConversionCancelled

            raise ConversionCancelled("stopped")
        return "result"


@pytest.fixture
def queue_with(tmp_path):
    def make(runner) -> ConversionQueue:
        return ConversionQueue(tmp_path / "models", tmp_path / "work", runner=runner)

    return make


def test_a_second_conversion_waits_in_line_and_knows_its_place(queue_with):
    runner = GatedRunner()
    queue = queue_with(runner)
    first = queue.submit(request_for("demo", 4.0))
    assert runner.started.wait(10)
    second = queue.submit(request_for("demo", 3.0))
    assert queue.position(first) == 0 and queue.position(second) == 1
    runner.release.set()
    assert queue.wait(first, 10) and queue.wait(second, 10)
    assert first.state == second.state == DONE


def test_pressing_start_twice_watches_one_conversion(queue_with):
    runner = GatedRunner()
    queue = queue_with(runner)
    first = queue.submit(request_for("demo"))
    assert queue.submit(request_for("demo")) is first
    runner.release.set()
    queue.wait(first, 10)


def test_cancel_while_waiting_or_running_says_so_and_keeps_serving(queue_with):
    runner = GatedRunner()
    queue = queue_with(runner)
    running = queue.submit(request_for("demo", 4.0))
    assert runner.started.wait(10)
    waiting = queue.submit(request_for("demo", 3.0))
    queue.cancel(waiting)
    assert waiting.state == CANCELLED and "before it started" in waiting.message
    queue.cancel(running)
    runner.release.set()
    assert queue.wait(running, 10) and running.state == CANCELLED and "Resume" in running.message


def test_a_failed_conversion_says_why_in_words_without_the_token(queue_with):
    secret = "hf_not_a_real_token_123"
    queue = queue_with(GatedRunner(ModelSourceError(f"meta-llama/x is a gated model (sent {secret})")))
    task = queue.submit(request_for("meta-llama/x", token=secret))
    queue.wait(task, 10)
    assert task.state == FAILED and "gated model" in task.message
    assert secret not in task.message and task.request.token is None


def test_an_unexpected_failure_is_summarised_and_the_next_job_still_runs(queue_with):
    runner = GatedRunner(RuntimeError("boom"))
    queue = queue_with(runner)
    task = queue.submit(request_for("demo", 4.0))
    queue.wait(task, 10)
    assert task.state == FAILED and "unexpectedly" in task.message and "server log" in task.message
    runner.error = None
    runner.release.set()
    after = queue.submit(request_for("demo", 3.0))
    assert queue.wait(after, 10) and after.state == DONE


@pytest.mark.parametrize("bpw", [1.5, 8.5, float("nan")])
def test_bpw_outside_2_to_8_is_refused_in_words(bpw):
    with pytest.raises(ValueError, match="between 2.0 and 8.0"):
        conversion_request("demo", bpw, 6, None, 32, 512, 16, "maximin")


@pytest.mark.parametrize("rows, length, measurement_rows, objective, message", [
    (10**5, 512, 16, "maximin", "calibration rows must be between 1 and 1024, got 100000"),
    (32, 10**6, 16, "maximin", "tokens per calibration row must be between 16 and 8192, got 1000000"),
    (32, 8, 16, "maximin", "tokens per calibration row must be between 16 and 8192, got 8"),
    (32, 512, 0, "maximin", "measurement rows must be between 1 and the number of calibration rows"),
    (32, 512, 16, "most-bits", "objective must be one of maximin, sum-log, sum-sq, got 'most-bits'"),
])
def test_the_page_the_api_and_the_cli_share_the_bounds_of_a_conversion(rows, length, measurement_rows, objective,
                                                                        message):
    with pytest.raises(ValueError, match=re.escape(message)):
        conversion_request("demo", 4.0, 6, None, rows, length, measurement_rows, objective)
    with pytest.raises(ValueError, match=re.escape(message)):
        ConversionSettings(rows=rows, length=length, measurement_rows=measurement_rows, objective=objective,
                           measurement_eval_rows=max(1, min(4, measurement_rows))).validate()


def test_each_session_may_queue_a_few_conversions_and_the_whole_app_a_few_more(queue_with):
    runner = GatedRunner()
    queue = queue_with(runner)
    queue.per_session, queue.total = 2, 3
    mine = [queue.submit(request_for("demo", bpw), owner="alice") for bpw in (3.0, 4.0)]
    with pytest.raises(ValueError, match="you already have 2 conversions waiting or running"):
        queue.submit(request_for("demo", 5.0), owner="alice")
    assert queue.submit(request_for("demo", 3.0), owner="alice") is mine[0]  # the same job is watched, not counted
    queue.submit(request_for("demo", 5.0), owner="bob")
    with pytest.raises(ValueError, match="the conversion queue is full"):
        queue.submit(request_for("demo", 6.0), owner="carol")
    runner.release.set()
    assert all(queue.wait(task, 10) for task in queue.tasks.values())
    assert queue.submit(request_for("demo", 6.0), owner="carol").state != FAILED  # room again once they finished


def test_only_the_session_that_started_a_conversion_can_cancel_it(queue_with):
    runner = GatedRunner()
    queue = queue_with(runner)
    task = queue.submit(request_for("demo"), owner="alice")
    assert runner.started.wait(10)
    with pytest.raises(ValueError, match="started in another session; only that session can cancel it"):
        queue.cancel(task, owner="mallory")
    assert not task.cancel.is_set()
    queue.cancel(task, owner="alice")
    runner.release.set()
    assert queue.wait(task, 10) and task.state == CANCELLED


def test_an_upload_that_is_not_gguf_is_refused(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_text("hello")
    with pytest.raises(ValueError, match="not a GGUF file"):
        chosen_source("demo", str(fake))
    real_magic = tmp_path / "real.gguf"
    real_magic.write_bytes(b"GGUF" + bytes(16))
    assert chosen_source("demo", str(real_magic)) == str(real_magic)


def test_not_enough_disk_is_refused_before_converting(tmp_path, monkeypatch):
    source = tmp_path / "source"
    source.mkdir()
    (source / "model.safetensors").write_bytes(bytes(1024))
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr("shutil.disk_usage", lambda path: Usage(10**9, 10**9, 1024))
    with pytest.raises(ValueError, match="not enough disk space"):
        check_disk_space(source, 4.0, tmp_path / "models")


def test_a_hub_model_below_its_floor_is_refused_before_its_weights_come_down(tmp_path, monkeypatch):
    model = tmp_path / "tiny"
    save_tiny_chat_model("llama-gqa", model)
    fetched = serve_config_only(monkeypatch, model)
    queue = ConversionQueue(tmp_path / "models", tmp_path / "work")
    task = queue.submit(request_for("someone/tiny-llama", 2.05))
    assert queue.wait(task, 60) and task.state == FAILED
    assert "the lowest this model can reach" in task.message
    assert fetched == ["config.json"] and task.process is None  # no child was started either


def test_hub_search_is_off_offline():
    assert hub.hub_offline()  # the tests run with HF_HUB_OFFLINE=1
    assert hub.search_models("llama") == []


def test_model_card_names_the_base_model_bits_and_quality():
    meta = {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "settings": {"bpw": 4.0, "head_bits": 6, "rows": 8,
            "length": 128, "objective": "maximin"},
            "result": {"bpw": 3.98, "head_bpw": 6.1, "size_bytes": 9e7}}
    card = hub.model_card(meta, "me/smol-exl2", {"quantized": 30.5, "reference": 19.4, "text": "Othello", "ctx": 512})
    front = card.split("---")[1]
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in front
    assert "- exl2" in front and "- quantized" in front
    assert "3.98" in card and "30.50" in card and "19.40" in card


def test_chat_history_from_the_page_becomes_plain_messages():
    history = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
               {"role": "assistant", "content": [{"type": "text", "text": "Hello!"}]},
               {"role": "user", "content": "And you?"}]
    assert history_messages(history, "Be brief.") == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "And you?"}]
    assert message_text([{"type": "file", "file": {}}]) == ""


def measure_event(layer: int, group: str, errors: list[float]) -> ProgressEvent:
    return ProgressEvent("measure", (layer + 1) / 4, "", layer, 4, f"model.layers.{layer}.{group}",
                         [{"bpw": 2.0 + i, "error": e} for i, e in enumerate(errors)])


def test_the_per_layer_chart_grows_with_each_measured_module_and_marks_the_chosen():
    events = [measure_event(0, "self_attn", [0.1, 0.05, 0.01])]
    one = plots.measurement_figure(events)
    events += [measure_event(0, "mlp", [0.2, 0.1, 0.02]), measure_event(1, "self_attn", [0.1, 0.04, 0.01])]
    three = plots.measurement_figure(events, chosen={"model.layers.0.mlp": 1})

    def points(figure, name_part):
        return sum(len(trace.x) for trace in figure.data if name_part in trace.name)

    assert points(one, "candidates") == 3 and points(three, "candidates") == 9
    assert points(three, "chosen") == 1
    assert list(three.layout.xaxis.range) == [-0.6, 3.6]  # the whole model's width from the start


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    save_tiny_chat_model("llama-gqa", folder)
    text = folder.parent / "calibration.txt"
    text.write_text(sample_text(300))
    return folder, text


def test_the_queue_converts_a_model_records_it_and_hands_it_back_when_asked_again(tiny_model, tmp_path):
    folder, text = tiny_model
    queue = ConversionQueue(tmp_path / "models", tmp_path / "work")
    request = request_for(str(folder), 4.0, rows=4, length=32, measurement_rows=4,
                          measurement_eval_rows=4, calibration=str(text))
    task = queue.submit(request)
    assert queue.wait(task, 600) and task.state == DONE, task.message
    assert any(event.stage == "measure" and event.candidates for event in task.events)
    listed = {model.name: model for model in local_models(tmp_path / "models")}
    made = listed[task.output_dir.name]
    assert made.bpw == pytest.approx(task.result.bpw) and made.meta["source"] == str(folder)

    again = queue.submit(request)
    assert again.state == DONE and again.result.bpw == task.result.bpw and again.events

    archive = hub.zip_model(task.output_dir)
    with zipfile.ZipFile(archive) as zipped:
        names = zipped.namelist()
    assert f"{task.output_dir.name}/config.json" in names and f"{task.output_dir.name}/README.md" in names
    assert not any(name.endswith("quantlab.json") for name in names)


def test_two_sessions_chatting_at_once_each_get_their_own_answer(tiny_model):
    from core.sampling import SamplingSettings

    cache, sessions = ModelCache(), ChatSessions()
    loaded = cache.get(str(tiny_model[0]), "cpu")
    prompts = {"a": "The engineer writes", "b": "Every student quantizes"}

    def answer(session_id: str) -> str:
        session = sessions.get(session_id)
        messages = [{"role": "user", "content": prompts[session_id]}]
        *_, (text, stats) = stream_answer(sessions, session, loaded, messages, SamplingSettings.greedy(), 24)
        return text

    alone = {key: answer(key) for key in prompts}
    sessions.get("a").generator.reset()
    sessions.get("b").generator.reset()
    together: dict[str, str] = {}
    threads = [threading.Thread(target=lambda k=k: together.__setitem__(k, answer(k))) for k in prompts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert together == alone and alone["a"] != alone["b"]
    assert sessions.get("a").generator is not sessions.get("b").generator


def test_a_gptq_models_memory_counts_the_dense_copy_the_cpu_path_keeps(tmp_path):
    # The speed line's memory figure: on the CPU a GPTQ layer, like an EXL2 one,
    # keeps its dequantized weight beside the packed tensors once it has run.
    from core.formats.gptq.linear import GPTQLinear
    from core.loader import LoadedModel, load_model
    from tests.test_gptq_checkpoint import build_hf_model, write_gptq_checkpoint

    write_gptq_checkpoint(tmp_path, build_hf_model("llama-gqa"), group_size=32)
    model = load_model(tmp_path, device="cpu")
    loaded = LoadedModel("gptq", tmp_path, model, None, frozenset())
    stored = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()) if t is not None)
    dense = sum(m.in_features * m.out_features * 4 for m in model.modules() if isinstance(m, GPTQLinear))
    assert dense > 0 and loaded.model_bytes() == stored + dense
    assert loaded.kernel_path() == "CPU reference"
