"""The EXL2 tensor layout: packing, unpacking and the checks on a layer's tables.

Shared by the converter (which packs) and the loader (which reads), so it knows
nothing about GPTQ or models; reference.py decodes a layer with it. Every layout fact below was read from
ExLlamaV2 0.3.2 and is noted where it is used.

One quantized linear layer with `in_features` inputs and `out_features` outputs
is stored as (names without the `model.layers.N.self_attn.q_proj.` prefix):

    q_weight     int32 [packed_rows, out_padded]  codes, input rows in act-order
    q_scale      int32 [groups, out_padded / 8]   4-bit scale code per group and column
    q_scale_max  fp16  [groups]                   the group's largest scale
    q_groups     int16 [2 * groups]               (bits, first packed row) per group
    q_invperm    int32 [in_features]              inverse of the act-order permutation
    bias         fp16  [out_features]             only when the layer has one

`out_padded` is out_features rounded up to a multiple of 32. Row `k` of the
act-ordered matrix is input `perm[k]` of the original layer, with
`perm = argsort(q_invperm)`; the dequantized weight returned here is in the
original input order, shaped [in_features, out_features] (the transpose of
nn.Linear.weight), which is the orientation ExLlamaV2 reconstructs into.
"""

from __future__ import annotations

import functools

import torch

# Tensor names (after the layer's prefix) of an EXL2 layer, as ExLlamaV2 writes them.
LAYER_TENSORS = ("q_weight", "q_scale", "q_scale_max", "q_groups", "q_invperm")
SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
SCALE_BITS = 4
# pack_tensor.cu pads q_weight and q_scale to whole 32-column tiles.
COLUMN_ALIGN = 32

_WORD = 1 << 32


