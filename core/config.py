"""Model hyperparameters read from an HF config.json.

Llama, Mistral and Qwen2 differ only in a few fields (biases, rope scaling,
head_dim, tied embeddings, sliding window), so one dataclass describes all of
them and the model code never branches on the architecture name.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

# Generous ceilings (several times the largest Llama/Mistral/Qwen2 released): a config
# beyond them is a mistake or an attack, and would ask for gigabytes before any check.
_SIZE_LIMITS = {
    "vocab_size": 1 << 22,
    "hidden_size": 1 << 16,
    "intermediate_size": 1 << 18,
    "num_hidden_layers": 1024,
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "head_dim": 1024,
    "max_position_embeddings": 1 << 24,
    "sliding_window": 1 << 24,
}
_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.")


class UnsupportedModelError(ValueError):
    """The model is well-formed but uses something this engine does not implement."""


class ModelConfigError(ValueError):
    """config.json is missing, unreadable, or lacks a field the model needs."""


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    attention_bias: bool = False  # bias on q, k, v and o (Llama's flag)
    qkv_bias: bool = False  # bias on q, k, v only (Qwen2)
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "float16"
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    @classmethod
    def from_dict(cls, cfg: dict) -> "ModelConfig":
        if not isinstance(cfg, dict):
            raise ModelConfigError(f"config.json must hold a JSON object, not a {type(cfg).__name__}")
        architectures = cfg.get("architectures") or []
        if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
            raise ModelConfigError("config.json field 'architectures' must be a list of names")
        architecture = architectures[0] if architectures else _architecture_from_model_type(cfg.get("model_type"))
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {architecture or '(none given)'} is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        # transformers 5 writes rope settings as `rope_parameters` (theta inside);
        # checkpoints on the Hub mostly have `rope_theta` plus `rope_scaling`.
        rope = cfg.get("rope_parameters") or {}
        rope_scaling = cfg.get("rope_scaling")
        if not isinstance(rope, dict) or not isinstance(rope_scaling, (dict, type(None))):
            raise ModelConfigError("config.json fields 'rope_parameters' and 'rope_scaling' must be objects")
        rope = dict(rope)
        rope_theta = _positive_float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)), "rope_theta")
        rope_scaling = rope_scaling or (rope if rope.get("rope_type", "default") != "default" else None)
        try:
            hidden = _size(cfg, "hidden_size")
            heads = _size(cfg, "num_attention_heads")
            head_dim = _size(cfg, "head_dim", None)
            if head_dim is None:
                if hidden % heads:
                    raise ModelConfigError(
                        f"config.json field 'num_attention_heads' ({heads}) does not divide hidden_size ({hidden})"
                    )
                head_dim = _size({"head_dim": hidden // heads}, "head_dim")
            config = cls(
                architecture=architecture,
                vocab_size=_size(cfg, "vocab_size"),
                hidden_size=hidden,
                intermediate_size=_size(cfg, "intermediate_size"),
                num_layers=_size(cfg, "num_hidden_layers"),
                num_heads=heads,
                num_kv_heads=_size(cfg, "num_key_value_heads", heads),
                head_dim=head_dim,
                rms_norm_eps=_positive_float(cfg.get("rms_norm_eps", 1e-6), "rms_norm_eps"),
                rope_theta=rope_theta,
                rope_scaling=rope_scaling,
                max_position_embeddings=_size(cfg, "max_position_embeddings", 2048),
                attention_bias=bool(cfg.get("attention_bias", False)),
                qkv_bias=architecture == "Qwen2ForCausalLM",
                mlp_bias=bool(cfg.get("mlp_bias", False)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                sliding_window=_sliding_window(architecture, cfg),
                bos_token_id=_token_id(cfg.get("bos_token_id"), "bos_token_id"),
                eos_token_ids=_as_id_tuple(cfg.get("eos_token_id")),
                torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float16"),
                raw=cfg,
            )
        except KeyError as missing:
            raise ModelConfigError(f"config.json lacks the field {missing}") from None
        if config.rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope_scaling type {config.rope_type!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        if config.num_heads % config.num_kv_heads:
            raise ModelConfigError("num_attention_heads must be a multiple of num_key_value_heads")
        return config

    def check_tensor_shapes(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Refuse a config that contradicts the checkpoint's own tensor shapes (read from the headers).

        Runs before any module is built: a config claiming 10^6 layers would
        otherwise cost gigabytes of empty modules before the first tensor is read.
        """
        layer_indices = {int(match.group(1)) for name in shapes if (match := _LAYER_NAME.match(name))}
        stored_layers = max(layer_indices) + 1 if layer_indices else 0
        if stored_layers != self.num_layers:
            raise ModelConfigError(
                f"config.json field 'num_hidden_layers' is {self.num_layers}, but the weights hold {stored_layers} layers"
            )
        embed = shapes.get("model.embed_tokens.weight")
        if embed is not None and tuple(embed) != (self.vocab_size, self.hidden_size):
            raise ModelConfigError(
                f"config.json fields 'vocab_size' and 'hidden_size' ({self.vocab_size}, {self.hidden_size}) "
                f"do not match the embedding's shape {tuple(embed)}"
            )

    @classmethod
    def from_folder(cls, folder: str | Path) -> "ModelConfig":
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise ModelConfigError(f"{folder} has no config.json; is it a Hugging Face model folder?")
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
            raise ModelConfigError(f"{path} is not valid JSON: {error}") from None
        return cls.from_dict(cfg)


def _architecture_from_model_type(model_type: str | None) -> str | None:
    return {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}.get(
        model_type or ""
    )


def _sliding_window(architecture: str, cfg: dict) -> int | None:
    window = cfg.get("sliding_window")
    if not window:
        return None
    if architecture == "Qwen2ForCausalLM" and not cfg.get("use_sliding_window", False):
        return None
    if architecture == "LlamaForCausalLM":
        return None
    return _size(cfg, "sliding_window")


def _as_id_tuple(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (_token_id(value, "eos_token_id"),)
    if not isinstance(value, list):
        raise ModelConfigError("config.json field 'eos_token_id' must be a token id or a list of them")
    return tuple(_token_id(v, "eos_token_id") for v in value)


def _token_id(value, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ModelConfigError(f"config.json field '{name}' must be a token id (an integer >= 0), not {value!r}")
    return value


_MISSING = object()


def _size(cfg: dict, name: str, default=_MISSING) -> int | None:
    """A positive whole-number field, within what any real model of these families has."""
    value = cfg.get(name)
    if value is None:
        if default is _MISSING:
            raise KeyError(name)
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelConfigError(f"config.json field '{name}' must be a whole number >= 1, not {value!r}")
    if value > _SIZE_LIMITS[name]:
        raise ModelConfigError(
            f"config.json field '{name}' is {value}, more than the {_SIZE_LIMITS[name]} any supported model has"
        )
    return value


def _positive_float(value, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number) or number <= 0:
        raise ModelConfigError(f"config.json field '{name}' must be a finite number > 0, not {value!r}")
    return number
