"""The generator's token loop: it queues the step after a token before reading that token
(launch_ahead, the GPU default, forced on here to run on the CPU too), and must still give
the tokens a plain loop gives and leave the cache's bookkeeping right for the next call."""

import threading

import pytest
import torch

from core.cache import ContextOverflowError
from core.generator import GenerationStats, Generator
from core.loader import load_model
from core.sampling import SamplingSettings, sample_token
from tests.tiny_models import save_hf_model

AHEAD = pytest.mark.parametrize("launch_ahead", [True, False], ids=["ahead", "in-order"])
SAMPLED = SamplingSettings(temperature=1.0, top_k=40, top_p=0.95, min_p=0.01, repetition_penalty=1.3, seed=7)
# Greedy decoding of a random model soon repeats itself, so the penalty's history decides its tokens.
PENALISED = SamplingSettings(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.5)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama-gqa")
    save_hf_model("llama-gqa", folder)
    return load_model(folder)


def prompt_of(length: int, seed: int = 0) -> list[int]:
    return torch.randint(3, 320, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.inference_mode()
def reference_tokens(model, prompt, settings, count, stop_ids=()):
    """No cache, no pipelining: the whole sequence through the model for every token."""
    ids = list(prompt)
    rng = torch.Generator(device=model.device).manual_seed(settings.seed) if settings.seed is not None else None
    new = []
    for _ in range(count):
        logits = model(torch.tensor([ids], device=model.device))[0, -1]
        token = sample_token(logits, settings, torch.tensor(ids, device=model.device), rng)
        if token in stop_ids:
            break
        new.append(token)
        ids.append(token)
    return new


def run(generator, prompt, settings=SamplingSettings.greedy(), max_new_tokens=12, **kwargs):
    stats = GenerationStats()
    tokens = list(generator.token_stream(prompt, settings, max_new_tokens, stats=stats, **kwargs))
    return tokens, stats


def assert_cache_holds(generator, ids):
    assert generator._cached_ids == ids
    assert generator.cache.length == len(ids)


def first_new_index(tokens, at_least):
    """An index >= at_least whose token does not occur before it, so stopping on it stops there."""
    return next(i for i in range(at_least, len(tokens)) if tokens[i] not in tokens[:i])


@AHEAD
@pytest.mark.parametrize("settings", [SamplingSettings.greedy(), PENALISED, SAMPLED],
                         ids=["greedy", "greedy-penalised", "seeded"])
def test_token_loop_matches_a_full_forward_reference(model, launch_ahead, settings):
    prompt = prompt_of(9)
    tokens, stats = run(Generator(model, None, max_seq_len=64, launch_ahead=launch_ahead), prompt, settings)
    assert tokens == reference_tokens(model, prompt, settings, 12)
    assert stats.new_tokens == 12 and stats.stop_reason == "length"
    assert stats.prompt_tokens == 9 and stats.prefill_s > 0 and stats.decode_s > 0


def test_seeded_sampling_gives_the_same_tokens_twice_and_either_launch_order(model):
    prompt = prompt_of(9)
    runs = [run(Generator(model, None, max_seq_len=64, launch_ahead=ahead), prompt, SAMPLED, 16)[0]
            for ahead in (True, True, False)]
    assert runs[0] == runs[1] == runs[2]
    assert len(set(runs[0])) > 1  # a sampler stuck on one token would pass the rest trivially


@AHEAD
def test_stop_token_leaves_the_cache_ready_for_the_next_turn(model, launch_ahead):
    prompt = prompt_of(9)
    greedy = reference_tokens(model, prompt, SamplingSettings.greedy(), 12)
    stop_at = first_new_index(greedy, 3)
    generator = Generator(model, None, max_seq_len=64, launch_ahead=launch_ahead)
    tokens, stats = run(generator, prompt, stop_token_ids=[greedy[stop_at]])
    assert tokens == greedy[:stop_at] and stats.stop_reason == "eos" and stats.new_tokens == stop_at
    # The step queued for the stop token wrote past this point; it is not the conversation's.
    assert_cache_holds(generator, prompt + greedy[:stop_at])

    next_prompt = prompt + greedy[: stop_at + 1] + prompt_of(5, seed=1)
    again, again_stats = run(generator, next_prompt)
    fresh, _ = run(Generator(model, None, max_seq_len=64), next_prompt)
    assert again == fresh
    assert again_stats.cached_tokens == len(prompt) + stop_at


@AHEAD
def test_caller_stopping_early_leaves_the_cache_ready_for_the_next_turn(model, launch_ahead):
    prompt = prompt_of(9)
    generator = Generator(model, None, max_seq_len=64, launch_ahead=launch_ahead)
    tokens = generator.token_stream(prompt, SamplingSettings.greedy(), 12)
    kept = [next(tokens) for _ in range(4)]
    tokens.close()  # as a stop string or a closed UI stream does
    assert_cache_holds(generator, prompt + kept[:3])  # the fourth was never fed by a step anyone kept

    # The next turn diverges right where the dropped step wrote.
    next_prompt = prompt + kept[:3] + [(kept[3] + 1) % 320] + prompt_of(4, seed=2)
    again, _ = run(generator, next_prompt)
    assert again == run(Generator(model, None, max_seq_len=64), next_prompt)[0]


@AHEAD
def test_cancel_stops_after_the_current_token(model, launch_ahead):
    prompt, cancel = prompt_of(9), threading.Event()
    generator = Generator(model, None, max_seq_len=64, launch_ahead=launch_ahead)
    kept = []
    for token in generator.token_stream(prompt, SamplingSettings.greedy(), 12, cancel=cancel):
        kept.append(token)
        if len(kept) == 2:
            cancel.set()
    assert kept == reference_tokens(model, prompt, SamplingSettings.greedy(), 2)
    assert_cache_holds(generator, prompt + kept)


@AHEAD
def test_generation_to_the_end_of_the_context_stops_cleanly(model, launch_ahead):
    prompt = prompt_of(20)
    generator = Generator(model, None, max_seq_len=32, launch_ahead=launch_ahead)
    tokens, stats = run(generator, prompt, max_new_tokens=100)
    assert stats.stop_reason == "length" and len(tokens) == stats.new_tokens == 12
    assert tokens == reference_tokens(model, prompt, SamplingSettings.greedy(), 12)
    assert_cache_holds(generator, prompt + tokens[:-1])
    with pytest.raises(ContextOverflowError):
        run(generator, prompt + tokens)


class CharTokenizer:
    """Each id reads as <id>: enough text for stream()'s stop strings."""

    def stream_decoder(self, skip_special_tokens=True):
        class Decoder:
            push = staticmethod(lambda token: f"<{token}>")
            finish = staticmethod(lambda: "")

        return Decoder()


@AHEAD
def test_stream_stopped_by_a_stop_string_keeps_text_and_cache_right(model, launch_ahead):
    prompt = prompt_of(9)
    greedy = reference_tokens(model, prompt, SamplingSettings.greedy(), 12)
    stop_at = first_new_index(greedy, 3)
    generator = Generator(model, CharTokenizer(), max_seq_len=64, launch_ahead=launch_ahead)
    text, stats = generator.generate(prompt, settings=SamplingSettings.greedy(), max_new_tokens=12,
                                     stop_strings=[f"<{greedy[stop_at]}>"])
    assert text == "".join(f"<{t}>" for t in greedy[:stop_at])
    assert stats.stop_reason == "stop_string" and stats.new_tokens == stop_at + 1
    assert_cache_holds(generator, prompt + greedy[:stop_at])


def test_stream_abandoned_by_its_caller_settles_the_cache(model):
    prompt = prompt_of(9)
    generator = Generator(model, CharTokenizer(), max_seq_len=64, launch_ahead=True)
    chunks = generator.stream(prompt, SamplingSettings.greedy(), 12)
    kept = [next(chunks).token_ids[0] for _ in range(3)]
    chunks.close()
    assert_cache_holds(generator, prompt + kept[:2])


@pytest.mark.cuda
@pytest.mark.parametrize("graphs", ["1", "0"], ids=["graphs", "plain-launches"])
def test_pipelined_loop_on_cuda_matches_the_reference(tmp_path, monkeypatch, graphs):
    # float32 so the graph step and the full forward agree to rounding; the prompt ends just
    # before a graph bucket (256 positions), so a step queued ahead captures a new graph.
    monkeypatch.setenv("QUANTLAB_CUDA_GRAPHS", graphs)
    save_hf_model("llama-gqa", tmp_path)
    model = load_model(tmp_path, device="cuda", dtype=torch.float32)
    prompt = prompt_of(250)
    generator = Generator(model, None, max_seq_len=320)
    assert generator.launch_ahead and (generator._graphs is not None) == (graphs == "1")
    for settings in (SamplingSettings.greedy(), PENALISED, SAMPLED):
        tokens, _ = run(generator, prompt, settings, max_new_tokens=20)
        assert tokens == reference_tokens(model, prompt, settings, 20)

    greedy = reference_tokens(model, prompt, SamplingSettings.greedy(), 20)
    stop_at = first_new_index(greedy, 8)
    tokens, stats = run(generator, prompt, max_new_tokens=20, stop_token_ids=[greedy[stop_at]])
    assert tokens == greedy[:stop_at] and stats.stop_reason == "eos"
    assert_cache_holds(generator, prompt + greedy[:stop_at])
    next_prompt = prompt + greedy[: stop_at + 1] + prompt_of(5, seed=1)
    assert run(generator, next_prompt)[0] == run(Generator(model, None, max_seq_len=320), next_prompt)[0]


@pytest.mark.parametrize("count", [0, -5, 2.5])
def test_max_new_tokens_below_one_is_refused_with_a_sentence(model, count):
    generator = Generator(model, None, max_seq_len=64)
    with pytest.raises(ValueError, match=f"max_new_tokens must be a whole number >= 1, not {count}"):
        run(generator, prompt_of(5), max_new_tokens=count)
    # The refused call leaves the generator usable.
    tokens, _ = run(generator, prompt_of(5), max_new_tokens=3)
    assert len(tokens) == 3
