"""Tiny random-weight HF checkpoints of every architecture variant we support,
written with transformers itself so our loader reads what real users have."""

from __future__ import annotations

from pathlib import Path

import torch

BASE = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
)

VARIANTS = {
    "llama-gqa": ("llama", {}),
    "llama3-rope-tied": (
        "llama",
        dict(
            tie_word_embeddings=True,
            rope_theta=500000.0,
            rope_scaling=dict(
                rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
    ),
    "llama-linear-rope-headdim": (
        "llama", dict(head_dim=32, num_key_value_heads=4, rope_scaling=dict(rope_type="linear", factor=2.0))
    ),
    "llama-bias": ("llama", dict(attention_bias=True, mlp_bias=True)),
    "mistral-sliding": ("mistral", dict(sliding_window=8, num_key_value_heads=1)),
    "qwen2-bias": ("qwen2", dict(tie_word_embeddings=True)),
}


def build_hf_model(variant: str, seed: int = 0):
    import transformers

    model_type, overrides = VARIANTS[variant]
    config = transformers.AutoConfig.for_model(model_type, **{**BASE, **overrides})
    if model_type == "qwen2":
        config.use_sliding_window = False
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init is small; widen it so differences in rounding or rope show in the logits.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.copy_(torch.randn_like(param) * 0.08)
    return model.eval()


def save_hf_model(variant: str, folder: Path, seed: int = 0):
    model = build_hf_model(variant, seed)
    model.save_pretrained(folder, safe_serialization=True)
    return model


CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def sample_text(sentences: int = 400, seed: int = 0) -> str:
    """Plain English-like text made up here, for calibration and scoring in tests."""
    import random

    rng = random.Random(seed)
    subjects = ["The engineer", "A small model", "The old lighthouse", "My neighbour", "The river", "Every student"]
    verbs = ["writes", "measures", "remembers", "carries", "explains", "quantizes"]
    objects = ["a long letter", "the weights", "forty numbers", "the morning light", "a short story", "its errors"]
    tails = ["before dinner.", "with great care.", "in the rain.", "for the third time.", "and then rests.", "again."]
    return " ".join(
        f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)} {rng.choice(tails)}" for _ in range(sentences)
    )


def save_tiny_tokenizer(folder: Path, vocab_size: int) -> None:
    """A byte-level BPE trained here, with ChatML specials and template, saved as transformers would."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    rust = Tokenizer(models.BPE())
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rust.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    rust.train_from_iterator(sample_text(200, seed=1).split(". "), trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=rust, bos_token="<|im_start|>", eos_token="<|im_end|>")
    wrapped.chat_template = CHATML
    wrapped.save_pretrained(folder)


def save_tiny_chat_model(variant: str, folder: Path, seed: int = 0):
    """A random-weight model with a real tokenizer: enough for the converter and the chat path."""
    model = save_hf_model(variant, folder, seed)
    save_tiny_tokenizer(folder, vocab_size=model.config.vocab_size)
    return model
