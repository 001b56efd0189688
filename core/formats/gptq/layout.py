"""The GPTQ 4-bit layout as AutoGPTQ and GPTQModel write it: packing, unpacking,
the row order the kernels take, and the checks on a layer's tensors. Nothing
here knows about models; reader.py reads the settings, linear.py runs a layer.

One layer with K inputs and N outputs is stored as (after its prefix):

    qweight  int32 [K / 8, N]       4-bit codes; input 8i + j is nibble j (bits 4j..4j+3) of row i
    qzeros   int32 [groups, N / 8]  4-bit zero points; output 8c + j is nibble j of column c
    scales   fp16  [groups, N]
    g_idx    int32 [K]              group of each input (act-order shuffles it)
    bias     [N]                    only where the layer has one

and its weight is W[k, n] = scales[g, n] * (code[k, n] - zero[g, n]) with
g = g_idx[k]. The nibble orders were read from AutoGPTQ's QuantLinear.pack; the
zero a nibble stands for depends on checkpoint_format (reader.py, ZERO_OFFSETS).

Symmetric quantization is just zero = 8 everywhere; nothing here depends on
`sym`. Without act-order g_idx is k // group_size; with it, any group per
input. GPTQLinear sorts the rows by group once at load (`sort_rows_by_group`),
so each group is a run of rows and the input is permuted instead.
"""

from __future__ import annotations

import torch

from ...weights import WeightsError

# Tensor names (after the layer's prefix); g_idx may be absent when there is no act-order.
LAYER_TENSORS = ("qweight", "qzeros", "scales", "g_idx")
CODES_PER_WORD = 8


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
