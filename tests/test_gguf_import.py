"""GGUF -> HF folder import, checked against transformers' own GGUF loader and against
tiny GGUFs written here whose every weight is known."""

import functools
import json
import math
import shutil

import gguf
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from tokenizers import Tokenizer

import core.formats.gguf.reader as gguf_import
from core.config import ModelConfig, UnsupportedModelError
from core.demo import demo_gguf_path, demo_model_folder
from core.errors import ModelSourceError
from core.formats.gguf.reader import import_gguf, is_complete_import, llama3_rope_scaling

# ---------------------------------------------------------------- the demo model vs transformers

TEXTS = [
    "Hello world",
    "  two leading spaces",
    "multiple   inner    spaces",
    "line one\nline two\n\n\nthree",
    "tabs\tand\r\nCRLF",
    "The year 2024 had 365 days; pi is 3.14159",
    "def square(x):\n    return x ** 2  # square\n",
    "日本語のテキストと中文",
    "emoji 🙂🚀 and a ZWJ sequence 👩\u200d💻",
    "Café naïve façade Ångström",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>x<repo_name>y",
    "don't it's we'll I'M",
    "",
    " ",
]


@pytest.fixture(scope="module")
def reference_config():
    from transformers import AutoConfig

    path = demo_gguf_path()
    return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)


def test_demo_weights_equal_transformers_gguf_loader(demo_folder, reference_config):
    # from_pretrained(gguf_file=...) needs accelerate for GGUF; this is the function it calls.
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(reference_config)
    with pytest.MonkeyPatch.context() as patch:
        # transformers rebuilds the same name map for each of the model's ~400 submodules
        patch.setattr(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map))
        reference = load_gguf_checkpoint(str(demo_gguf_path()), return_tensors=True, model_to_load=skeleton)["tensors"]
    ours = load_file(demo_folder / "model.safetensors")

    assert set(ours) == set(reference)
    for name, expected in reference.items():
        assert ours[name].dtype == np.float16
        np.testing.assert_array_equal(ours[name], torch.as_tensor(expected).half().numpy(), err_msg=name)


