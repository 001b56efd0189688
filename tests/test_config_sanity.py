"""A hostile or broken config.json ends in one sentence naming the field, never a traceback,
and a config that contradicts its own weights is refused before any module is built."""

import json
import resource
import time

import pytest

from core.config import ModelConfig, ModelConfigError
from core.loader import load_model
from core.sources import resolve_model_source
from tests.test_sources import LLAMA_CONFIG
from tests.tiny_models import save_hf_model

GOOD = LLAMA_CONFIG


@pytest.mark.parametrize(
    "change, sentence",
    [
        (dict(hidden_size=-64), "config.json field 'hidden_size' must be a whole number >= 1, not -64"),
        (dict(intermediate_size=0), "config.json field 'intermediate_size' must be a whole number >= 1, not 0"),
        (dict(num_attention_heads=0), "config.json field 'num_attention_heads' must be a whole number >= 1, not 0"),
        (dict(num_key_value_heads=0), "config.json field 'num_key_value_heads' must be a whole number >= 1, not 0"),
        (dict(num_attention_heads=5), "config.json field 'num_attention_heads' (5) does not divide hidden_size (64)"),
        (dict(vocab_size="many"), "config.json field 'vocab_size' must be a whole number >= 1, not 'many'"),
        (dict(hidden_size=10**9), "config.json field 'hidden_size' is 1000000000, more than the 65536"),
        (dict(num_hidden_layers=10**6), "config.json field 'num_hidden_layers' is 1000000, more than the 1024"),
        (dict(rms_norm_eps=float("nan")), "config.json field 'rms_norm_eps' must be a finite number > 0"),
        (dict(rope_theta=-1), "config.json field 'rope_theta' must be a finite number > 0"),
        (dict(rope_scaling=[1, 2]), "'rope_scaling' must be objects"),
        (dict(eos_token_id="x"), "config.json field 'eos_token_id' must be a token id"),
        (dict(architectures="LlamaForCausalLM"), "'architectures' must be a list of names"),
    ],
)
def test_malformed_config_fields_are_named_in_one_sentence(change, sentence):
    with pytest.raises(ModelConfigError) as error:
        ModelConfig.from_dict({**GOOD, **change})
    assert sentence in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("document", [[1, 2, 3], "llama", 7, None])
def test_config_that_is_not_an_object_is_refused(tmp_path, document):
    (tmp_path / "config.json").write_text(json.dumps(document))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelConfigError, match="config.json must hold a JSON object, not a"):
        resolve_model_source(str(tmp_path))


def test_explicit_head_dim_need_not_divide_hidden_size():
    # Mistral Nemo: 32 heads of 128 on a hidden size of 5120.
    config = ModelConfig.from_dict({**GOOD, "num_attention_heads": 5, "num_key_value_heads": 5, "head_dim": 16})
    assert config.head_dim == 16


def test_a_huge_layer_count_is_refused_against_the_weights_at_once(tmp_path):
    save_hf_model("llama-gqa", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_hidden_layers"] = 1000
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    memory_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with pytest.raises(ModelConfigError, match="'num_hidden_layers' is 1000, but the weights hold 2 layers"):
        load_model(tmp_path)
    assert time.perf_counter() - start < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - memory_before < 50_000  # KiB


def test_embedding_shape_must_match_vocab_and_hidden_size(tmp_path):
    save_hf_model("llama-gqa", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["vocab_size"] = 4096
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelConfigError, match=r"'vocab_size' and 'hidden_size' \(4096, 64\) do not match the embedding's shape \(320, 64\)"):
        load_model(tmp_path)

