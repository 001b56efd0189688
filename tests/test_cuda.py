"""The engine and converter on a GPU (run on the device machine; skipped elsewhere)."""

import pytest
import torch

from core.generator import Generator
from core.loader import load
from core.sampling import SamplingSettings

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def demo_cuda(demo_folder):
    return load("demo", device="cuda", dtype=torch.float16)


@pytest.fixture(scope="module")
def reference_cuda(demo_folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(demo_folder, dtype=torch.float16).cuda().eval()


def test_demo_logits_match_transformers_on_cuda_in_fp16(demo_cuda, reference_cuda):
    ids = torch.tensor([demo_cuda.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 6)], device="cuda")
    with torch.no_grad():
        expected = reference_cuda(ids).logits.float()
        ours = demo_cuda.model(ids)
    assert float((ours - expected).norm() / expected.norm()) < 1e-2


def test_greedy_tokens_match_transformers_on_cuda(demo_cuda, reference_cuda):
    prompt = demo_cuda.tokenizer.encode_chat([{"role": "user", "content": "Tell me about the planet Mars."}])
    with torch.no_grad():
        expected = reference_cuda.generate(torch.tensor([prompt], device="cuda"), do_sample=False,
                                           max_new_tokens=32, min_new_tokens=32)[0, len(prompt):].tolist()
    generator = Generator(demo_cuda.model, demo_cuda.tokenizer)
    _, stats = generator.generate(prompt, settings=SamplingSettings.greedy(), max_new_tokens=32)
    ours = generator._cached_ids[len(prompt):] + [expected[-1]]
    # fp16 rounding differs between the two implementations; a near-tie may flip late in the answer.
    assert ours[:24] == expected[:24]


def test_paris_on_cuda(demo_cuda):
    prompt = demo_cuda.tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    text, _ = Generator(demo_cuda.model, demo_cuda.tokenizer).generate(
        prompt, settings=SamplingSettings.greedy(), max_new_tokens=40, stop_token_ids=demo_cuda.stop_token_ids)
    assert "Paris" in text


def test_converter_on_cuda_matches_cpu_quality(tmp_path):
    from core.convert.job import ConversionJob, ConversionSettings
    from core.loader import load_model
    from tests.test_convert import logits_error
    from tests.tiny_models import sample_text, save_tiny_chat_model

    reference = save_tiny_chat_model("llama-gqa", tmp_path / "model")
    (tmp_path / "cal.txt").write_text(sample_text(300))
    settings = ConversionSettings(bpw=4.0, calibration=str(tmp_path / "cal.txt"), rows=8, length=128,
                                  measurement_rows=4, measurement_eval_rows=4)
    errors = {}
    for device in ("cpu", "cuda"):
        result = ConversionJob(str(tmp_path / "model"), tmp_path / f"w-{device}", tmp_path / f"o-{device}",
                               settings, device=device).run()
        assert result.bpw <= 4.0
        errors[device] = logits_error(result.output_dir, reference)
    assert errors["cuda"] < 0.4 and abs(errors["cuda"] - errors["cpu"]) < 0.1


def test_measurement_with_candidates_parked_in_host_memory_is_the_same(tmp_path, monkeypatch):
    # On a GPU short of room a layer keeps its ~20 candidates per matrix in host
    # memory (a 7B MLP's would take 5.4 GB); the measurement must not change for it.
    from core.convert import measure
    from core.loader import load_model
    from tests.tiny_models import save_hf_model

    save_hf_model("llama-gqa", tmp_path / "model")
    model = load_model(tmp_path / "model", device="cpu", dtype=torch.float32)
    states = torch.randn(4, 64, model.config.hidden_size, generator=torch.Generator().manual_seed(0)).cuda()
    results = {}
    for share in (measure.CANDIDATE_SHARE_OF_FREE, 0.0):  # a share of 0: never room, always parked
        monkeypatch.setattr(measure, "CANDIDATE_SHARE_OF_FREE", share)
        results[share], _ = measure.measure_layer(model, 0, states, "cuda", 2, lambda event: None)
    assert measure._short_of_room("cuda", 1) and not measure._short_of_room("cpu", 1)
    assert results[0.0] == results[measure.CANDIDATE_SHARE_OF_FREE]


def test_demo_exl2_greedy_tokens_on_the_kernels_match_the_reference_path(demo_folder, tmp_path):
    # The demo converted to EXL2, then chatted with on the GPU: graphs, fused kernels and the
    # packed-weight products must pick the tokens the torch reference path picks.
    from core.convert.job import ConversionJob, ConversionSettings
    from core.kernels import dispatch
    from tests.tiny_models import sample_text

    (tmp_path / "cal.txt").write_text(sample_text(300))
    settings = ConversionSettings(bpw=4.0, calibration=str(tmp_path / "cal.txt"), rows=8, length=256,
                                  measurement_rows=4, measurement_eval_rows=4)
    result = ConversionJob(str(demo_folder), tmp_path / "work", tmp_path / "exl2", settings, device="cuda").run()
    loaded = load(str(result.output_dir), device="cuda", dtype=torch.float16)
    prompt = loaded.tokenizer.encode_chat([{"role": "user", "content": "Tell me about the planet Mars."}])

    def greedy_ids() -> list[int]:
        generator = Generator(loaded.model, loaded.tokenizer)
        generator.generate(prompt, settings=SamplingSettings.greedy(), max_new_tokens=32)
        return generator._cached_ids[len(prompt):]

    ours = greedy_ids()
    with dispatch.reference_only():
        expected = greedy_ids()
    assert len(ours) >= 24
    # fp16 sums in another order may flip a near-tie late in the answer.
    assert ours[:24] == expected[:24]
