"""Model hyperparameters read from an HF config.json.

Llama, Mistral and Qwen2 differ only in a few fields (biases, rope scaling,
head_dim, tied embeddings, sliding window), so one dataclass describes all of
them and the model code never branches on the architecture name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


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
        architectures = cfg.get("architectures") or []
        architecture = architectures[0] if architectures else _architecture_from_model_type(cfg.get("model_type"))
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {architecture or '(none given)'} is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        # transformers 5 writes rope settings as `rope_parameters` (theta inside);
        # checkpoints on the Hub mostly have `rope_theta` plus `rope_scaling`.
        rope = dict(cfg.get("rope_parameters") or {})
        rope_theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
        rope_scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            config = cls(
                architecture=architecture,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                rope_scaling=rope_scaling,
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                attention_bias=bool(cfg.get("attention_bias", False)),
                qkv_bias=architecture == "Qwen2ForCausalLM",
                mlp_bias=bool(cfg.get("mlp_bias", False)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                sliding_window=_sliding_window(architecture, cfg),
                bos_token_id=cfg.get("bos_token_id"),
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

    @classmethod
    def from_folder(cls, folder: str | Path) -> "ModelConfig":
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise ModelConfigError(f"{folder} has no config.json; is it a Hugging Face model folder?")
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
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
    return int(window)


def _as_id_tuple(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)