def test_demo_config_matches_transformers(demo_folder, reference_config):
    config = json.loads((demo_folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["torch_dtype"] == "float16"
    for field in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "max_position_embeddings", "tie_word_embeddings", "bos_token_id",
        "eos_token_id", "pad_token_id",
    ):
        assert config[field] == getattr(reference_config, field), field
    assert config["rms_norm_eps"] == pytest.approx(reference_config.rms_norm_eps, rel=1e-6)
    assert config["rope_theta"] == pytest.approx(reference_config.rope_parameters["rope_theta"])
    assert config.get("head_dim", config["hidden_size"] // config["num_attention_heads"]) == reference_config.head_dim
    assert ModelConfig.from_folder(demo_folder).tie_word_embeddings


def test_demo_tokenizer_ids_equal_transformers(demo_folder):
    from transformers import AutoTokenizer

    path = demo_gguf_path()
    reference = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ours = Tokenizer.from_file(str(demo_folder / "tokenizer.json"))
    for text in TEXTS:
        ids = ours.encode(text).ids
        assert ids == reference.encode(text), text
        assert ours.decode(ids, skip_special_tokens=False) == text

    tokenizer_config = json.loads((demo_folder / "tokenizer_config.json").read_text())
    assert tokenizer_config["chat_template"] == reference.chat_template
    assert tokenizer_config["bos_token"] == reference.bos_token == "<|im_start|>"
    assert tokenizer_config["eos_token"] == reference.eos_token == "<|im_end|>"
    assert tokenizer_config["add_bos_token"] is False
    assert tokenizer_config["model_max_length"] == 8192
    assert tokenizer_config["added_tokens_decoder"]["2"]["content"] == "<|im_end|>"
    assert tokenizer_config["added_tokens_decoder"]["2"]["special"] is True


def test_digits_after_spaces_follow_smollms_own_tokenizer(demo_folder):
    # SmolLM's tokenizer.json splits digits off before GPT-2's pattern, so "a  1" keeps
    # its two spaces together; transformers' GGUF loader (no Digits step) would give Ġ, Ġ1.
    ours = Tokenizer.from_file(str(demo_folder / "tokenizer.json"))
    assert ours.encode("a  1").tokens == ["a", "ĠĠ", "1"]


def test_demo_folder_side_files(demo_folder):
    special = json.loads((demo_folder / "special_tokens_map.json").read_text())
    assert special == {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>"}
    generation = json.loads((demo_folder / "generation_config.json").read_text())
    assert generation["bos_token_id"] == 1 and generation["eos_token_id"] == 2
    assert is_complete_import(demo_folder)
    assert demo_model_folder.__module__ == "core.demo"


# ---------------------------------------------------------------- tiny GGUFs written here

HIDDEN, HEADS, KV_HEADS, FFN, LAYERS = 64, 4, 2, 128, 2
HEAD_DIM = HIDDEN // HEADS
PIECES = [
    "▁", "h", "e", "l", "o", "w", "r", "d", "t", "s", "i", "n", "g", "a",
    "he", "ll", "llo", "hello", "▁hello", "▁w", "or", "▁wor", "ld", "▁world",
    "▁t", "▁th", "▁the", "in", "ing", "▁s", "▁st", "▁sing", "es", "▁test",
]
SPM_TOKENS = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + PIECES
SPM_TYPES = [2, 3, 3] + [6] * 256 + [1] * len(PIECES)
SPM_SCORES = [0.0] * (3 + 256) + [-float(i) for i in range(len(PIECES))]
VOCAB = len(SPM_TOKENS)


def llama_cpp_permute(weight, n_heads):
    """The row order llama.cpp's converter writes Llama's Q/K in: per head, the two halves interleaved."""
    return weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def tiny_llama_weights(seed=0, qkv_bias=False, tied=False):
    rng = np.random.default_rng(seed)
    weights = {"model.embed_tokens.weight": rng.standard_normal((VOCAB, HIDDEN)), "model.norm.weight": 1 + rng.random(HIDDEN)}
    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}."
        weights.update({
            prefix + "input_layernorm.weight": 1 + rng.random(HIDDEN),
            prefix + "post_attention_layernorm.weight": 1 + rng.random(HIDDEN),
            prefix + "self_attn.q_proj.weight": rng.standard_normal((HEADS * HEAD_DIM, HIDDEN)),
            prefix + "self_attn.k_proj.weight": rng.standard_normal((KV_HEADS * HEAD_DIM, HIDDEN)),
            prefix + "self_attn.v_proj.weight": rng.standard_normal((KV_HEADS * HEAD_DIM, HIDDEN)),
            prefix + "self_attn.o_proj.weight": rng.standard_normal((HIDDEN, HEADS * HEAD_DIM)),
            prefix + "mlp.gate_proj.weight": rng.standard_normal((FFN, HIDDEN)),
            prefix + "mlp.up_proj.weight": rng.standard_normal((FFN, HIDDEN)),
            prefix + "mlp.down_proj.weight": rng.standard_normal((HIDDEN, FFN)),
        })
        if qkv_bias:
            weights[prefix + "self_attn.q_proj.bias"] = rng.standard_normal(HEADS * HEAD_DIM)
            weights[prefix + "self_attn.k_proj.bias"] = rng.standard_normal(KV_HEADS * HEAD_DIM)
            weights[prefix + "self_attn.v_proj.bias"] = rng.standard_normal(KV_HEADS * HEAD_DIM)
    if not tied:
        weights["lm_head.weight"] = rng.standard_normal((VOCAB, HIDDEN))
    return {name: (w * 0.1 if w.ndim == 2 else w).astype(np.float32) for name, w in weights.items()}


F32, F16, Q8_0, Q4_0 = (gguf.GGMLQuantizationType[name] for name in ("F32", "F16", "Q8_0", "Q4_0"))
# HF name -> (GGUF name, how it is stored). Q/K are stored exactly (F32/F16) so the
# unpermutation can be checked bit for bit; the rest cover the quantized paths.
GGUF_NAMES = {
    "model.embed_tokens.weight": ("token_embd.weight", Q8_0),
    "model.norm.weight": ("output_norm.weight", F32),
    "lm_head.weight": ("output.weight", F16),
}
GGUF_LAYER_NAMES = {
    "input_layernorm.weight": ("attn_norm.weight", F32),
    "post_attention_layernorm.weight": ("ffn_norm.weight", F32),
    "self_attn.q_proj.weight": ("attn_q.weight", F32),
    "self_attn.q_proj.bias": ("attn_q.bias", F32),
    "self_attn.k_proj.weight": ("attn_k.weight", F16),
    "self_attn.k_proj.bias": ("attn_k.bias", F32),
    "self_attn.v_proj.weight": ("attn_v.weight", Q8_0),
    "self_attn.v_proj.bias": ("attn_v.bias", F32),
    "self_attn.o_proj.weight": ("attn_output.weight", Q4_0),
    "mlp.gate_proj.weight": ("ffn_gate.weight", Q4_0),
    "mlp.up_proj.weight": ("ffn_up.weight", Q8_0),
    "mlp.down_proj.weight": ("ffn_down.weight", F16),
}


def gguf_layout(weights):
    layout = {}
    for hf_name in weights:
        if hf_name in GGUF_NAMES:
            layout[hf_name] = GGUF_NAMES[hf_name]
        else:
            layer, suffix = hf_name.removeprefix("model.layers.").split(".", 1)
            gguf_suffix, qtype = GGUF_LAYER_NAMES[suffix]
            layout[hf_name] = (f"blk.{layer}.{gguf_suffix}", qtype)
    return layout


def write_tiny_gguf(path, weights, architecture="llama", rope_factors=None, tokenizer=None):
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(500000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(VOCAB)
    (tokenizer or add_spm_tokenizer)(writer)
    writer.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    for hf_name, (gguf_name, qtype) in gguf_layout(weights).items():
        values = weights[hf_name]
        # llama.cpp reorders Llama's Q/K rows (weights and biases); Qwen2 is stored as is
        if architecture == "llama" and ".attn_q." in gguf_name:
            values = llama_cpp_permute(values, HEADS)
        elif architecture == "llama" and ".attn_k." in gguf_name:
            values = llama_cpp_permute(values, KV_HEADS)
        if qtype == F32:
            writer.add_tensor(gguf_name, values)
        elif qtype == F16:
            writer.add_tensor(gguf_name, values.astype(np.float16))
        else:
            writer.add_tensor(gguf_name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)
    if rope_factors is not None:
        writer.add_tensor("rope_freqs.weight", rope_factors.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def add_spm_tokenizer(writer):
    writer.add_tokenizer_model("llama")
    writer.add_token_list(SPM_TOKENS)
    writer.add_token_scores(SPM_SCORES)
    writer.add_token_types(SPM_TYPES)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)


def llama3_rope_factors(theta, head_dim, factor, low, high, original):
    """Per-frequency divisors as llama.cpp's converter derives them from Llama 3's rope_scaling."""
    factors = []
    for i in range(0, head_dim, 2):
        wavelength = 2 * math.pi * theta ** (i / head_dim)
        if wavelength < original / high:
            factors.append(1.0)
        elif wavelength > original / low:
            factors.append(factor)
        else:
            smooth = (original / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


@pytest.fixture(scope="module")
def tiny_weights():
    return tiny_llama_weights()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_weights):
    rope_factors = llama3_rope_factors(500000.0, HEAD_DIM, 8.0, 1.0, 4.0, 64)
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf", tiny_weights, rope_factors=rope_factors)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tiny_gguf):
    return import_gguf(tiny_gguf, tmp_path_factory.mktemp("imported") / "tiny")


def test_tiny_llama_round_trips_exact_tensors_and_undoes_qk_permutation(tiny_folder, tiny_weights):
    ours = load_file(tiny_folder / "model.safetensors")
    assert set(ours) == set(tiny_weights)
    for hf_name, (_, qtype) in gguf_layout(tiny_weights).items():
        expected = tiny_weights[hf_name]
        if qtype in (F32, F16):
            np.testing.assert_array_equal(ours[hf_name], expected.astype(np.float16), err_msg=hf_name)


def test_tiny_llama_quantized_tensors_dequantize_to_what_was_quantized(tiny_folder, tiny_weights):
    ours = load_file(tiny_folder / "model.safetensors")
    for hf_name, (_, qtype) in gguf_layout(tiny_weights).items():
        if qtype in (Q8_0, Q4_0):
            expected = tiny_weights[hf_name]
            exact = gguf.quants.dequantize(gguf.quants.quantize(expected, qtype), qtype).astype(np.float16)
            np.testing.assert_array_equal(ours[hf_name], exact, err_msg=hf_name)
            # and that is the original within the format's step size
            step = np.abs(expected).max() / (127 if qtype == Q8_0 else 7)
            assert np.abs(ours[hf_name] - expected).max() <= step


def test_tiny_llama_config(tiny_folder):
    config = ModelConfig.from_folder(tiny_folder)
    assert (config.architecture, config.num_layers, config.num_heads, config.num_kv_heads) == ("LlamaForCausalLM", 2, 4, 2)
    assert (config.hidden_size, config.intermediate_size, config.vocab_size, config.head_dim) == (HIDDEN, FFN, VOCAB, HEAD_DIM)
    assert config.rms_norm_eps == 1e-5 and config.rope_theta == 500000.0
    assert config.max_position_embeddings == 256
    assert not config.tie_word_embeddings
    assert config.rope_type == "llama3"
    assert config.rope_scaling["factor"] == 8.0
    assert (config.bos_token_id, config.eos_token_ids) == (1, (2,))


def test_llama3_rope_scaling_is_recovered_from_llama_cpp_factors():
    factors = llama3_rope_factors(500000.0, 64, 32.0, 1.0, 4.0, 8192)
    assert llama3_rope_scaling(factors, 500000.0, 64) == {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    assert llama3_rope_scaling(np.ones(32, dtype=np.float32), 500000.0, 64) is None


SPM_TEXTS = ["hello world", "hello  world", " leading", "the test sing", "unknown zq 🙂", "line\nbreak", "<s>hello</s>", ""]


def test_sentencepiece_tokenizer_matches_transformers(tiny_folder, tiny_gguf):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    ours = Tokenizer.from_file(str(tiny_folder / "tokenizer.json"))
    for text in SPM_TEXTS:
        assert ours.encode(text).ids == reference.encode(text), text
    assert ours.encode("hello world").tokens == ["<s>", "▁hello", "▁world"]
    # byte fallback: an emoji becomes its four UTF-8 bytes and decodes back
    assert ours.encode("🙂", add_special_tokens=False).tokens[-4:] == ["<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]
    assert ours.decode(ours.encode("hello world 🙂").ids) == "hello world 🙂"

    tokenizer_config = json.loads((tiny_folder / "tokenizer_config.json").read_text())
    assert tokenizer_config["add_bos_token"] is True
    assert tokenizer_config["bos_token"] == "<s>" and tokenizer_config["unk_token"] == "<unk>"
    assert tokenizer_config["chat_template"].startswith("{% for m in messages %}")


def gpt2_byte_alphabet():
    """GPT-2's printable stand-in for each byte: printable Latin-1 stays, the rest move past U+0100."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelling, moved = {b: chr(b) for b in kept}, 0
    for byte in range(256):
        if byte not in spelling:
            spelling[byte] = chr(256 + moved)
            moved += 1
    return [spelling[byte] for byte in range(256)]


BYTE_LEVEL_MERGES = ["Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "h e", "l l", "he ll", "hell o", "Ġ Ġ"]
BYTE_LEVEL_TOKENS = gpt2_byte_alphabet() + [m.replace(" ", "") for m in BYTE_LEVEL_MERGES] + ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def add_qwen2_tokenizer(writer):
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(BYTE_LEVEL_TOKENS)
    writer.add_token_types([1] * (len(BYTE_LEVEL_TOKENS) - 3) + [3, 3, 3])
    writer.add_token_merges(BYTE_LEVEL_MERGES)
    writer.add_bos_token_id(len(BYTE_LEVEL_TOKENS) - 3)
    writer.add_eos_token_id(len(BYTE_LEVEL_TOKENS) - 1)
    writer.add_add_bos_token(False)


def test_tiny_qwen2_keeps_rows_biases_and_tied_embeddings(tmp_path):
    from transformers import AutoTokenizer

    weights = tiny_llama_weights(seed=1, qkv_bias=True, tied=True)
    gguf_path = write_tiny_gguf(tmp_path / "tiny-qwen2.gguf", weights, architecture="qwen2", tokenizer=add_qwen2_tokenizer)
    folder = import_gguf(gguf_path, tmp_path / "tiny-qwen2")

    ours = load_file(folder / "model.safetensors")
    assert set(ours) == set(weights) and "lm_head.weight" not in ours
    for hf_name, (_, qtype) in gguf_layout(weights).items():
        if qtype in (F32, F16):
            np.testing.assert_array_equal(ours[hf_name], weights[hf_name].astype(np.float16), err_msg=hf_name)
    config = ModelConfig.from_folder(folder)
    assert config.architecture == "Qwen2ForCausalLM"
    assert config.qkv_bias and config.tie_word_embeddings and config.sliding_window is None

    reference = AutoTokenizer.from_pretrained(tmp_path, gguf_file=gguf_path.name)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    for text in ("hello world", "hello  world 2024", "<|im_start|>hello<|im_end|>\n", "  x\n\ny", "Café 🙂"):
        assert tokenizer.encode(text).ids == reference.encode(text), text
        assert tokenizer.decode(tokenizer.encode(text).ids, skip_special_tokens=False) == text
    assert tokenizer.encode("hello world").tokens == ["hello", "Ġworld"]


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError, match="'gpt2'.*llama.*qwen2"):
        import_gguf(tmp_path / "gpt2.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_truncated_file_is_not_a_valid_gguf(tmp_path, tiny_gguf):
    data = tiny_gguf.read_bytes()
    for cut in (len(data) // 2, 100, 3):
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        with pytest.raises(ModelSourceError, match="is not a valid GGUF file"):
            import_gguf(tmp_path / "cut.gguf", tmp_path / "out")
    (tmp_path / "notes.gguf").write_text("these are not the weights you are looking for")
    with pytest.raises(ModelSourceError, match="is not a valid GGUF file"):
        import_gguf(tmp_path / "notes.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_import_killed_mid_write_leaves_no_folder(tmp_path, tiny_gguf, monkeypatch):
    real_convert = gguf_import._tensor_to_fp16
    converted = []

    def dies_on_fourth_tensor(tensor, config):
        if len(converted) == 3:
            raise KeyboardInterrupt("killed")
        converted.append(tensor.name)
        return real_convert(tensor, config)

    monkeypatch.setattr(gguf_import, "_tensor_to_fp16", dies_on_fourth_tensor)
    with pytest.raises(KeyboardInterrupt):
        import_gguf(tiny_gguf, tmp_path / "models" / "tiny")
    assert list((tmp_path / "models").iterdir()) == []


def test_reimport_replaces_an_older_folder(tmp_path, tiny_gguf, tiny_folder):
    out_dir = tmp_path / "tiny"
    shutil.copytree(tiny_folder, out_dir)
    (out_dir / "stale-file").write_text("from an older import")
    import_gguf(tiny_gguf, out_dir)
    assert not (out_dir / "stale-file").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]
