"""The EXL3 converter end to end on a tiny random model: the folder ExLlamaV3 reads, resume, measurement reuse,
and the refusals a user can meet (tests/test_convert.py holds the ones both formats share)."""

import json

import pytest
import torch
from safetensors import safe_open

from core.convert.exl3 import layer as exl3_layer
from core.convert.job import ConversionError, ConversionJob, ConversionSettings
from core.formats.exl3.layout import bits_of_trellis
from core.loader import load_model
from tests.test_convert import crash_on_second_layer, logits_error
from tests.tiny_models import sample_text, save_tiny_chat_model

SETTINGS = dict(rows=4, length=64, measurement_rows=2, measurement_eval_rows=2, format="exl3")
# The trellis search runs ~10 tiles a second on a CPU core: two candidates instead of
# nine keep these conversions to minutes; the allocation still has a choice per module.
CANDIDATE_BITS = (2.0, 4.0)


@pytest.fixture(scope="module", autouse=True)
def two_candidates():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(exl3_layer, "CANDIDATE_BITS", CANDIDATE_BITS)
        yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("tiny-exl3")
    # Tied embeddings in the source: EXL3 stores a head of its own.
    reference = save_tiny_chat_model("llama3-rope-tied", base / "model")
    calibration = base / "calibration.txt"
    calibration.write_text(sample_text(200))
    return base / "model", calibration, reference


def convert(model, work, output, calibration, bpw=3.0, **kwargs):
    # An unquantized head unless a test asks: quantizing the tiny model's head costs as much as a layer.
    head_bits = kwargs.pop("head_bits", 16)
    settings = ConversionSettings(calibration=str(calibration), bpw=bpw, head_bits=head_bits, **SETTINGS)
    return ConversionJob(str(model), work, output, settings, device="cpu", **kwargs).run()


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory):
    model, calibration, _ = tiny
    base = tmp_path_factory.mktemp("finished-exl3")
    events = []
    result = convert(model, base / "work", base / "out", calibration, on_event=events.append)
    return base, result, events


def stored(folder):
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


def test_exl3_folder_has_what_exllamav3_reads(finished):
    _, result, _ = finished
    config = json.loads((result.output_dir / "config.json").read_text())
    quantization = config["quantization_config"]
    assert quantization["quant_method"] == "exl3" and quantization["version"].startswith("1.")
    assert quantization["head_bits"] == 16 and quantization["bits"] == 3.0
    assert config["tie_word_embeddings"] is False
    assert json.loads((result.output_dir / "quantization_config.json").read_text()) == quantization
    tensors = stored(result.output_dir)
    assert tensors["lm_head.weight"].dtype == torch.float16 and "lm_head.trellis" not in tensors
    assert "model.embed_tokens.weight" in tensors
    for name, tensor in tensors.items():
        if name.endswith(".trellis"):
            prefix = name[: -len(".trellis")]
            assert tensor.dtype == torch.int16 and tensor.dim() == 3
            assert tensors[prefix + ".suh"].dtype == torch.float16 and tensors[prefix + ".svh"].dtype == torch.float16
            # The MUL1 marker (ExLlamaV3's default codebook), an int32 scalar holding 0x83DCD12D.
            assert tensors[prefix + ".mul1"].shape == () and tensors[prefix + ".mul1"].item() & 0xFFFFFFFF == 0x83DCD12D
            assert tensor.shape[0] * 16 == tensors[prefix + ".suh"].numel() and tensor.shape[0] * 16 % 128 == 0


def test_exl3_output_loads_and_its_bits_meet_the_target(tiny, finished):
    _, _, reference = tiny
    _, result, _ = finished
    assert result.bpw <= 3.0 and result.head_bpw == 16.0
    # Random 64-wide matrices at 3 bits: a broken rotation, scale or tile order gives errors near or above 1.
    assert logits_error(result.output_dir, reference) < 0.5
    bits = {bits_of_trellis(t.shape) for n, t in stored(result.output_dir).items()
            if n.endswith(".trellis") and not n.startswith("lm_head")}
    assert bits <= set(CANDIDATE_BITS)


def test_exl3_measures_every_module_at_every_candidate(finished):
    _, _, events = finished
    measured = [e for e in events if e.stage == "measure"]
    assert [e.module for e in measured] == [
        "model.layers.0.self_attn", "model.layers.0.mlp", "model.layers.1.self_attn", "model.layers.1.mlp"]
    for event in measured:
        assert [round(c["bpw"], 3) for c in event.candidates] == list(CANDIDATE_BITS)
        errors = [c["error"] for c in event.candidates]
        assert errors[0] > errors[-1] and all(e >= 0 for e in errors)


def test_exl3_more_bits_from_the_same_measurement_is_closer_and_the_head_is_exl3_at_its_bits(
        tiny, finished, tmp_path):
    model, calibration, reference = tiny
    base, result, _ = finished
    events = []
    larger = convert(model, tmp_path / "work", tmp_path / "out", calibration, bpw=5.0, head_bits=6,
                     measurement_file=base / "work" / "measurement.json", on_event=events.append)
    assert not any(e.stage == "measure" for e in events)
    assert result.bpw < larger.bpw <= 5.0 and larger.bpw == 4.0  # every module at the larger candidate
    assert logits_error(larger.output_dir, reference) < logits_error(result.output_dir, reference)
    tensors = stored(larger.output_dir)
    assert "lm_head.trellis" in tensors and "lm_head.weight" not in tensors and larger.head_bpw == 6.0


def test_exl3_resume_after_a_crash_is_byte_identical(tiny, finished, tmp_path, monkeypatch):
    model, calibration, _ = tiny
    base, result, _ = finished
    measured = base / "work" / "measurement.json"  # the quantization pass is what resumes here
    crash_on_second_layer(monkeypatch, "exl3")
    with pytest.raises(RuntimeError, match="simulated crash"):
        convert(model, tmp_path / "work", tmp_path / "out", calibration, measurement_file=measured)
    assert not (tmp_path / "out").exists()
    monkeypatch.undo()
    resumed = convert(model, tmp_path / "work", tmp_path / "out", calibration, measurement_file=measured)
    for path in sorted(result.output_dir.iterdir()):
        assert (resumed.output_dir / path.name).read_bytes() == path.read_bytes(), path.name


def test_an_exl2_measurement_is_refused_for_exl3(tiny, tmp_path):
    model, calibration, _ = tiny
    exl2 = tmp_path / "measurement.json"
    exl2.write_text(json.dumps({"measurement": {}, "last_module_idx": 1}))
    with pytest.raises(ConversionError, match="measured EXL2 candidates; an EXL3 conversion needs its own measurement"):
        convert(model, tmp_path / "work", tmp_path / "out", calibration, measurement_file=exl2)


@pytest.mark.parametrize("bpw", [1.2, 8.5])
def test_exl3_target_outside_what_it_can_reach_is_refused(tiny, tmp_path, bpw):
    _, calibration, _ = tiny
    with pytest.raises(ConversionError, match="for EXL3 must be between 1.5 and 8.0"):
        ConversionJob("demo", tmp_path / "w", None, ConversionSettings(bpw=bpw, **SETTINGS))
    assert not (tmp_path / "w").exists()


def test_exl3_head_bits_it_cannot_store_are_refused(tmp_path):
    with pytest.raises(ConversionError, match=r"head bits must be one of \[2, 3, 4, 5, 6, 8, 16\] for EXL3"):
        ConversionJob("demo", tmp_path / "w", None, ConversionSettings(head_bits=7, **SETTINGS))
