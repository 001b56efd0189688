"""Turn a llama.cpp GGUF file into a Hugging Face model folder.

The rest of the engine reads one layout only: config.json, fp16 safetensors with HF
tensor names, tokenizer.json and friends. A GGUF carries the same model under
llama.cpp's names, with quantized weights, Q/K rows reordered for llama.cpp's rope,
and the tokenizer as bare metadata. This module undoes each of those once, so a GGUF
is just another way to arrive at a folder.

The folder is built beside `out_dir` and renamed into place when complete, so an
import that dies half way never leaves a folder that looks usable.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
from pathlib import Path

import gguf
import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from ...config import UnsupportedModelError
from ...errors import ModelSourceError

# GGUF `general.architecture` -> the HF class whose weights and config we write.
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

# Bumped whenever the folder written for the same GGUF would differ, so cached imports get redone.
IMPORTER_VERSION = 1
IMPORT_RECORD = "quantlab_import.json"

_FP16_MAX = float(np.finfo(np.float16).max)

_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_MODEL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Llama 3's rope scaling is stored as one factor per rotary frequency; it goes into config.json instead.
_ROPE_FACTORS_TENSOR = "rope_freqs.weight"

# llama.cpp token types (gguf.TokenType)
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4

# Split patterns of the byte-level vocabularies, keyed by `tokenizer.ggml.pre`. These are the
# patterns of the models' own tokenizer.json files; llama.cpp applies the same splits.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_PRE = {"llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx", "smaug-bpe"}
_QWEN2_PRE = {"qwen2", "deepseek-r1-qwen", "stablelm2"}
# GPT-2's own pattern after every digit is split off (StarCoder-family vocabularies, SmolLM). Their
# tokenizer.json does this with a Digits step; transformers' GGUF loader leaves it out, which
# changes the ids where spaces precede a digit ("a  1").
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}


def import_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Write `out_dir` as an HF model folder holding the model in `gguf_path`; returns `out_dir`."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    reader = _open_gguf(gguf_path)
    metadata = _read_metadata(reader, gguf_path)
    architecture = metadata.get("general.architecture")
    if architecture not in GGUF_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{gguf_path.name}: GGUF architecture {architecture!r} is not supported; "
            f"supported: {', '.join(f'{name} ({cls})' for name, cls in GGUF_ARCHITECTURES.items())}"
        )
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    hf_names = _hf_tensor_names(tensors, gguf_path)
    _check_dequantizable(reader.tensors)

    config = _hf_config(metadata, tensors, gguf_path)
    tokenizer = build_tokenizer(metadata)
    tokenizer_config, special_tokens_map = _tokenizer_configs(metadata, tokenizer, config["max_position_embeddings"])

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        _write_weights(work_dir / "model.safetensors", tensors, hf_names, config)
        _write_json(work_dir / "config.json", config)
        _write_json(work_dir / "generation_config.json", _generation_config(metadata))
        tokenizer.save(str(work_dir / "tokenizer.json"))
        _write_json(work_dir / "tokenizer_config.json", tokenizer_config)
        _write_json(work_dir / "special_tokens_map.json", special_tokens_map)
        _write_json(work_dir / IMPORT_RECORD, {"source": gguf_path.name, "importer_version": IMPORTER_VERSION})
        _publish(work_dir, out_dir)
    except BaseException:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise
    return out_dir


def is_complete_import(folder: str | Path) -> bool:
    """True for a folder written by this importer's current version."""
    record = Path(folder) / IMPORT_RECORD
    try:
        return json.loads(record.read_text(encoding="utf-8")).get("importer_version") == IMPORTER_VERSION
    except (OSError, ValueError):
        return False


# ---------------------------------------------------------------- reading


def _open_gguf(path: Path) -> gguf.GGUFReader:
    if not path.is_file():
        raise ModelSourceError(f"{path} does not exist")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as error:  # the reader signals a bad file with whatever numpy or struct raise
        raise ModelSourceError(f"{path} is not a valid GGUF file: {error}") from None
    file_size = path.stat().st_size
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > file_size:
            raise ModelSourceError(
                f"{path} is not a valid GGUF file: tensor {tensor.name} runs past the end of the file "
                "(was the download cut short?)"
            )
    return reader


