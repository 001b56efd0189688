"""Random-weight EXL2 layers and models, made directly in the stored layout.

Any int32 word is a valid run of codes of any width, so a layer is random words
plus a group table; no conversion is needed to benchmark a 7B-shaped model or to
check the kernels. Scales are chosen so a layer roughly keeps its input's size.
"""

from __future__ import annotations

import math

import torch

from core.config import ModelConfig
from core.formats.exl2.layout import packed_rows, padded_columns, stored_bits
from core.formats.exl2.linear import EXL2Linear
from core.model import CausalLM
from core.rope import rope_inverse_frequencies

GROUP_SIZE = 128

# Bit widths and row shares for a target bpw, higher widths on the first
# (most salient, in act-order) rows as the converter would place them.
MIXES = {
    2.5: [(3, 0.5), (2, 0.5)],
    3.0: [(3, 1.0)],
    4.0: [(4, 1.0)],
    5.0: [(5, 1.0)],
    6.0: [(6, 1.0)],
    8.0: [(8, 1.0)],
}


def layout_for(in_features: int, mix: list[tuple[int, float]], group_size: int = GROUP_SIZE) -> list[tuple[int, int]]:
    """(bits, rows) per group: whole groups of `group_size` rows, the last one shorter if needed."""
    groups = -(-in_features // group_size)
    layout, row = [], 0
    shares = [round(share * groups) for _, share in mix]
    shares[-1] = groups - sum(shares[:-1])
    for (bits, _), count in zip(mix, shares):
        for _ in range(count):
            rows = min(group_size, in_features - row)
            layout.append((bits, rows))
            row += rows
    return layout


def _random_words(shape, generator, device) -> torch.Tensor:
    words = torch.randint(0, 1 << 32, shape, dtype=torch.int64, generator=generator, device=device)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def random_exl2_tensors(in_features: int, out_features: int, layout: list[tuple[int, int]], device="cuda",
                        seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator(device=device).manual_seed(seed)
    columns = padded_columns(out_features)
    table, packed = [], 0
    for bits, rows in layout:
        table += [bits, packed]
        packed += packed_rows(rows, bits)
    # RMS of (code - mid) is 2^b / sqrt(12), of the decoded scale fraction about 0.43:
    # per-group maxima that give weights of RMS about 1 / sqrt(in_features).
    scale_max = torch.tensor([math.sqrt(12) / (0.43 * (1 << bits) * math.sqrt(in_features)) for bits, _ in layout],
                             dtype=torch.float16, device=device)
    perm = torch.randperm(in_features, generator=generator, device=device)
    return {
        "q_weight": _random_words((packed, columns), generator, device),
        "q_scale": _random_words((len(layout), columns // 8), generator, device),
        "q_scale_max": scale_max,
        "q_groups": torch.tensor(table, dtype=torch.int16, device=device),
        "q_invperm": torch.argsort(perm).to(torch.int32),
    }


def llama_config(name: str, layers: int | None = None, vocab: int | None = None) -> ModelConfig:
    shapes = {
        "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                          vocab_size=32000, num_hidden_layers=32, rope_theta=10000.0),
        "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                          vocab_size=128256, num_hidden_layers=32, rope_theta=500000.0),
        # The demo model's widths (SmolLM2-135M), few layers: for the tests.
        "small": dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                      vocab_size=2048, num_hidden_layers=2, rope_theta=10000.0),
    }
    cfg = dict(shapes[name], architectures=["LlamaForCausalLM"], max_position_embeddings=4096, rms_norm_eps=1e-5)
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    if vocab is not None:
        cfg["vocab_size"] = vocab
    return ModelConfig.from_dict(cfg)


LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def random_model(config: ModelConfig, bpw: float | None, device="cuda", dtype=torch.float16, seed: int = 0,
                 head_bits: int = 6) -> CausalLM:
    """A model of `config`'s shape with random weights: fp16 when bpw is None, else
    every linear (and the head, at head_bits) in EXL2 at the mix MIXES[bpw]."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = CausalLM(config, dtype=dtype)
    quantized = {}
    if bpw is not None:
        # Swapped in on the meta device, so no dense copy of a quantized layer is ever allocated.
        paths = [f"model.layers.{i}.{leaf}" for i in range(config.num_layers) for leaf in LINEARS] + ["lm_head"]
        for path in paths:
            dense = model.get_submodule(path)
            layer = EXL2Linear(dense.in_features, dense.out_features, False, "meta", dtype)
            parent, _, leaf = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, layer)
            quantized[path] = layer
    model = model.to_empty(device=device)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            elif param.dim() == 2:
                param.normal_(0.0, 1.0 / math.sqrt(param.shape[1]) if "embed" not in name else 1.0)
            else:
                param.zero_()
    # Built on the meta device, the rope frequencies need computing again.
    model.inv_freq = rope_inverse_frequencies(config).to(device)
    for index, (path, layer) in enumerate(quantized.items()):
        mix = [(head_bits, 1.0)] if path == "lm_head" else MIXES[bpw]
        tensors = random_exl2_tensors(layer.in_features, layer.out_features, layout_for(layer.in_features, mix),
                                      device, seed * 1000 + index)
        for key, tensor in tensors.items():
            layer._buffers[key] = tensor
    return model.eval()


def quantized_bits(model: CausalLM) -> tuple[int, int]:
    """(bits stored, weights) over the model's EXL2 layers, the head excluded as bpw counts it."""
    bits = weights = 0
    for name, module in model.named_modules():
        if isinstance(module, EXL2Linear) and name != "lm_head":
            bits += stored_bits(module.quantized_tensors())
            weights += module.in_features * module.out_features
    return bits, weights
