"""The real model every offline user starts with, checked against transformers."""

import math

import pytest
import torch

from bench.heldout import shakespeare_text
from core.generator import Generator
from core.loader import load
from core.perplexity import perplexity
from core.sampling import SamplingSettings


@pytest.fixture(scope="module")
def reference(demo_folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(demo_folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def demo(demo_folder):
    return load("demo", device="cpu")


def test_demo_logits_match_transformers(demo, reference):
    ids = torch.tensor([demo.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 6)])
    with torch.no_grad():
        expected = reference(ids).logits
        ours = demo.model(ids)
    assert float((ours - expected).norm() / expected.norm()) < 1e-4


def test_32_greedy_tokens_equal_transformers_generate(demo, reference):
    messages = [{"role": "user", "content": "Tell me about the planet Mars."}]
    prompt = demo.tokenizer.encode_chat(messages)
    with torch.no_grad():
        expected = reference.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=32, min_new_tokens=32)
    expected = expected[0, len(prompt):].tolist()
    generator = Generator(demo.model, demo.tokenizer)
    text, stats = generator.generate(prompt, settings=SamplingSettings.greedy(), max_new_tokens=32)
    assert stats.new_tokens == 32
    ours = generator._cached_ids[len(prompt):] + [expected[-1]]  # the last token is sampled but never fed back
    assert ours == expected
    assert text == demo.tokenizer.decode(expected, skip_special_tokens=True)


def test_capital_of_france_answer_says_paris(demo):
    prompt = demo.tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    text, stats = Generator(demo.model, demo.tokenizer).generate(
        prompt, settings=SamplingSettings.greedy(), max_new_tokens=40, stop_token_ids=demo.stop_token_ids)
    assert "Paris" in text
    assert stats.stop_reason in ("eos", "length") and stats.prompt_tokens == len(prompt)
    assert stats.prompt_tok_s > 0 and stats.generation_tok_s > 0


def test_perplexity_equals_transformers_within_a_tenth_of_a_percent(demo, reference):
    ids = demo.tokenizer.encode(shakespeare_text()[:20000], add_special_tokens=False)
    ctx = 256
    ours = perplexity(demo.model, ids, ctx)
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) // ctx * ctx, ctx):
            window = torch.tensor([ids[start:start + ctx]])
            loss = reference(window, labels=window).loss
            nll, count = nll + float(loss) * (ctx - 1), count + ctx - 1
    expected = math.exp(nll / count)
    assert abs(ours - expected) / expected < 1e-3
