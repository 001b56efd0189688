"""The converter end to end on a tiny random model: files, resume, and every bad input a user can give."""

import dataclasses
import json
import math
import os
import shutil
import threading

import pytest
import torch

from core.config import UnsupportedModelError
from core.convert import job as job_module
from core.convert.floor import TargetBelowFloorError, lowest_bpw
from core.convert.layers import MODULE_GROUPS
from core.convert.measure import CANDIDATES
from core.convert.qparams import setting_bits
from core.convert.job import ConversionError, ConversionJob, ConversionSettings
from core.convert.progress import ConversionCancelled
from core.formats.model_folder import OutputError
from core.loader import load_model
from core.errors import ModelSourceError
from tests.fake_hub import serve_config_only
from tests.tiny_models import sample_text, save_tiny_chat_model

SETTINGS = dict(rows=8, length=128, measurement_rows=4, measurement_eval_rows=4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("tiny")
    reference = save_tiny_chat_model("llama-gqa", base / "model")
    calibration = base / "calibration.txt"
    calibration.write_text(sample_text(300))
    return base / "model", calibration, reference


def settings(calibration, **overrides):
    return ConversionSettings(calibration=str(calibration), **{**SETTINGS, **overrides})


def convert(model, work, output, calibration, **kwargs):
    return ConversionJob(str(model), work, output, settings(calibration, bpw=kwargs.pop("bpw", 4.0)), device="cpu",
                         **kwargs).run()


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory):
    model, calibration, _ = tiny
    base = tmp_path_factory.mktemp("finished")
    events = []
    result = convert(model, base / "work", base / "out", calibration, on_event=events.append)
    return base, result, events


def logits_error(folder, reference) -> float:
    """Relative logit error of a converted model against the original, on text like its calibration."""
    from core.tokenizer import Tokenizer

    ids = torch.tensor([Tokenizer.from_folder(folder).encode(sample_text(30, seed=5))[:120]])
    with torch.no_grad():
        expected, ours = reference(ids).logits, load_model(folder)(ids)
    return float((ours - expected).norm() / expected.norm())


