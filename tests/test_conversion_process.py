"""Conversions as child processes: the --events jsonl stream, the work-dir lock, and the web
app's queue surviving a converter killed with kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers

from core.convert.job import ConversionJob, ConversionSettings
from core.convert.workdir import WorkDir, WorkDirBusy
from tests.tiny_models import BASE, sample_text, save_tiny_chat_model, save_tiny_tokenizer
from webui.conversions import DONE, FAILED, ConversionRequest
from webui.quantize_tab import status_html
from webui.services import Services

REPO = Path(__file__).resolve().parent.parent
BUSY = "is in use by another conversion"


def convert_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "core.convert", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]  # every line must be one JSON object


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("tiny")
    save_tiny_chat_model("llama-gqa", base / "model")
    (base / "calibration.txt").write_text(sample_text(300))
    return base / "model", base / "calibration.txt"


def test_events_jsonl_carries_stages_candidates_allocation_and_result(tiny, tmp_path):
    model, text = tiny
    done = convert_cli("-i", str(model), "-o", str(tmp_path / "work"), "-cf", str(tmp_path / "out"), "-b", "4.0",
                       "-r", "4", "-l", "32", "-mr", "4", "-c", str(text), "--device", "cpu", "--events", "jsonl")
    assert done.returncode == 0, done.stderr
    lines = json_lines(done.stdout)
    progress = [line for line in lines if line["event"] == "progress"]
    assert [line["stage"] for line in progress][0] == "load" and progress[-1]["stage"] == "done"

    measured = [line for line in progress if line["stage"] == "measure"]
    modules = {f"model.layers.{i}.{group}" for i in range(2) for group in ("self_attn", "mlp")}
    assert {line["module"] for line in measured} == modules
    assert {line["layer"] for line in measured} == {0, 1} and all(line["layers"] == 2 for line in measured)
    for line in measured:
        assert len(line["candidates"]) > 1
        assert all(0 < c["bpw"] < 17 and 0 <= c["error"] < 1 for c in line["candidates"])

    (optimize,) = [line for line in progress if line["stage"] == "optimize"]
    allocation = optimize["allocation"]
    assert set(allocation["choice"]) == modules == set(allocation["module_bpw"])
    by_module = {line["module"]: line["candidates"] for line in measured}
    for module, index in allocation["choice"].items():
        assert allocation["module_bpw"][module] == pytest.approx(by_module[module][index]["bpw"])
    assert allocation["target_bpw"] == 4.0 and 3.0 < allocation["bpw"] <= 4.0

    quantized = [line for line in progress if line["stage"] == "quantize"]
    assert [line["layer"] for line in quantized] == [0, 1] and all(line["error"] > 0 for line in quantized)

    result = lines[-1]
    assert result["event"] == "result" and result["output_dir"] == str(tmp_path / "out")
    assert result["bpw"] <= 4.0 and len(result["layer_bits"]) == len(result["layer_errors"]) == 2
    assert result["size_bytes"] > 0 and (tmp_path / "out" / "config.json").is_file()


def test_events_jsonl_ends_with_the_error_sentence_and_the_exit_code(tiny, tmp_path):
    model, text = tiny
    done = convert_cli("-i", str(model), "-o", str(tmp_path / "work"), "-b", "9", "--events", "jsonl")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    (line,) = json_lines(done.stdout)
    assert line == {"event": "error", "message": "target bits per weight for EXL2 must be between 2.0 and 8.0, got 9.0"}


def test_a_second_conversion_into_a_locked_work_dir_is_refused_and_kill_leaves_no_stale_lock(tiny, tmp_path):
    model, text = tiny
    work = tmp_path / "work"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom core.convert.workdir import WorkDir\n"
         "with WorkDir(sys.argv[1]).lock():\n    print('locked', flush=True)\n    time.sleep(120)", str(work)],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        settings = ConversionSettings(bpw=4.0, rows=4, length=32, measurement_rows=4, measurement_eval_rows=4,
                                      calibration=str(text))
        with pytest.raises(WorkDirBusy, match=BUSY):
            ConversionJob(str(model), work, tmp_path / "out", settings, device="cpu").run()
        refused = convert_cli("-i", str(model), "-o", str(work), "-b", "4.0", "-c", str(text), "--events", "jsonl")
        assert refused.returncode == 2 and BUSY in json_lines(refused.stdout)[-1]["message"]
        assert not WorkDir(work).job_file.exists()  # refused before touching the work dir's contents
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
    with WorkDir(work).lock():  # the kernel dropped the killed holder's lock
        pass


def save_deeper_tiny_model(folder: Path, layers: int) -> None:
    """The tiny chat model with more layers, so a conversion lasts long enough to be killed halfway."""
    config = transformers.AutoConfig.for_model("llama", **{**BASE, "num_hidden_layers": layers})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder, safe_serialization=True)
    save_tiny_tokenizer(folder, vocab_size=config.vocab_size)


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def chat_answer(services: Services, session: str, model_name: str) -> tuple[str, str]:
    messages = [{"role": "user", "content": "The engineer writes"}]
    *_, (text, speed) = services.answer(session, model_name, messages, 0.0, 50, 1.0, 0.0, 1.0, 12, -1)
    return text, speed


def output_files(folder: Path) -> dict[str, bytes]:
    files = {path.name: path.read_bytes() for path in sorted(folder.iterdir())}
    sidecar = json.loads(files.pop("quantlab.json"))
    # Only when it was made, and how long it took, may differ between two runs.
    del sidecar["created"], sidecar["result"]["seconds"]
    files["quantlab.json (time fields excluded)"] = json.dumps(sidecar, sort_keys=True).encode()
    return files


@pytest.mark.slow
def test_a_killed_conversion_says_so_chats_keep_answering_and_resume_is_byte_identical(tmp_path):
    models = tmp_path / "models"
    source = models / "tiny-deep"
    save_deeper_tiny_model(source, layers=8)
    text = tmp_path / "calibration.txt"
    text.write_text(sample_text(400))
    settings = ConversionSettings(bpw=4.0, rows=8, length=64, measurement_rows=8, measurement_eval_rows=4,
                                  calibration=str(text))
    request = ConversionRequest(str(source), settings, device="cpu")

    services = Services.create(models, tmp_path / "work")
    task = services.conversions.submit(request, owner="alice")
    wait_for(lambda: any(e.stage == "measure" for e in task.events), 120, "the first measured module")
    # A chat in another session answers while the converter runs beside the server.
    during, speed = chat_answer(services, "bob:chat", "tiny-deep")
    assert during and "tok/s" in speed
    assert task.process is not None and task.process.poll() is None, "the conversion ended before the chat did"

    wait_for(lambda: any(e.stage == "measure" and e.layer >= 1 for e in task.events), 120, "layer 1's measurement")
    assert task.process.poll() is None, "the conversion finished before it could be killed"
    os.kill(task.process.pid, signal.SIGKILL)
    assert services.conversions.wait(task, 60)
    assert task.state == FAILED
    assert task.message.startswith("the conversion process was killed (signal 9, SIGKILL)")
    assert "press Resume to continue from where it stopped" in task.message
    page = status_html(task, 0)
    assert 'data-state="failed"' in page and "killed (signal 9" in page
    assert chat_answer(services, "bob:chat", "tiny-deep")[0] == during  # greedy: the same answer after

    resumed = services.conversions.submit(task.request, owner="alice")
    assert "layers measured" in resumed.resumed_from
    assert any(e.stage == "measure" and e.layer == 0 for e in resumed.events)  # the chart keeps the first run's
    assert services.conversions.wait(resumed, 600) and resumed.state == DONE, resumed.message
    assert chat_answer(services, "bob:chat", resumed.output_dir.name)[0]

    uninterrupted = Services.create(tmp_path / "ref-models", tmp_path / "ref-work")
    reference = uninterrupted.conversions.submit(request, owner="carol")
    assert uninterrupted.conversions.wait(reference, 600) and reference.state == DONE, reference.message
    assert reference.output_dir.name == resumed.output_dir.name
    assert output_files(resumed.output_dir) == output_files(reference.output_dir)