def padded_columns(out_features: int) -> int:
    return -(-out_features // COLUMN_ALIGN) * COLUMN_ALIGN


def packed_rows(rows: int, bits: int) -> int:
    """int32 rows that `rows` codes of `bits` occupy, rounded up as the packer does."""
    return -(-rows * bits // 32)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"EXL2 stores {SUPPORTED_BITS} bits per weight, not {bits}")


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    # Words are built as unsigned values in int64; int32 storage reinterprets the top bit as the sign.
    return torch.where(words >= _WORD // 2, words - _WORD, words).to(torch.int32)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack one run of same-width codes [rows, cols] into int32 [packed_rows, cols].

    Within each column the codes form one little-endian bit stream: code `i`
    sits at bit `i * bits` of the concatenated words, so 3-, 5- and 6-bit codes
    straddle word boundaries (pack_columns_kernel in pack_tensor.cu; the
    reference paths of qdq_3/5/6.cuh read them back with a funnel shift). The
    stored words are the unshuffled ones: ExLlamaV2 reorders bits for its fast
    dequantizers only in GPU memory, at load time (shuffle_kernel in q_matrix.cu).
    """
    _check_bits(bits)
    rows, cols = codes.shape
    if codes.numel() and bool(((codes < 0) | (codes.to(torch.int32) >= 1 << bits)).any()):
        raise ValueError(f"codes out of range for {bits} bits")
    # A stream of 32 codes always fills exactly `bits` words, so blocks of 32 rows
    # are packed independently with the same shift pattern, all 32 rows of every
    # block in a few whole-tensor ops (fields do not overlap, so adding is or-ing).
    blocks = -(-rows // 32)
    padded = torch.zeros(blocks * 32, cols, dtype=torch.int64, device=codes.device)
    padded[:rows] = codes.to(torch.int64)
    padded = padded.view(blocks, 32, cols)
    word, shift, spill = _stream_layout(bits, codes.device)
    words = torch.zeros(blocks, bits, cols, dtype=torch.int64, device=codes.device)
    words.index_add_(1, word, (padded << shift) & (_WORD - 1))
    if spill is not None:
        words.index_add_(1, word[spill] + 1, padded[:, spill] >> (32 - shift[:, spill]))
    words = words.view(blocks * bits, cols)[: packed_rows(rows, bits)]
    return _to_int32(words)


@functools.lru_cache(maxsize=None)
def _stream_layout(bits: int, device: torch.device):
    """For code i of a 32-code run: its word, its shift in that word (shaped to
    broadcast over [blocks, 32, cols]) and the codes that spill into the next word."""
    position = torch.arange(32) * bits
    word, shift = position // 32, position % 32
    spill = torch.nonzero(shift + bits > 32).flatten()
    return word.to(device), shift.view(1, 32, 1).to(device), spill.to(device) if len(spill) else None


def unpack_codes(words: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """Inverse of `pack_codes`: int32 [packed_rows, cols] -> uint8 codes [rows, cols]."""
    _check_bits(bits)
    cols = words.shape[1]
    if words.shape[0] < packed_rows(rows, bits):
        raise ValueError(f"{words.shape[0]} packed rows cannot hold {rows} codes of {bits} bits")
    blocks = -(-rows // 32)
    # One spare zero word per block, so a code that spills reads it instead of past the end.
    stream = torch.zeros(blocks * bits, cols, dtype=torch.int64, device=words.device)
    n = min(words.shape[0], blocks * bits)
    stream[:n] = words[:n].to(torch.int64) & (_WORD - 1)
    stream = torch.cat([stream.view(blocks, bits, cols), torch.zeros(blocks, 1, cols, dtype=torch.int64,
                                                                       device=words.device)], dim=1)
    word, shift, spill = _stream_layout(bits, words.device)
    value = stream.index_select(1, word) >> shift
    if spill is not None:
        value[:, spill] |= stream.index_select(1, word[spill] + 1) << (32 - shift[:, spill])
    codes = (value & ((1 << bits) - 1)).to(torch.uint8)
    return codes.view(blocks * 32, cols)[:rows]


def pack_q_scale(scale_codes: torch.Tensor) -> torch.Tensor:
    """4-bit scale codes [groups, cols] (cols a multiple of 8) -> int32 [groups, cols / 8].

    Column `8j + i` sits at bits 4i..4i+3 of word j (pack_rows_4_kernel in
    pack_tensor.cu; read back by MatrixView_q4_row::item in matrix_view.cuh).
    """
    groups, cols = scale_codes.shape
    if cols % 8:
        raise ValueError(f"q_scale packs 8 columns per int32; got {cols} columns")
    codes = scale_codes.to(torch.int64).view(groups, cols // 8, 8)
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=codes.device)
    return _to_int32((codes << shifts).sum(dim=-1))


def unpack_q_scale(q_scale: torch.Tensor) -> torch.Tensor:
    """int32 [groups, cols / 8] -> scale codes uint8 [groups, cols]."""
    words = q_scale.to(torch.int64) & (_WORD - 1)
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=words.device)
    codes = (words.unsqueeze(-1) >> shifts) & 0xF
    return codes.reshape(q_scale.shape[0], -1).to(torch.uint8)


def decode_scales(scale_codes: torch.Tensor, q_scale_max: torch.Tensor) -> torch.Tensor:
    """Per-group, per-column scales, fp16 [groups, cols], rounded as ExLlamaV2's kernels round them.

    scale = (code + 1)^2 * (q_scale_max / 256). The loader multiplies q_scale_max
    by 1/256 in fp16 (make_q_matrix in ext.py) and the kernel multiplies by the
    squared code in fp16 (dq_scale in qdq_util.cuh). Each product of two fp16
    values is exact in fp32, so rounding the fp32 product to fp16 gives the
    same bits as the GPU's fp16 multiply.
    """
    max_over_256 = (q_scale_max.to(torch.float32) / 256).to(torch.float16)
    squared = (scale_codes.to(torch.float32) + 1) ** 2
    return (squared * max_over_256.to(torch.float32).unsqueeze(1)).to(torch.float16)


def group_rows(q_groups: torch.Tensor, num_packed_rows: int, in_features: int) -> list[tuple[int, int]]:
    """(bits, rows) of each group, derived from q_groups as ExLlamaV2's QMatrix does.

    A group's row count is implied by where the next group starts; the last
    group takes whatever inputs remain (QMatrix constructor in q_matrix.cu).
    """
    table = [int(v) for v in q_groups.tolist()]
    if len(table) % 2:
        raise ValueError("q_groups holds (bits, packed row) pairs; its length must be even")
    groups = len(table) // 2
    layout = []
    row = 0
    for g in range(groups):
        bits, start = table[2 * g], table[2 * g + 1]
        _check_bits(bits)
        if g < groups - 1:
            qrows = table[2 * g + 3] - start
            if (qrows * 32) % bits:
                raise ValueError(f"group {g}: {qrows} packed rows do not hold whole {bits}-bit codes")
            rows = qrows * 32 // bits
        else:
            rows = in_features - row
            if packed_rows(rows, bits) != num_packed_rows - start:
                raise ValueError(f"last group: {num_packed_rows - start} packed rows for {rows} inputs of {bits} bits")
        if rows <= 0:
            raise ValueError(f"group {g} has no rows")
        layout.append((bits, rows))
        row += rows
    if row != in_features:
        raise ValueError(f"groups cover {row} inputs, the layer has {in_features}")
    return layout


def _segments(layout: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """Merge neighbouring groups of one width into (bits, first group, last group + 1) runs.

    Every group but the last ends on a word boundary, so a run of same-width
    groups is one continuous bit stream and unpacks in one vectorised pass.
    """
    runs = []
    for g, (bits, _) in enumerate(layout):
        if runs and runs[-1][0] == bits:
            runs[-1][2] = g + 1
        else:
            runs.append([bits, g, g + 1])
    return [tuple(r) for r in runs]


def pack_q_weight(codes: torch.Tensor, layout: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Act-ordered codes [in_features, cols] and (bits, rows) per group -> (q_weight, q_groups)."""
    if sum(r for _, r in layout) != codes.shape[0]:
        raise ValueError("group rows do not add up to the code rows")
    blocks, table = [], []
    row = out_row = 0
    for g, (bits, rows) in enumerate(layout):
        if g < len(layout) - 1 and (rows * bits) % 32:
            # ExLlamaV2 derives a group's size from packed rows, so only the last group may end mid-word.
            raise ValueError(f"group {g}: {rows} rows of {bits} bits do not fill whole int32 words")
        words = pack_codes(codes[row : row + rows], bits)
        table += [bits, out_row]
        blocks.append(words)
        row += rows
        out_row += words.shape[0]
    return torch.cat(blocks, dim=0), torch.tensor(table, dtype=torch.int16, device=codes.device)


def unpack_q_weight(q_weight: torch.Tensor, q_groups: torch.Tensor, in_features: int) -> torch.Tensor:
    """q_weight -> act-ordered codes uint8 [in_features, cols]."""
    layout = group_rows(q_groups, q_weight.shape[0], in_features)
    starts = q_groups.view(-1, 2)[:, 1].tolist()
    parts = []
    for bits, first, last in _segments(layout):
        rows = sum(r for _, r in layout[first:last])
        end = starts[last] if last < len(layout) else q_weight.shape[0]
        parts.append(unpack_codes(q_weight[starts[first] : end], bits, rows))
    return torch.cat(parts, dim=0)


def pack_exl2(
    codes: torch.Tensor,
    scale_codes: torch.Tensor,
    scale_max: torch.Tensor,
    layout: list[tuple[int, int]],
    invperm: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Assemble the stored tensors of one layer from act-ordered codes [in, out],
    scale codes [groups, out] (0..15), fp16 group maxima and the group layout."""
    out_features = codes.shape[1]
    padding = padded_columns(out_features) - out_features
    if padding:
        # Padded columns dequantize to zero: mid-range weight codes (pack() in
        # adaptivegptq.py), and scale code 15 because ExLlamaV2's packer turns
        # its zero padding into 0xF nibbles when it subtracts 1 in uint16.
        mid = torch.cat([torch.full((rows, padding), 1 << (bits - 1), dtype=codes.dtype, device=codes.device) for bits, rows in layout])
        codes = torch.cat([codes, mid], dim=1)
        scale_codes = torch.cat([scale_codes, torch.full((scale_codes.shape[0], padding), 15, dtype=scale_codes.dtype, device=scale_codes.device)], dim=1)
    q_weight, q_groups = pack_q_weight(codes, layout)
    return {
        "q_weight": q_weight,
        "q_scale": pack_q_scale(scale_codes),
        "q_scale_max": scale_max.to(torch.float16).reshape(-1),
        "q_groups": q_groups,
        "q_invperm": invperm.to(torch.int32),
    }


def stored_bits(tensors: dict[str, torch.Tensor]) -> int:
    """Bits the stored tensors of one layer occupy, padding included."""
    return sum(t.numel() * t.element_size() * 8 for t in tensors.values())