def _read_metadata(reader: gguf.GGUFReader, path: Path) -> dict:
    metadata = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        try:
            metadata[name] = field.contents()
        except Exception as error:
            raise ModelSourceError(f"{path} is not a valid GGUF file: metadata {name} is unreadable ({error})") from None
    if "split.count" in metadata and metadata["split.count"] > 1:
        raise ModelSourceError(
            f"{path.name} is one part of a split model; merge the parts first with "
            "`llama-gguf-split --merge first-part.gguf merged.gguf`"
        )
    return metadata


def _hf_tensor_names(tensors: dict, gguf_path: Path) -> dict[str, str]:
    hf_names = {}
    for name in tensors:
        if name == _ROPE_FACTORS_TENSOR:
            continue
        if name in _MODEL_TENSORS:
            hf_names[name] = _MODEL_TENSORS[name]
            continue
        prefix, _, rest = name.partition(".")
        layer, _, suffix = rest.partition(".")
        if prefix == "blk" and layer.isdigit() and suffix in _LAYER_TENSORS:
            hf_names[name] = f"model.layers.{layer}.{_LAYER_TENSORS[suffix]}"
            continue
        raise UnsupportedModelError(f"{gguf_path.name}: tensor {name} has no place in a Llama/Qwen2 model")
    if "token_embd.weight" not in tensors:
        raise ModelSourceError(f"{gguf_path} is not a valid GGUF file: it has no token_embd.weight")
    return hf_names


def _check_dequantizable(tensors) -> None:
    """Fail before writing anything if a tensor type is one gguf cannot dequantize."""
    checked = set()
    for tensor in tensors:
        if tensor.tensor_type in checked:
            continue
        try:
            gguf.quants.dequantize(tensor.data[:1], tensor.tensor_type)
        except NotImplementedError:
            raise UnsupportedModelError(
                f"tensor {tensor.name} is stored as {tensor.tensor_type.name}, which the gguf package "
                "cannot dequantize; try a GGUF with another quantization"
            ) from None
        checked.add(tensor.tensor_type)


# ---------------------------------------------------------------- config


