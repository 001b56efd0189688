"""EXL3 written straight from ../shared/EXL3.md, independently of core/formats/exl3: the ring
read and written one bit at a time, the codebooks and the whole-layer decode in float64, and
a writer of EXL3 model folders (random trellis codes and scales) for the loader tests."""

from __future__ import annotations

import json
import math

import torch
from safetensors.torch import save_file

from core.formats.exl3.layout import pack_signs, unpack_trellis

# ---------------------------------------------------------------- the ring, one bit at a time


def spec_steps(bits) -> list[int]:
    if bits == int(bits):
        return [int(bits)] * 256
    # Half rates: odd positions take one extra bit.
    return [int(bits) + (1 if p % 2 else 0) for p in range(256)]


def spec_ring(words: list[int]) -> list[int]:
    """One tile's int16 words -> its ring bits: MSB-first in little-endian uint32 words."""
    ring = []
    for m in range(len(words) // 2):
        u = (words[2 * m] & 0xFFFF) | ((words[2 * m + 1] & 0xFFFF) << 16)
        ring.extend((u >> (31 - i)) & 1 for i in range(32))
    return ring


def spec_unpack(words: list[int], bits) -> list[int]:
    ring = spec_ring(words)
    size = len(ring)
    states, end = [], 0
    for step in spec_steps(bits):
        end += step
        state = 0
        for i in range(16):
            state = (state << 1) | ring[(end - 16 + i) % size]
        states.append(state)
    return states


def spec_pack(states: list[int], bits) -> list[int]:
    ring = []
    for state, step in zip(states, spec_steps(bits)):
        ring.extend((state >> (step - 1 - j)) & 1 for j in range(step))
    words = []
    for m in range(len(ring) // 32):
        u = 0
        for i in range(32):
            u |= ring[32 * m + i] << (31 - i)
        for half in (u & 0xFFFF, u >> 16):
            words.append(half - (1 << 16) if half >= 1 << 15 else half)
    return words


def spec_position(p: int) -> tuple[int, int]:
    t, e = divmod(p, 8)
    return 2 * (t % 4) + (e & 1) + 8 * ((e >> 1) & 1), t // 4 + 8 * (e >> 2)


# ---------------------------------------------------------------- values in float64


def _fp16_bits_value(bits: torch.Tensor) -> torch.Tensor:
    signed = torch.where(bits >= 1 << 15, bits - (1 << 16), bits).to(torch.int16)
    return signed.view(torch.float16).double()


def spec_codebook(name: str, states: torch.Tensor) -> torch.Tensor:
    """float64 values of int64 16-bit states: each the single fp16 rounding of an exact result."""
    if name == "mul1":
        x = (states * 0x83DCD12D) & 0xFFFFFFFF
        byte_sum = sum((x >> s) & 0xFF for s in (0, 8, 16, 24))
        exact = (1024 + byte_sum).double() * 0.00676727294921875 - 10.3828125
    else:
        x = states * 0xCBAC1FED if name == "mcg" else states * 89226354 + 64248484
        x = ((x & 0xFFFFFFFF) & 0x8FFF8FFF) ^ 0x3B603B60
        exact = _fp16_bits_value(x & 0xFFFF) + _fp16_bits_value(x >> 16)
    return exact.half().double()


def spec_hadamard() -> torch.Tensor:
    signs = [[(-1) ** bin(i & j).count("1") for j in range(128)] for i in range(128)]
    return torch.tensor(signs, dtype=torch.float64) / math.sqrt(128)


def spec_signs(words: torch.Tensor) -> torch.Tensor:
    return torch.tensor([-1.0 if (int(w) >> i) & 1 else 1.0 for w in words for i in range(16)], dtype=torch.float64)


def float64_codes_matrix(trellis: torch.Tensor, codebook: str, bit_by_bit: bool = False) -> torch.Tensor:
    """W_r, float64 [k, n]: each position's codebook value at its place in its tile. bit_by_bit reads the
    ring with spec_unpack (slow: small layers); otherwise with unpack_trellis, itself held to spec_unpack."""
    bits = trellis.shape[-1] / 16
    tiles_k, tiles_n = trellis.shape[:2]
    if bit_by_bit:
        states = torch.tensor([[spec_unpack(trellis[i, j].tolist(), bits) for j in range(tiles_n)]
                               for i in range(tiles_k)], dtype=torch.int64)
    else:
        states = unpack_trellis(trellis, bits)
    values = spec_codebook(codebook, states)
    w_r = torch.zeros(16 * tiles_k, 16 * tiles_n, dtype=torch.float64)
    for p in range(256):
        r, c = spec_position(p)
        w_r[r::16, c::16] = values[:, :, p]
    return w_r


def float64_weight(tensors: dict[str, torch.Tensor], codebook: str, bit_by_bit: bool = False) -> torch.Tensor:
    """W = diag(suh) H W_r H diag(svh), float64 [k, n], from the stored codes."""
    w_r = float64_codes_matrix(tensors["trellis"], codebook, bit_by_bit)
    h = spec_hadamard()
    k, n = w_r.shape
    rotated = (h @ w_r.view(k // 128, 128, n)).view(k, n)
    rotated = (rotated.view(k, n // 128, 128) @ h).view(k, n)
    suh = tensors["suh"].double() if "suh" in tensors else spec_signs(tensors["su"])
    svh = tensors["svh"].double() if "svh" in tensors else spec_signs(tensors["sv"])
    return suh[:, None] * rotated * svh[None, :]


# ---------------------------------------------------------------- a folder writer

MARKER_VALUES = {"mcg": 0xCBAC1FED, "mul1": 0x83DCD12D}


def marker(name: str) -> torch.Tensor:
    value = MARKER_VALUES[name]
    return torch.tensor(value - (1 << 32), dtype=torch.int32)


def random_layer(in_features: int, out_features: int, bits, codebook: str, seed: int,
                 legacy_signs: bool = False) -> dict[str, torch.Tensor]:
    """A layer's stored tensors: random ring words (any words are a consistent tail-biting ring),
    signed scales of a size that gives weights like a small model's, padded to 128."""
    g = torch.Generator().manual_seed(seed)
    k, n = -(-in_features // 128) * 128, -(-out_features // 128) * 128
    words = torch.randint(-(1 << 15), 1 << 15, (k // 16, n // 16, round(16 * bits)), generator=g).to(torch.int16)
    sign = lambda size: torch.randint(0, 2, (size,), generator=g) * 2 - 1  # noqa: E731
    suh = (sign(k) * (0.03 + 0.04 * torch.rand(k, generator=g))).half()
    svh = (sign(n) * (0.5 + torch.rand(n, generator=g))).half()
    svh[1] = 0  # a dead column, as the converter writes them
    tensors = {"trellis": words}
    if legacy_signs:
        tensors["su"], tensors["sv"] = pack_signs(suh), pack_signs(svh)
    else:
        tensors["suh"], tensors["svh"] = suh, svh
    if codebook != "3inst":
        tensors[codebook] = marker(codebook)
    return tensors


def exl3_quantization_config(bits=3.0, head_bits=6, codebook="mul1", version="1.6.5") -> dict:
    return {"quant_method": "exl3", "version": version, "bits": bits, "head_bits": head_bits,
            "calibration": {"rows": 250, "cols": 2048}, "out_scales": "auto", "codebook": codebook}


# Per linear (cycled): bits, codebook, legacy packed signs.
LAYER_KINDS = [(4, "mul1", False), (2.5, "mul1", False), (3, "3inst", False), (2, "mcg", False),
               (1.5, "mul1", False), (5, "mul1", True), (3.5, "mul1", False), (8, "mcg", False), (1, "3inst", False)]


def write_exl3_checkpoint(folder, hf_model, head: str = "exl3", pad_bias: bool = True, seed: int = 0) -> dict:
    """Replace every linear of hf_model (in place) by the float64 decode of a random EXL3 layer, rounded
    to float32, and write the model as an EXL3 folder; head "exl3" (6 bits) or "fp16" (lm_head.weight).
    Returns {layer name: (stored tensors, codebook)}."""
    state = {name: tensor.clone().contiguous() for name, tensor in hf_model.state_dict().items()}
    # ExLlamaV3 gives a tied model a head of its own (tie_word_embeddings false).
    hf_model.config.tie_word_embeddings = False
    hf_model.lm_head.weight = torch.nn.Parameter(hf_model.lm_head.weight.detach().clone(), requires_grad=False)
    layers = {}
    linears = [(name, module) for name, module in hf_model.named_modules() if isinstance(module, torch.nn.Linear)]
    with torch.no_grad():
        for index, (name, module) in enumerate(linears):
            if name == "lm_head":
                if head == "fp16":
                    state[f"{name}.weight"] = module.weight.half()
                    module.weight.copy_(module.weight.half().float())
                    continue
                bits, codebook, legacy = 6, "mul1", False
            else:
                bits, codebook, legacy = LAYER_KINDS[index % len(LAYER_KINDS)]
            tensors = random_layer(module.in_features, module.out_features, bits, codebook, seed + index, legacy)
            module.weight.copy_(float64_weight(tensors, codebook)[: module.in_features, : module.out_features].t())
            del state[f"{name}.weight"]
            state.update({f"{name}.{key}": value for key, value in tensors.items()})
            if module.bias is not None:
                bias = module.bias.half()
                module.bias.copy_(bias.float())
                # ExLlamaV3 may keep a bias as wide as the padded outputs; the loader trims it.
                if pad_bias and index % 2:
                    bias = torch.cat((bias, torch.ones(-(-bias.numel() // 128) * 128 - bias.numel()).half()))
                state[f"{name}.bias"] = bias
            layers[name] = (tensors, codebook)
    hf_model.config.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = exl3_quantization_config()
    config["tie_word_embeddings"] = False
    (folder / "config.json").write_text(json.dumps(config))
    save_file(state, str(folder / "model.safetensors"))
    return layers
