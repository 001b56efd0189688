"""bench.peer_quality reads a peer's output on the same terms as ours: bits per weight, and a clear skip."""

import json

from bench.peer_quality import score_output, stored_bpw
from core.convert.job import ConversionJob, ConversionSettings
from core.loader import load_model
from tests.tiny_models import save_tiny_chat_model


def test_bits_per_weight_of_an_exl2_folder_match_the_converters_own_count(tmp_path):
    model = tmp_path / "model"
    save_tiny_chat_model("llama-gqa", model)
    (tmp_path / "calibration.txt").write_text("the quick brown fox jumps over the lazy dog. " * 200)
    settings = ConversionSettings(bpw=3.0, rows=2, length=32, measurement_rows=2, measurement_eval_rows=2,
                                  calibration=str(tmp_path / "calibration.txt"))
    result = ConversionJob(str(model), tmp_path / "work", tmp_path / "out", settings, device="cpu").run()
    assert abs(stored_bpw(result.output_dir, load_model(model, device="cpu")) - result.bpw) < 1e-9

    ppl, why = score_output(result.output_dir, "cpu", {"text": list(range(64))}, 32)
    assert why == "" and ppl["text"] > 1

    config = json.loads((result.output_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "aqlm", "bits": 3.0}  # a format we do not load yet
    (result.output_dir / "config.json").write_text(json.dumps(config))
    ppl, why = score_output(result.output_dir, "cpu", {"text": list(range(64))}, 32)
    assert ppl is None and why.startswith("our loader cannot read this aqlm yet: ")