def _hf_config(metadata: dict, tensors: dict, gguf_path: Path) -> dict:
    arch = metadata["general.architecture"]

    def required(key: str):
        if f"{arch}.{key}" not in metadata:
            raise ModelSourceError(f"{gguf_path} is not a valid GGUF file: it lacks the metadata key {arch}.{key}")
        return metadata[f"{arch}.{key}"]

    hidden_size = int(required("embedding_length"))
    num_heads = int(required("attention.head_count"))
    num_kv_heads = int(metadata.get(f"{arch}.attention.head_count_kv") or num_heads)
    head_dim = int(
        metadata.get(f"{arch}.attention.key_length")
        or metadata.get(f"{arch}.rope.dimension_count")
        or hidden_size // num_heads
    )
    tokens = metadata.get("tokenizer.ggml.tokens") or []
    vocab_size = int(metadata.get(f"{arch}.vocab_size") or len(tokens) or tensors["token_embd.weight"].shape[-1])
    rope_theta = _from_float32(metadata.get(f"{arch}.rope.freq_base", 10000.0))

    config = {
        "architectures": [GGUF_ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": int(required("feed_forward_length")),
        "num_hidden_layers": int(required("block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": int(metadata.get(f"{arch}.context_length", 2048)),
        "rms_norm_eps": _from_float32(metadata.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": rope_theta,
        "rope_scaling": _rope_scaling(metadata, tensors, rope_theta, head_dim),
        "tie_word_embeddings": "output.weight" not in tensors,
        "torch_dtype": "float16",
    }
    if head_dim != hidden_size // num_heads:
        config["head_dim"] = head_dim
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in tensors
        config["mlp_bias"] = False
    if arch == "qwen2":
        config["use_sliding_window"] = False
    for key, gguf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"), ("pad_token_id", "padding_token_id")):
        if f"tokenizer.ggml.{gguf_key}" in metadata:
            config[key] = int(metadata[f"tokenizer.ggml.{gguf_key}"])
    return config


def _from_float32(value: float) -> float:
    # GGUF stores hyperparameters as float32; the shortest decimal that rounds to the same
    # float32 is the number the model's authors wrote (1e-05, not 9.999999747378752e-06).
    return float(str(np.float32(value)))


def _rope_scaling(metadata: dict, tensors: dict, rope_theta: float, head_dim: int) -> dict | None:
    arch = metadata["general.architecture"]
    scaling_type = metadata.get(f"{arch}.rope.scaling.type")
    factor = metadata.get(f"{arch}.rope.scaling.factor")
    if scaling_type == "linear" and factor:
        return {"rope_type": "linear", "factor": _from_float32(factor)}
    if scaling_type == "yarn":
        scaling = {"rope_type": "yarn", "factor": _from_float32(factor or 1.0)}
        original = metadata.get(f"{arch}.rope.scaling.original_context_length")
        if original:
            scaling["original_max_position_embeddings"] = int(original)
        return scaling
    if scaling_type not in (None, "none"):
        # Passed on as-is: ModelConfig names the rope types it supports when the folder is loaded.
        return {"rope_type": scaling_type, "factor": _from_float32(factor or 1.0)}
    if _ROPE_FACTORS_TENSOR in tensors:
        rope_factors = gguf.quants.dequantize(tensors[_ROPE_FACTORS_TENSOR].data, tensors[_ROPE_FACTORS_TENSOR].tensor_type)
        return llama3_rope_scaling(rope_factors.reshape(-1), rope_theta, head_dim)
    return None


def llama3_rope_scaling(rope_factors: np.ndarray, rope_theta: float, head_dim: int) -> dict | None:
    """Recover Llama 3's rope_scaling from the per-frequency factors llama.cpp stores instead.

    llama.cpp's converter turns (factor, low_freq_factor, high_freq_factor,
    original_max_position_embeddings) into one divisor per rotary frequency: 1 for
    wavelengths shorter than original/high, `factor` for those longer than original/low,
    and 1 / ((1 - s) / factor + s) between, with s = (original / wavelength - low) / (high - low).
    s is linear in 1 / wavelength, so two blended frequencies pin down the line; with
    low_freq_factor fixed at 1 (as in every Llama 3.x release) that gives the other two.
    """
    rope_factors = np.asarray(rope_factors, dtype=np.float64)
    factor = float(rope_factors.max())
    if factor <= 1.0 + 1e-6:
        return None
    wavelengths = 2 * math.pi * rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    blended = (rope_factors > 1.0 + 1e-4) & (rope_factors < factor * (1 - 1e-4))
    low_freq_factor, high_freq_factor, original_context = 1.0, 4.0, 8192
    if blended.sum() >= 2 and len(wavelengths) == len(rope_factors):
        blend = (1 / rope_factors[blended] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(1 / wavelengths[blended], blend, 1)
        high_freq_factor = round(float(1 - 1 / intercept), 2)
        original_context = int(round(slope * (high_freq_factor - low_freq_factor)))
    return {
        "rope_type": "llama3",
        "factor": round(factor, 4),
        "low_freq_factor": low_freq_factor,
        "high_freq_factor": high_freq_factor,
        "original_max_position_embeddings": original_context,
    }


def _generation_config(metadata: dict) -> dict:
    generation = {}
    if "tokenizer.ggml.bos_token_id" in metadata:
        generation["bos_token_id"] = int(metadata["tokenizer.ggml.bos_token_id"])
    # llama.cpp stops on any end-of-generation token; chat models often end turns with EOT, not EOS.
    stop_ids = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        if token_id is not None and int(token_id) not in stop_ids:
            stop_ids.append(int(token_id))
    if stop_ids:
        generation["eos_token_id"] = stop_ids[0] if len(stop_ids) == 1 else stop_ids
    if "tokenizer.ggml.padding_token_id" in metadata:
        generation["pad_token_id"] = int(metadata["tokenizer.ggml.padding_token_id"])
    return generation


# ---------------------------------------------------------------- weights


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo the row order llama.cpp's converter gives Llama's Q and K projections.

    HF Llama rotates the two halves of each head (rotate_half); llama.cpp rotates adjacent
    pairs. The converter therefore interleaves each head's halves, row h*d + 2j + s holding
    original row h*d + s*d/2 + j; this puts them back.
    """
    rows = weight.shape[0]
    return (
        weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _tensor_to_fp16(tensor, config: dict) -> np.ndarray:
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    values = values.reshape([int(n) for n in reversed(tensor.shape)])
    if config["model_type"] == "llama":
        if tensor.name.endswith((".attn_q.weight", ".attn_q.bias")):
            values = unpermute_rope_rows(values, config["num_attention_heads"])
        elif tensor.name.endswith((".attn_k.weight", ".attn_k.bias")):
            values = unpermute_rope_rows(values, config["num_key_value_heads"])
    # bf16 and f32 weights can exceed fp16's range; saturating beats writing inf.
    return np.clip(values, -_FP16_MAX, _FP16_MAX).astype("<f2")


def _write_weights(path: Path, tensors: dict, hf_names: dict[str, str], config: dict) -> None:
    """Stream fp16 weights into a safetensors file, one dequantized tensor in memory at a time.

    The safetensors header must come first and hold every offset, but fp16 sizes are known
    from the GGUF shapes alone, so the header is written up front and the data appended.
    """
    header, offset = {}, 0
    for gguf_name, hf_name in hf_names.items():
        shape = [int(n) for n in reversed(tensors[gguf_name].shape)]
        size = 2 * math.prod(shape)
        header[hf_name] = {"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)  # keeps the data 8-byte aligned, as safetensors writes it

    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(header_bytes)))
        out.write(header_bytes)
        for gguf_name, hf_name in hf_names.items():
            values = _tensor_to_fp16(tensors[gguf_name], config)
            if list(values.shape) != header[hf_name]["shape"]:
                raise ModelSourceError(f"tensor {gguf_name} has {values.size} values, not the shape its header gives")
            out.write(np.ascontiguousarray(values).data)
        out.flush()
        os.fsync(out.fileno())


# ---------------------------------------------------------------- tokenizer


def build_tokenizer(metadata: dict) -> Tokenizer:
    """A `tokenizers.Tokenizer` equivalent to the one the GGUF's metadata describes."""
    tokenizer_model = metadata.get("tokenizer.ggml.model")
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ModelSourceError("the GGUF has no tokenizer vocabulary (tokenizer.ggml.tokens)")
    if tokenizer_model == "gpt2":
        tokenizer = _byte_level_tokenizer(metadata)
    elif tokenizer_model == "llama":
        tokenizer = _sentencepiece_tokenizer(metadata)
    else:
        raise UnsupportedModelError(
            f"GGUF tokenizer type {tokenizer_model!r} is not supported; "
            "supported: gpt2 (byte-level BPE), llama (SentencePiece BPE)"
        )
    _add_special_tokens(tokenizer, metadata)
    tokenizer.post_processor = _post_processor(metadata, byte_level=tokenizer_model == "gpt2")
    return tokenizer


def _vocab(tokens: list[str]) -> dict[str, int]:
    vocab = {}
    for token_id, token in enumerate(tokens):
        vocab.setdefault(token, token_id)  # tokenizers needs one id per spelling; a repeat keeps the first
    return vocab


def _byte_level_tokenizer(metadata: dict) -> Tokenizer:
    tokens = metadata["tokenizer.ggml.tokens"]
    merges = [tuple(merge.split(" ", 1)) for merge in metadata.get("tokenizer.ggml.merges") or []]
    pre = metadata.get("tokenizer.ggml.pre", "default")
    tokenizer = Tokenizer(
        models.BPE(
            vocab=_vocab(tokens),
            merges=merges,
            fuse_unk=False,
            # llama.cpp looks a whole pre-token up in the vocabulary before merging for Llama 3
            ignore_merges=pre in _LLAMA3_PRE,
        )
    )
    if pre in _LLAMA3_PRE or pre in _QWEN2_PRE:
        split = _LLAMA3_SPLIT if pre in _LLAMA3_PRE else _QWEN2_SPLIT
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    elif pre in _DIGIT_SPLIT_PRE:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _QWEN2_PRE:
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece_tokenizer(metadata: dict) -> Tokenizer:
    """SentencePiece BPE as a `tokenizers` BPE with byte fallback.

    SentencePiece merges the adjacent pair whose joined piece scores highest; ranking the
    merges by that score gives `tokenizers` the same order.
    """
    tokens = metadata["tokenizer.ggml.tokens"]
    scores = metadata.get("tokenizer.ggml.scores") or [-float(i) for i in range(len(tokens))]
    vocab = _vocab(tokens)
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
    ranked = []
    for token_id, piece in enumerate(tokens):
        if vocab[piece] != token_id:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[token_id], token_id, vocab[left], (left, right)))
    ranked.sort()
    add_space_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    tokenizer = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=[merge for *_, merge in ranked],
            unk_token=tokens[unk_id] if unk_id is not None else None,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if add_space_prefix else "never", split=False
    )
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def _add_special_tokens(tokenizer: Tokenizer, metadata: dict) -> None:
    # Control and unknown tokens must match whole and never split; user-defined ones
    # (like <think>) match whole too but are ordinary text when decoding.
    tokens = metadata["tokenizer.ggml.tokens"]
    token_types = metadata.get("tokenizer.ggml.token_type") or []
    special, plain = [], []
    for token, token_type in zip(tokens, token_types):
        if token_type in (_CONTROL, _UNKNOWN):
            special.append(AddedToken(token, special=True, normalized=False))
        elif token_type == _USER_DEFINED:
            plain.append(AddedToken(token, special=False, normalized=False))
    tokenizer.add_special_tokens(special)
    tokenizer.add_tokens(plain)


def _post_processor(metadata: dict, byte_level: bool):
    tokens = metadata["tokenizer.ggml.tokens"]
    steps = [processors.ByteLevel(trim_offsets=False)] if byte_level else []
    add_bos, add_eos = _adds_bos_eos(metadata)
    bos_id, eos_id = metadata.get("tokenizer.ggml.bos_token_id"), metadata.get("tokenizer.ggml.eos_token_id")
    add_bos, add_eos = add_bos and bos_id is not None, add_eos and eos_id is not None
    if add_bos or add_eos:
        bos = [tokens[bos_id]] if add_bos else []
        eos = [tokens[eos_id]] if add_eos else []
        specials = [(tokens[i], int(i)) for i, wanted in ((bos_id, add_bos), (eos_id, add_eos)) if wanted]
        steps.append(
            processors.TemplateProcessing(
                single=[*bos, "$A:0", *eos],
                pair=[*bos, "$A:0", *eos, *[f"{t}:1" for t in bos], "$B:1", *[f"{t}:1" for t in eos]],
                special_tokens=list(dict(specials).items()),
            )
        )
    if not steps:
        return None
    return steps[0] if len(steps) == 1 else processors.Sequence(steps)


def _adds_bos_eos(metadata: dict) -> tuple[bool, bool]:
    # SentencePiece vocabularies add BOS unless the file says otherwise (llama.cpp's default too).
    default_bos = metadata.get("tokenizer.ggml.model") == "llama"
    return (
        bool(metadata.get("tokenizer.ggml.add_bos_token", default_bos)),
        bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
    )


def _tokenizer_configs(metadata: dict, tokenizer: Tokenizer, context_length: int) -> tuple[dict, dict]:
    tokens = metadata["tokenizer.ggml.tokens"]
    special_tokens_map = {}
    for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")):
        token_id = metadata.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None and 0 <= int(token_id) < len(tokens):
            special_tokens_map[name] = tokens[int(token_id)]
    add_bos, add_eos = _adds_bos_eos(metadata)
    added_tokens_decoder = {
        str(token_id): {
            "content": added.content,
            "lstrip": added.lstrip,
            "normalized": added.normalized,
            "rstrip": added.rstrip,
            "single_word": added.single_word,
            "special": added.special,
        }
        for token_id, added in sorted(tokenizer.get_added_tokens_decoder().items())
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_tokens_map,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "added_tokens_decoder": added_tokens_decoder,
        "model_max_length": context_length,
        "clean_up_tokenization_spaces": False,
    }
    if metadata.get("tokenizer.chat_template"):
        tokenizer_config["chat_template"] = metadata["tokenizer.chat_template"]
    return tokenizer_config, special_tokens_map


# ---------------------------------------------------------------- files


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _publish(work_dir: Path, out_dir: Path) -> None:
    """Rename the finished folder into place; an older import there is replaced."""
    if not out_dir.exists():
        os.rename(work_dir, out_dir)
        return
    stale = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.stale-", dir=out_dir.parent))
    os.replace(out_dir, stale)
    os.rename(work_dir, out_dir)
    shutil.rmtree(stale, ignore_errors=True)
