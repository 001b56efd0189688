import pytest
import torch
from transformers.generation import logits_process as hf

from core.sampling import (
    SamplingSettings, apply_repetition_penalty, filter_logits, sample_token, sample_token_tensor, sample_tokens,
)


def hf_filtered(logits, previous, s: SamplingSettings):
    """transformers' processors in transformers' order, as the reference."""
    scores = logits[None].clone()
    ids = previous[None]
    if s.repetition_penalty != 1.0:
        scores = hf.RepetitionPenaltyLogitsProcessor(s.repetition_penalty)(ids, scores)
    scores = hf.TemperatureLogitsWarper(s.temperature)(ids, scores)
    if s.top_k:
        scores = hf.TopKLogitsWarper(s.top_k)(ids, scores)
    if s.top_p < 1.0:
        scores = hf.TopPLogitsWarper(s.top_p)(ids, scores)
    if s.min_p > 0.0:
        scores = hf.MinPLogitsWarper(s.min_p)(ids, scores)
    return scores[0]


SETTINGS = [
    SamplingSettings(temperature=0.7, top_k=0, top_p=1.0),
    SamplingSettings(temperature=1.0, top_k=20, top_p=1.0),
    SamplingSettings(temperature=0.9, top_k=0, top_p=0.8),
    SamplingSettings(temperature=1.3, top_k=0, top_p=1.0, min_p=0.05),
    SamplingSettings(temperature=0.8, top_k=40, top_p=0.95, min_p=0.02, repetition_penalty=1.3),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=str)
def test_filters_keep_the_same_tokens_as_transformers(settings):
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        logits = torch.randn(1000, generator=gen) * 3
        previous = torch.randint(0, 1000, (30,), generator=gen)
        penalised = apply_repetition_penalty(logits, previous, settings.repetition_penalty)
        ours = filter_logits(penalised, settings)
        reference = hf_filtered(logits, previous, settings)
        assert torch.equal(torch.isinf(ours), torch.isinf(reference))
        kept = ~torch.isinf(reference)
        assert torch.allclose(ours[kept], reference[kept], rtol=1e-6)


def test_greedy_picks_the_argmax_after_repetition_penalty():
    logits = torch.tensor([0.0, 5.0, 4.9, -1.0])
    assert sample_token(logits, SamplingSettings.greedy(), torch.tensor([], dtype=torch.long), None) == 1
    penalised = SamplingSettings(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.5)
    assert sample_token(logits, penalised, torch.tensor([1]), None) == 2


def test_same_seed_same_tokens_and_samples_follow_the_distribution():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    settings = SamplingSettings(temperature=1.0, top_k=0, top_p=1.0)
    none = torch.tensor([], dtype=torch.long)
    draws = lambda seed: [sample_token(logits, settings, none, torch.Generator().manual_seed(seed)) for _ in range(1)]
    assert draws(3) == draws(3)
    rng = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.tensor([sample_token(logits, settings, none, rng) for _ in range(4000)]), minlength=3)
    assert torch.allclose(counts / 4000, torch.tensor([0.5, 0.3, 0.2]), atol=0.03)


@pytest.mark.parametrize("settings", [SamplingSettings.greedy(), *SETTINGS], ids=str)
def test_token_tensor_stays_on_the_device_and_equals_the_int(settings):
    gen = torch.Generator().manual_seed(1)
    for seed in range(10):
        logits = torch.randn(1000, generator=gen) * 3
        previous = torch.randint(0, 1000, (30,), generator=gen)
        token = sample_token_tensor(logits, settings, previous, torch.Generator().manual_seed(seed))
        assert token.shape == (1,) and token.dtype == torch.long and token.device == logits.device
        assert int(token) == sample_token(logits, settings, previous, torch.Generator().manual_seed(seed))


def test_one_draw_is_the_draw_torch_multinomial_makes():
    # Seeds chosen before the sampler stopped calling multinomial keep giving the same tokens.
    settings = SamplingSettings(temperature=1.0, top_k=0, top_p=1.0)
    none = torch.tensor([], dtype=torch.long)
    for seed in range(20):
        logits = torch.randn(500, generator=torch.Generator().manual_seed(100 + seed))
        expected = int(torch.multinomial(logits.softmax(-1), 1, generator=torch.Generator().manual_seed(seed)))
        assert sample_token(logits, settings, none, torch.Generator().manual_seed(seed)) == expected


@pytest.mark.cuda
@pytest.mark.parametrize("settings", [SamplingSettings.greedy(), *SETTINGS], ids=str)
def test_token_tensor_never_waits_for_the_gpu(settings):
    logits = torch.randn(32000, device="cuda") * 3
    previous = torch.randint(0, 32000, (300,), device="cuda")
    rng = torch.Generator(device="cuda").manual_seed(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        token = sample_token_tensor(logits, settings, previous, rng)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert token.device.type == "cuda" and token.shape == (1,)


@pytest.mark.parametrize(
    "bad, message",
    [(dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(min_p=2), "min_p"),
     (dict(top_k=-3), "top_k"), (dict(repetition_penalty=0), "repetition_penalty"),
     (dict(temperature=float("nan")), "temperature must be a finite number, not nan"),
     (dict(temperature=float("inf")), "temperature must be a finite number, not inf"),
     (dict(top_p=float("nan")), "top_p must be a finite number, not nan"),
     (dict(min_p=float("-inf")), "min_p must be a finite number, not -inf"),
     (dict(repetition_penalty=float("nan")), "repetition_penalty must be a finite number, not nan"),
     (dict(top_k=2.5), "top_k must be a whole number >= 0"),
     (dict(temperature="hot"), "temperature must be a finite number, not 'hot'")],
)
def test_bad_settings_are_rejected_with_the_field_named(bad, message):
    with pytest.raises(ValueError, match=message):
        SamplingSettings(**bad)


def test_a_batch_draws_what_torch_multinomial_draws_for_each_row():
    # Calibration text is cached by its seed: drawing the rows through the sampler must give the
    # tokens the batched torch.multinomial call (top-k, then one sample a row) gave for that seed.
    settings = SamplingSettings(temperature=0.8, top_k=50, top_p=1.0)
    for seed in range(10):
        logits = torch.randn(6, 500, generator=torch.Generator().manual_seed(200 + seed)) * 3
        scores = logits / 0.8
        scores = scores.masked_fill(scores < torch.topk(scores, 50, dim=-1).values[:, -1:], float("-inf"))
        expected = torch.multinomial(scores.softmax(-1), 1, generator=torch.Generator().manual_seed(seed))[:, 0]
        assert torch.equal(sample_tokens(logits, settings, torch.Generator().manual_seed(seed)), expected)


@pytest.mark.parametrize("settings", [SamplingSettings.greedy(), *SETTINGS], ids=str)
def test_each_row_of_a_batch_is_filtered_as_it_would_be_alone(settings):
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(5, 1000, generator=gen) * 3
    previous = torch.randint(0, 1000, (5, 30), generator=gen)
    batch = filter_logits(apply_repetition_penalty(logits, previous, settings.repetition_penalty), settings)
    for row in range(5):
        alone = filter_logits(apply_repetition_penalty(logits[row], previous[row], settings.repetition_penalty),
                              settings)
        assert torch.equal(batch[row], alone)
    if settings.temperature == 0.0:
        greedy = sample_tokens(logits, settings, None, previous)
        assert greedy.tolist() == [sample_token(logits[row], settings, previous[row], None) for row in range(5)]