def test_output_loads_and_stays_close_to_the_original(tiny, finished):
    _, _, reference = tiny
    base, result, _ = finished
    # 64-wide random matrices spend a large share of 4.0 bpw on scales and the permutation;
    # a broken pack or permutation gives errors near or above 1.
    assert logits_error(result.output_dir, reference) < 0.4
    config = json.loads((result.output_dir / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "exl2"
    assert config["quantization_config"]["bits"] == 4.0
    for name in ("tokenizer.json", "tokenizer_config.json", "output.safetensors"):
        assert (result.output_dir / name).is_file()


def test_real_bpw_never_exceeds_the_target(finished):
    _, result, _ = finished
    assert result.bpw <= 4.0
    assert len(result.layer_bits) == 2 and len(result.layer_errors) == 2


def test_progress_reports_every_module_with_its_candidates(finished):
    _, _, events = finished
    measured = [e for e in events if e.stage == "measure"]
    assert [e.module for e in measured] == [
        "model.layers.0.self_attn", "model.layers.0.mlp", "model.layers.1.self_attn", "model.layers.1.mlp"]
    assert all(len(e.candidates) > 10 and all(c["error"] >= 0 for c in e.candidates) for e in measured)
    assert [e.layer for e in events if e.stage == "quantize"] == [0, 1]
    assert events[-1].stage == "done"


def test_resume_after_a_crash_is_byte_identical(tiny, finished, tmp_path, monkeypatch):
    model, calibration, _ = tiny
    base, result, _ = finished
    crash_on_second_layer(monkeypatch, "exl2")
    with pytest.raises(RuntimeError, match="simulated crash"):
        convert(model, tmp_path / "work", tmp_path / "out", calibration)
    assert not (tmp_path / "out").exists()
    assert json.loads((tmp_path / "work" / "quant_progress.json").read_text())["next_layer"] == 1
    monkeypatch.undo()
    resumed = convert(model, tmp_path / "work", tmp_path / "out", calibration)
    for path in sorted(result.output_dir.iterdir()):
        assert (resumed.output_dir / path.name).read_bytes() == path.read_bytes(), path.name


def crash_on_second_layer(monkeypatch, output_format: str) -> None:
    """Make the format's quantization pass fail at layer 1, as a crash or kill would stop it."""
    target = job_module.TARGETS[output_format]

    def crash(model_, index, *args):
        if index == 1:
            raise RuntimeError("simulated crash")
        return target.quantize_layer(model_, index, *args)

    monkeypatch.setitem(job_module.TARGETS, output_format, dataclasses.replace(target, quantize_layer=crash))


def test_cancel_mid_measurement_then_resume(tiny, finished, tmp_path):
    model, calibration, _ = tiny
    base, result, _ = finished
    cancel = threading.Event()

    def stop_after_first_layer(event):
        if event.stage == "measure" and event.module == "model.layers.0.mlp":
            cancel.set()

    with pytest.raises(ConversionCancelled, match="resume"):
        convert(model, tmp_path / "work", tmp_path / "out", calibration, on_event=stop_after_first_layer, cancel=cancel)
    partial = json.loads((tmp_path / "work" / "measurement.partial.json").read_text())
    assert partial["next_layer"] == 1
    resumed = convert(model, tmp_path / "work", tmp_path / "out", calibration)
    assert (resumed.output_dir / "output.safetensors").read_bytes() == (result.output_dir / "output.safetensors").read_bytes()


def test_measurement_is_reused_for_another_size(tiny, finished, tmp_path):
    model, calibration, reference = tiny
    base, result, _ = finished
    events = []
    larger = convert(model, tmp_path / "work", tmp_path / "out", calibration, bpw=5.5,
                     measurement_file=base / "work" / "measurement.json", on_event=events.append)
    assert not any(e.stage == "measure" for e in events)
    assert result.bpw < larger.bpw <= 5.5
    assert larger.size_bytes > result.size_bytes
    assert logits_error(larger.output_dir, reference) < logits_error(result.output_dir, reference)


def test_target_below_what_the_format_can_reach_is_refused_before_any_work(tiny, tmp_path):
    model, calibration, _ = tiny
    events = []
    # Tiny 64-wide matrices pay so much for scales and the permutation that 2.2 bpw is out of reach.
    with pytest.raises(TargetBelowFloorError, match=r"target 2\.2 bpw is below 2\.[3-9]\d* bpw, the lowest this model can reach"):
        convert(model, tmp_path / "work", tmp_path / "out", calibration, bpw=2.2, on_event=events.append)
    assert events == [] and not (tmp_path / "work").exists()


def test_floor_of_a_hub_model_is_checked_with_config_json_alone(tiny, tmp_path, monkeypatch):
    model, calibration, _ = tiny
    fetched = serve_config_only(monkeypatch, model)
    with pytest.raises(TargetBelowFloorError, match="the lowest this model can reach"):
        convert("someone/tiny-llama", tmp_path / "work", tmp_path / "out", calibration, bpw=2.2)
    assert fetched == ["config.json"] and not (tmp_path / "work").exists()


def test_floor_from_the_config_matches_the_built_model(tiny):
    model, _, _ = tiny
    loaded = load_model(model)
    cheapest = weights = 0
    for layer in loaded.model.layers:
        for group, names in MODULE_GROUPS.items():
            modules = {name: getattr(getattr(layer, group), name) for name in names}
            cheapest += min(sum(setting_bits(s, modules[n].in_features, modules[n].out_features) for n, s in c.items())
                            for c in CANDIDATES[group])
            weights += sum(m.weight.numel() for m in modules.values())
    assert lowest_bpw(loaded.config) == math.ceil(cheapest / weights * 1000) / 1000


@pytest.mark.parametrize("bpw", [1.5, 8.5])
def test_bpw_outside_2_to_8_is_refused(tiny, tmp_path, bpw):
    _, calibration, _ = tiny
    with pytest.raises(ConversionError, match="between 2.0 and 8.0"):
        ConversionJob("demo", tmp_path / "w", None, settings(calibration, bpw=bpw))


def test_unsupported_architecture_is_refused_before_any_work(tiny, tmp_path):
    model, calibration, _ = tiny
    other = tmp_path / "gpt2"
    shutil.copytree(model, other)
    config = json.loads((other / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM"):
        convert(other, tmp_path / "work", tmp_path / "out", calibration)
    assert not (tmp_path / "work").exists()


def test_missing_and_corrupt_inputs_are_named(tiny, tmp_path):
    model, calibration, _ = tiny
    with pytest.raises(ModelSourceError):
        convert(tmp_path / "no-such-model", tmp_path / "work", tmp_path / "out", calibration)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(model, corrupt)
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4000])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        convert(corrupt, tmp_path / "work2", tmp_path / "out", calibration)
    with pytest.raises(ValueError, match="does not exist"):
        convert(model, tmp_path / "work3", tmp_path / "out", tmp_path / "missing.txt")


def test_work_dir_of_another_model_or_settings_is_refused(tiny, finished, tmp_path):
    model, calibration, _ = tiny
    base, _, _ = finished
    work = tmp_path / "work"
    shutil.copytree(base / "work", work)
    with pytest.raises(ConversionError, match="other settings \\(bpw\\).*-m .*measurement.json"):
        convert(model, work, tmp_path / "out", calibration, bpw=3.5)
    other = tmp_path / "other-model"
    save_tiny_chat_model("qwen2-bias", other)
    with pytest.raises(ConversionError, match="belongs to another model"):
        convert(other, work, tmp_path / "out", calibration)


def test_full_disk_is_reported_before_writing(tiny, finished, tmp_path, monkeypatch):
    model, calibration, _ = tiny
    base, _, _ = finished
    work = tmp_path / "work"
    shutil.copytree(base / "work", work)

    class Usage:
        total, used, free = 10**9, 10**9 - 1000, 1000

    monkeypatch.setattr("core.formats.model_folder.shutil.disk_usage", lambda path: Usage)
    with pytest.raises(OutputError, match="not enough disk space"):
        convert(model, work, tmp_path / "out", calibration)
    assert not (tmp_path / "out").exists()
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())


def test_output_folder_that_is_not_ours_is_not_overwritten(tiny, finished, tmp_path):
    model, calibration, _ = tiny
    base, _, _ = finished
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not a quantized model folder"):
        convert(model, base / "work", precious, calibration)
    assert (precious / "notes.txt").read_text() == "mine"


def test_the_models_own_calibration_text_is_written_once_per_model(tiny, tmp_path, monkeypatch):
    # Converting one model to several sizes (the web app's perplexity-vs-bpw
    # chart, a user trying 3.0 then 4.0) must not pay minutes of sampling each time.
    from core.convert import calibration as calibration_module

    model, _, _ = tiny
    monkeypatch.setenv("QUANTLAB_HOME", str(tmp_path / "home"))
    calls = []
    real = calibration_module.self_generated_rows
    monkeypatch.setattr(calibration_module, "self_generated_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    small = dict(rows=2, length=32, measurement_rows=2, measurement_eval_rows=2)
    first = ConversionJob(str(model), tmp_path / "w1", tmp_path / "o1", ConversionSettings(**small), device="cpu").run()
    second = ConversionJob(str(model), tmp_path / "w2", tmp_path / "o2", ConversionSettings(**small, bpw=5.0),
                           device="cpu").run()
    assert len(calls) == 1
    from safetensors.torch import load_file

    assert torch.equal(*(load_file(w / "calibration.safetensors")["rows"] for w in (tmp_path / "w1", tmp_path / "w2")))
    assert first.bpw < second.bpw


def test_each_calibration_recipe_writes_and_caches_its_own_rows(tiny, tmp_path, monkeypatch):
    from core.convert import calibration as calibration_module
    from core.tokenizer import Tokenizer

    with pytest.raises(ConversionError, match=r"recipe must be one of chat, wide-chat, free, mixed, got 'wiki'"):
        ConversionSettings(calibration_recipe="wiki").validate()
    model, _, _ = tiny
    monkeypatch.setenv("QUANTLAB_HOME", str(tmp_path / "home"))
    recipes = []
    real = calibration_module.self_generated_rows
    monkeypatch.setattr(calibration_module, "self_generated_rows",
                        lambda *a, **k: recipes.append(k["recipe"]) or real(*a, **k))
    small = dict(rows=2, length=32, measurement_rows=2, measurement_eval_rows=2)

    def job(name, recipe, bpw=4.0):
        return ConversionJob(str(model), tmp_path / f"w-{name}", tmp_path / f"o-{name}",
                             ConversionSettings(**small, bpw=bpw, calibration_recipe=recipe), device="cpu")

    job("free", "free").run()
    config = json.loads((tmp_path / "o-free" / "config.json").read_text())
    assert config["quantization_config"]["calibration"]["recipe"] == "free"
    tokenizer = Tokenizer.from_folder(model)
    rows = {name: job(name, recipe, bpw)._calibration_rows(model, tokenizer, {tokenizer.eos_token_id})
            for name, recipe, bpw in (("free", "free", 4.0), ("chat", "chat", 4.0), ("free5", "free", 5.0))}
    assert recipes == ["free", "chat"]  # another size of a recipe reuses its cached rows, another recipe does not
    assert not torch.equal(rows["chat"], rows["free"]) and torch.equal(rows["free"], rows["free5"])


def test_a_work_dir_from_before_calibration_recipes_resumes(tiny, tmp_path):
    # job.json of a run started before the setting existed lacks it; that run used the default.
    model, calibration, _ = tiny
    job = ConversionJob(str(model), tmp_path / "work", tmp_path / "out", settings(calibration), device="cpu")
    job.work.path.mkdir(parents=True)
    job._open_work_dir(model)
    saved = json.loads(job.work.job_file.read_text())
    del saved["settings"]["calibration_recipe"]
    job.work.job_file.write_text(json.dumps(saved))
    job._open_work_dir(model)  # no "started with other settings"


@pytest.mark.parametrize("marker", ["quantization_config", "quantize_config.json"])
def test_an_already_quantized_model_is_refused_before_any_work(tiny, tmp_path, marker):
    model, calibration, _ = tiny
    quantized = tmp_path / "gptq"
    shutil.copytree(model, quantized)
    if marker == "quantization_config":
        config = json.loads((quantized / "config.json").read_text())
        config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
        (quantized / "config.json").write_text(json.dumps(config))
    else:
        (quantized / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 128}))
    with pytest.raises(ConversionError, match=r"already quantized \(gptq\).*original fp16/bf16 model"):
        convert(quantized, tmp_path / "work", tmp_path / "out", calibration)
    assert not (tmp_path / "work").exists()


def test_calibration_outside_the_allowed_roots_is_refused_by_the_job(tiny, tmp_path):
    model, calibration, _ = tiny
    job = ConversionJob(str(model), tmp_path / "work", None, settings("/etc/passwd"), device="cpu",
                        calibration_roots=[calibration.parent / "uploads"])
    with pytest.raises(ValueError, match="calibration file /etc/passwd is not available here: upload a text file"):
        job.run()
    assert not (tmp_path / "work" / "calibration.safetensors").exists()
