import json

import pytest
import torch

from core.cache import ContextOverflowError, KVCache
from core.config import ModelConfig, ModelConfigError, UnsupportedModelError
from core.loader import load_model
from core.weights import WeightsError
from tests.tiny_models import VARIANTS, save_hf_model


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours.double() - reference.double()).norm() / reference.double().norm())


def as_legacy_config(folder):
    """Rewrite a transformers-5 config.json the way most Hub checkpoints still are:
    `rope_theta` and `rope_scaling` at the top level."""
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    rope = cfg.pop("rope_parameters", None) or {}
    cfg["rope_theta"] = rope.pop("rope_theta", 10000.0)
    if rope.get("rope_type", "default") != "default":
        cfg["rope_scaling"] = rope
    path.write_text(json.dumps(cfg))


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    reference = save_hf_model(request.param, folder)
    return request.param, folder, reference


@pytest.mark.parametrize("config_style", ["transformers5", "legacy"])
def test_logits_match_transformers_in_fp32(variant, config_style):
    name, folder, reference = variant
    if config_style == "legacy":
        as_legacy_config(folder)
    model = load_model(folder)
    ids = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(ids).logits
        ours = model(ids)
    assert relative_error(ours, expected) < 1e-4, name


def test_cached_chunks_give_the_same_logits_as_one_pass(variant):
    _, folder, reference = variant
    model = load_model(folder)
    ids = torch.randint(0, 320, (1, 30), generator=torch.Generator().manual_seed(2))
    cache = KVCache(model.config, max_seq_len=64)
    with torch.no_grad():
        expected = reference(ids).logits
        pieces = [model(ids[:, :13], cache, 0), model(ids[:, 13:29], cache, 13)]
        pieces += [model(ids[:, 29:30], cache, 29)]
    assert cache.length == 30
    assert relative_error(torch.cat(pieces, dim=1), expected) < 1e-4


def test_sharded_checkpoint_loads_like_a_single_file(tmp_path):
    reference = save_hf_model("llama-gqa", tmp_path / "single")
    reference.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    ids = torch.arange(20)[None]
    with torch.no_grad():
        single = load_model(tmp_path / "single")(ids)
        sharded = load_model(tmp_path / "sharded")(ids)
    assert torch.equal(single, sharded)


def test_prompt_longer_than_the_cache_is_refused(tmp_path):
    save_hf_model("llama-gqa", tmp_path)
    model = load_model(tmp_path)
    cache = KVCache(model.config, max_seq_len=16)
    with pytest.raises(ContextOverflowError, match="do not fit in a context of 16"):
        model(torch.zeros(1, 17, dtype=torch.long), cache, 0)


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    save_hf_model("llama-gqa", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel.*LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"):
        load_model(tmp_path)


def test_unsupported_rope_scaling_is_named():
    cfg = dict(architectures=["LlamaForCausalLM"], vocab_size=8, hidden_size=8, intermediate_size=8,
               num_hidden_layers=1, num_attention_heads=2, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(UnsupportedModelError, match="'yarn'"):
        ModelConfig.from_dict(cfg)


def test_pickle_weights_are_refused_with_the_reason(tmp_path):
    save_hf_model("llama-gqa", tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(WeightsError, match="pickle files can run code"):
        load_model(tmp_path)


def test_truncated_safetensors_is_reported_as_corrupt(tmp_path):
    save_hf_model("llama-gqa", tmp_path)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(WeightsError, match="corrupt or truncated"):
        load_model(tmp_path)


def test_missing_tensor_and_wrong_config_are_reported(tmp_path):
    save_hf_model("llama-gqa", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelConfigError, match="'num_hidden_layers' is 3, but the weights hold 2 layers"):
        load_model(tmp_path)
    cfg["num_hidden_layers"], cfg["intermediate_size"] = 2, 128
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="shape"):
        load_model(tmp_path)


@pytest.mark.cuda
def test_logits_match_transformers_on_cuda_in_fp16(variant):
    name, folder, reference = variant
    model = load_model(folder, device="cuda", dtype=torch.float16)
    ids = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(ids).logits
        ours = model(ids.cuda()).cpu()
    assert relative_error(ours, expected) < 1e-2, name


def test_left_padded_batch_matches_each_row_alone(tmp_path):
    """Calibration generates many prompts at once; padding must not change any row's logits."""
    save_hf_model("llama3-rope-tied", tmp_path)
    model = load_model(tmp_path)
    prompts = [torch.randint(3, 320, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 11, 8)]
    longest = 11
    ids = torch.zeros(3, longest, dtype=torch.long)
    key_mask = torch.zeros(3, longest + 1, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt):] = prompt
        key_mask[row, longest - len(prompt):] = True
    cache = KVCache(model.config, 16, batch_size=3)
    with torch.no_grad():
        batched = model(ids, cache, 0, last_only=True, key_mask=key_mask[:, :longest])[:, -1]
        step = model(torch.tensor([[7], [7], [7]]), cache, longest, key_mask=key_mask)[:, -1]
        for row, prompt in enumerate(prompts):
            alone = model(torch.cat((prompt, torch.tensor([7])))[None])[0]
            assert relative_error(batched[row], alone[-2]) < 1e-5
            assert relative_error(step[row], alone[-1]) < 1e-5


def test_decode_attention_twin_computes_what_the_models_attention_computes(variant):
    # The graph decoder's attention kernel takes one token's projections and does rope, the cache
    # append and attention in one launch; its torch twin (core/kernels/reference.py) is what the
    # kernel is held to, so it must compute what the model's own Attention computes.
    from core.kernels import reference
    from core.linear import project

    _, folder, _ = variant
    model = load_model(folder)
    config = model.config
    ids = torch.randint(0, 320, (1, 21), generator=torch.Generator().manual_seed(3))
    caches = [KVCache(config, max_seq_len=64) for _ in range(2)]
    angles = torch.outer(torch.arange(64, dtype=torch.float32), model.inv_freq.float())
    angles = torch.cat((angles, angles), dim=-1)
    with torch.no_grad():
        for cache in caches:
            model(ids[:, :20], cache, 0)
        layer = model.model.layers[0]
        attn = layer.self_attn
        x = layer.input_layernorm(model.model.embed_tokens(ids[:, 20:]))
        expected = attn(x, *model.rotary(20, 1, x.dtype), caches[0], 20)
        q, k, v = project(x, (attn.q_proj, attn.k_proj, attn.v_proj))
        out = reference.decode_attention(q.reshape(-1), k, v, angles.cos(), angles.sin(), torch.tensor([20]),
                                         caches[1].keys[0], caches[1].values[0], 32, config.sliding_window or 0)
        ours = attn.o_proj(out.view(1, 1, -1))
    assert relative_error(ours, expected) < 1e-5
    for mine, theirs in ((caches[1].keys[0], caches[0].keys[0]), (caches[1].values[0], caches[0].values[0])):
        assert relative_error(mine[:, :, :21], theirs[:, :, :21]) < 1e-6
