"""GPTQ 4-bit checkpoints as AutoGPTQ and GPTQModel write them: settings, layout
and the torch reference dequantizer. Nothing here knows about models; the
loader asks it which layers are GPTQ and core.linear.GPTQLinear runs them.

One layer with K inputs and N outputs is stored as (after its prefix):

    qweight  int32 [K / 8, N]       4-bit codes; input 8i + j is nibble j (bits 4j..4j+3) of row i
    qzeros   int32 [groups, N / 8]  4-bit zero points; output 8c + j is nibble j of column c
    scales   fp16  [groups, N]
    g_idx    int32 [K]              group of each input (act-order shuffles it)
    bias     [N]                    only where the layer has one

and its weight is W[k, n] = scales[g, n] * (code[k, n] - zero[g, n]) with
g = g_idx[k]. Facts read from AutoGPTQ's QuantLinear.pack (both nibble orders)
and GPTQModel's v1 <-> v2 conversion (the zero convention):

- checkpoint_format "gptq" (v1, AutoGPTQ and older GPTQModel) stores zero - 1
  in each nibble and readers add the one back per nibble, so a stored 0xF reads
  as 16 (a real zero of 0 cannot be written in v1).
- "gptq_v2" (GPTQModel) stores the zero itself.

Symmetric quantization is just zero = 8 everywhere; nothing here depends on
`sym`. Without act-order g_idx is k // group_size; with it, any group per
input. GPTQLinear sorts the rows by group once at load (`sort_rows_by_group`),
so each group is a run of rows and the input is permuted instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import UnsupportedModelError
from .weights import WeightsError

SUPPORTED_BITS = (4,)
# Value added to a stored nibble to get the zero point, per checkpoint_format.
ZERO_OFFSETS = {"gptq": 1, "gptq_v2": 0}
# Tensor names (after the layer's prefix); g_idx may be absent when there is no act-order.
GPTQ_TENSORS = ("qweight", "qzeros", "scales", "g_idx")
CODES_PER_WORD = 8
# Quantization methods whose tensors the loader reads; any other is refused by name.
KNOWN_METHODS = ("gptq", "exl2")


@dataclass(frozen=True)
class GPTQSettings:
    bits: int
    group_size: int  # -1: one group over all inputs
    desc_act: bool
    sym: bool
    checkpoint_format: str

    @property
    def zero_offset(self) -> int:
        return ZERO_OFFSETS[self.checkpoint_format]


def read_gptq_settings(folder: str | Path) -> GPTQSettings | None:
    """The GPTQ settings of a model folder, None when it is not a GPTQ checkpoint.

    config.json's `quantization_config` comes first (transformers, GPTQModel and
    later AutoGPTQ write it); older AutoGPTQ folders have quantize_config.json only.
    """
    folder = Path(folder)
    config = _read_json(folder / "config.json").get("quantization_config")
    source = "config.json quantization_config"
    if not config and (folder / "quantize_config.json").is_file():
        config = _read_json(folder / "quantize_config.json")
        # AutoGPTQ's own file has no quant_method: being there says GPTQ.
        config.setdefault("quant_method", "gptq")
        source = "quantize_config.json"
    return gptq_settings(config, source) if config else None


def gptq_settings(config: dict, source: str = "quantization_config") -> GPTQSettings | None:
    """Validate one quantization config; None for non-GPTQ methods the loader knows (EXL2)."""
    method = str(config.get("quant_method", "")).lower()
    if method not in KNOWN_METHODS:
        raise UnsupportedModelError(
            f"{source}: quantization method {method or '(none given)'!r} is not supported; "
            "quantlab loads EXL2 and GPTQ 4-bit checkpoints, and unquantized fp16/bf16/fp32 ones")
    if method != "gptq":
        return None
    bits = config.get("bits")
    if bits not in SUPPORTED_BITS:
        raise UnsupportedModelError(
            f"{source}: GPTQ with {bits} bits is not supported; quantlab loads GPTQ checkpoints of "
            f"{', '.join(map(str, SUPPORTED_BITS))} bits only (look for a 4-bit version of this model)")
    if config.get("is_marlin_format"):
        raise UnsupportedModelError(f"{source}: GPTQ in AutoGPTQ's Marlin layout is not supported; "
                                    "use the checkpoint in its plain GPTQ layout (checkpoint_format gptq or gptq_v2)")
    checkpoint_format = str(config.get("checkpoint_format") or "gptq").lower()
    if checkpoint_format not in ZERO_OFFSETS:
        raise UnsupportedModelError(
            f"{source}: GPTQ checkpoint_format {checkpoint_format!r} is not supported; "
            f"supported: {', '.join(ZERO_OFFSETS)}")
    pack_dtype = str(config.get("pack_dtype") or "int32").replace("torch.", "")
    if pack_dtype != "int32":
        raise UnsupportedModelError(f"{source}: GPTQ packed in {pack_dtype} is not supported; only int32 packing is")
    group_size = config.get("group_size")
    group_size = -1 if group_size is None else int(group_size)
    if group_size == 0 or group_size < -1:
        raise UnsupportedModelError(f"{source}: GPTQ group_size {group_size} is not valid; use -1 or a positive size")
    return GPTQSettings(bits=int(bits), group_size=group_size, desc_act=bool(config.get("desc_act", False)),
                        sym=bool(config.get("sym", True)), checkpoint_format=checkpoint_format)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise WeightsError(f"{path} is not valid JSON: {error}") from None
    return value if isinstance(value, dict) else {}


# ---------------------------------------------------------------- layout


def _shifts(device) -> torch.Tensor:
    return torch.arange(0, 32, 4, dtype=torch.int32, device=device)


def unpack_rows(qweight: torch.Tensor) -> torch.Tensor:
    """int32 [K / 8, N] -> codes uint8 [K, N]; input 8i + j is nibble j of row i."""
    words, columns = qweight.shape
    # The arithmetic shift drags the sign bit along, which the mask drops.
    codes = (qweight.unsqueeze(1) >> _shifts(qweight.device).view(1, -1, 1)) & 0xF
    return codes.to(torch.uint8).view(words * CODES_PER_WORD, columns)


def pack_rows(codes: torch.Tensor) -> torch.Tensor:
    """Inverse of unpack_rows: codes [K, N] (K a multiple of 8) -> int32 [K / 8, N]."""
    rows, columns = codes.shape
    nibbles = codes.to(torch.int32).view(rows // CODES_PER_WORD, CODES_PER_WORD, columns)
    # Fields do not overlap, so adding is or-ing; the top nibble goes in sign-extended
    # and multiplied, which lands on the two's-complement word without an int32 overflow.
    words = torch.zeros(rows // CODES_PER_WORD, columns, dtype=torch.int32, device=codes.device)
    for j in range(CODES_PER_WORD - 1):
        words += nibbles[:, j] << (4 * j)
    top = nibbles[:, CODES_PER_WORD - 1]
    words += (top - ((top & 8) << 1)) * (1 << 28)
    return words


def unpack_zeros(qzeros: torch.Tensor, zero_offset: int) -> torch.Tensor:
    """int32 [groups, N / 8] -> zero points int32 [groups, N] (the stored nibble plus the format's offset)."""
    groups, words = qzeros.shape
    nibbles = (qzeros.unsqueeze(-1) >> _shifts(qzeros.device)) & 0xF
    return nibbles.view(groups, words * CODES_PER_WORD) + zero_offset


def default_g_idx(in_features: int, group_size: int, device=None) -> torch.Tensor:
    size = in_features if group_size == -1 else group_size
    return torch.arange(in_features, dtype=torch.int32, device=device) // size


def sort_rows_by_group(qweight: torch.Tensor, g_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(qweight with rows in group order, g_idx in that order, perm) where stored row r
    is input perm[r]; perm is None when the checkpoint is in group order already."""
    g_idx = g_idx.to(torch.int32)
    if g_idx.numel() < 2 or bool((g_idx[1:] >= g_idx[:-1]).all()):
        return qweight, g_idx, None
    perm = torch.argsort(g_idx.to(torch.int64), stable=True)
    codes = unpack_rows(qweight).index_select(0, perm)
    return pack_rows(codes), g_idx.index_select(0, perm), perm.to(torch.int32)


def dequantize_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                    zero_offset: int, perm: torch.Tensor | None = None) -> torch.Tensor:
    """float32 [K, N], rows in the original input order.

    (code - zero) * scale is exact in float32 (an fp16 scale times an integer of
    at most 5 bits), so this is the checkpoint's weight with no rounding at all;
    casting it to fp16 rounds once, as the dequant kernel does.
    """
    codes = unpack_rows(qweight)
    zeros = unpack_zeros(qzeros, zero_offset)
    group = g_idx.to(torch.int64)
    weight = (codes.to(torch.float32) - zeros.index_select(0, group).to(torch.float32))
    weight.mul_(scales.to(torch.float32).index_select(0, group))
    if perm is not None:
        weight = torch.empty_like(weight).index_copy_(0, perm.to(torch.int64), weight)
    return weight


def check_layer_tensors(name: str, in_features: int, out_features: int, qweight: torch.Tensor,
                        qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor) -> None:
    """Shapes and dtypes of one layer against what config.json implies, with what to do when they differ."""
    if in_features % CODES_PER_WORD or out_features % CODES_PER_WORD:
        raise WeightsError(f"GPTQ layer {name}: {in_features} inputs and {out_features} outputs; "
                           "4-bit GPTQ packs 8 per int32, so both must be multiples of 8")
    for tensor_name, tensor in (("qweight", qweight), ("qzeros", qzeros), ("g_idx", g_idx)):
        if tensor.dtype != torch.int32:
            raise WeightsError(f"GPTQ layer {name}: {tensor_name} is {tensor.dtype}, expected int32")
    if not scales.is_floating_point():
        raise WeightsError(f"GPTQ layer {name}: scales is {scales.dtype}, expected a float type")
    expected = (in_features // CODES_PER_WORD, out_features)
    if tuple(qweight.shape) != expected:
        raise WeightsError(f"GPTQ layer {name}: qweight has shape {tuple(qweight.shape)}, a 4-bit layer of "
                           f"{in_features} inputs and {out_features} outputs has {expected}; "
                           "is quantization_config's bits right for this layer?")
    groups = scales.shape[0] if scales.dim() == 2 else -1
    if scales.dim() != 2 or scales.shape[1] != out_features or groups < 1:
        raise WeightsError(f"GPTQ layer {name}: scales has shape {tuple(scales.shape)}, expected [groups, {out_features}]")
    if tuple(qzeros.shape) != (groups, out_features // CODES_PER_WORD):
        raise WeightsError(f"GPTQ layer {name}: qzeros has shape {tuple(qzeros.shape)}, "
                           f"expected {(groups, out_features // CODES_PER_WORD)}")
    if tuple(g_idx.shape) != (in_features,):
        raise WeightsError(f"GPTQ layer {name}: g_idx has shape {tuple(g_idx.shape)}, expected ({in_features},)")
    if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
        raise WeightsError(f"GPTQ layer {name}: g_idx names groups outside 0..{groups - 1}")
