"""The EXL2 tensor layout: packing must produce the words ExLlamaV2 reads."""


import pytest
import torch

from core.formats.exl2.layout import (
    SUPPORTED_BITS,
    decode_scales,
    group_rows,
    pack_codes,
    pack_exl2,
    pack_q_scale,
    pack_q_weight,
    packed_rows,
    stored_bits,
    unpack_codes,
    unpack_q_scale,
    unpack_q_weight,
)
from core.formats.exl2.reference import dequantize_exl2


def u32(words: torch.Tensor) -> list:
    """Stored int32 words as the unsigned values the kernels see."""
    return (words.to(torch.int64) & 0xFFFFFFFF).tolist()


def random_codes(rows, cols, bits, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, (rows, cols), generator=g, dtype=torch.int64).to(torch.uint8)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("rows, cols", [(128, 576), (64, 1536), (200, 96), (77, 40), (32, 32), (5, 8)])
def test_codes_round_trip_every_width(bits, rows, cols):
    codes = random_codes(rows, cols, bits, seed=bits * 1000 + rows)
    words = pack_codes(codes, bits)
    assert words.dtype == torch.int32
    assert words.shape == (packed_rows(rows, bits), cols)
    assert torch.equal(unpack_codes(words, bits, rows), codes)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_codes_form_one_little_endian_bit_stream_per_column(bits):
    # Independent bit-by-bit model of pack_columns_kernel (pack_tensor.cu).
    rows = 96
    codes = random_codes(rows, 3, bits, seed=bits)
    words = u32(pack_codes(codes, bits))
    for col in range(3):
        stream = 0
        for r in range(len(words)):
            stream |= words[r][col] << (32 * r)
        for r in range(rows):
            assert (stream >> (r * bits)) & ((1 << bits) - 1) == int(codes[r, col])


# Hand-derived words for column 0 of a 32-input matrix, one per width.
# Positions come from the reference (non-shuffled) paths of qdq_N.cuh, which
# read the stored words: exb(q, shift) for codes inside a word and
# exb(q_hi, q_lo, shift) (funnel shift) for codes straddling two words.
KNOWN_WORDS = {
    # qdq_2: code i at bits 2i of one word. Codes 3, 1, 2 at rows 0, 2, 15.
    2: ({0: 3, 2: 1, 15: 2}, [0x80000013, 0]),
    # qdq_3: rows 0-9 in word 0; row 10 = bits 30-31 of word 0 + bit 0 of word 1;
    # row 21 = bit 31 of word 1 + bits 0-1 of word 2; row 31 at bits 29-31 of word 2.
    3: ({10: 0b101, 21: 0b110, 31: 7}, [0x40000000, 0x00000001, 0xE0000003]),
    # qdq_4: code i at bits 4i.
    4: ({0: 1, 1: 2, 2: 3, 3: 4, 4: 5, 5: 6, 6: 7, 7: 8}, [0x87654321, 0, 0, 0]),
    # qdq_5: row 6 = bits 30-31 of word 0 + bits 0-2 of word 1; row 12 = bits 28-31
    # of word 1 + bit 0 of word 2; row 31 at bits 27-31 of word 4.
    5: ({6: 0b10110, 12: 0b11111, 31: 1}, [0x80000000, 0xF0000005, 0x00000001, 0, 0x08000000]),
    # qdq_6: 16 codes per 3 words; row 5 = bits 30-31 of word 0 + bits 0-3 of word 1;
    # row 10 = bits 28-31 of word 1 + bits 0-1 of word 2; row 15 at bits 26-31 of word 2.
    6: ({5: 0b111001, 10: 0b111111, 15: 1}, [0x40000000, 0xF000000E, 0x04000003, 0, 0, 0]),
    # qdq_8: code i at bits 8i, four per word.
    8: ({0: 0x12, 1: 0x34, 2: 0x56, 3: 0x78, 4: 0x9A, 5: 0xBC, 6: 0xDE, 7: 0xF0}, [0x78563412, 0xF0DEBC9A, 0, 0, 0, 0, 0, 0]),
}


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_known_words_for_a_tiny_matrix(bits):
    values, expected = KNOWN_WORDS[bits]
    codes = torch.zeros(32, 2, dtype=torch.uint8)
    for row, code in values.items():
        codes[row, 0] = code
    words = pack_codes(codes, bits)
    assert [w[0] for w in u32(words)] == expected
    assert all(w[1] == 0 for w in u32(words))
    assert torch.equal(unpack_codes(words, bits, 32), codes)


def test_q_scale_packs_eight_columns_per_word_low_nibble_first():
    # pack_rows_4_kernel (pack_tensor.cu) and MatrixView_q4_row::item (matrix_view.cuh):
    # column 8j + i at bits 4i of word j.
    codes = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 15, 14, 13, 12, 11, 10, 9, 8]], dtype=torch.uint8)
    packed = pack_q_scale(codes)
    assert packed.dtype == torch.int32
    assert u32(packed) == [[0x76543210, 0x89ABCDEF]]
    assert torch.equal(unpack_q_scale(packed), codes)


def test_scale_decoding_is_square_root_spaced_fraction_of_the_maximum():
    q_scale_max = torch.tensor([2.0], dtype=torch.float16)
    codes = torch.tensor([[15, 7, 0]], dtype=torch.uint8)
    scales = decode_scales(codes, q_scale_max)
    assert scales.dtype == torch.float16
    # (q + 1)^2 * max / 256
    assert scales.tolist() == [[2.0, 0.5, 2.0 / 256]]


def test_mixed_widths_in_one_matrix_round_trip_and_group_table():
    layout = [(8, 32), (6, 32), (6, 32), (5, 64), (4, 128), (3, 64), (3, 64), (2, 64), (2, 16), (2, 40)]
    rows = sum(r for _, r in layout)
    codes = torch.cat([random_codes(r, 96, b, seed=i) for i, (b, r) in enumerate(layout)])
    q_weight, q_groups = pack_q_weight(codes, layout)
    assert q_groups.dtype == torch.int16
    # q_groups = (bits, first packed row) per group, packed rows = rows * bits / 32.
    expected_table, start = [], 0
    for bits, r in layout:
        expected_table += [bits, start]
        start += -(-r * bits // 32)
    assert q_groups.tolist() == expected_table
    assert q_weight.shape == (start, 96)
    assert group_rows(q_groups, q_weight.shape[0], rows) == layout
    assert torch.equal(unpack_q_weight(q_weight, q_groups, rows), codes)


def test_a_group_that_ends_mid_word_is_only_allowed_last():
    with pytest.raises(ValueError):
        pack_q_weight(torch.zeros(48, 32, dtype=torch.uint8), [(3, 16), (2, 32)])


def random_layer(layout, out_features, seed=0, max_scale=(1e-3, 0.05)):
    g = torch.Generator().manual_seed(seed)
    in_features = sum(r for _, r in layout)
    codes = torch.cat([torch.randint(0, 1 << b, (r, out_features), generator=g) for b, r in layout]).to(torch.uint8)
    scale_codes = torch.randint(0, 16, (len(layout), out_features), generator=g).to(torch.uint8)
    low, high = max_scale
    scale_max = (torch.rand(len(layout), generator=g) * (high - low) + low).to(torch.float16)
    perm = torch.randperm(in_features, generator=g)
    tensors = pack_exl2(codes, scale_codes, scale_max, layout, torch.argsort(perm))
    return tensors, codes, scale_codes, scale_max, perm


@pytest.mark.parametrize(
    "layout, out_features",
    [
        ([(4, 128)] * 4 + [(4, 64)], 576),
        ([(8, 32), (6, 32), (5, 64), (4, 128), (3, 128), (2, 64), (2, 64)], 1536),
        ([(6, 32), (3, 64), (3, 64), (2, 64), (2, 32)], 40),
    ],
)
def test_dequantize_equals_float64_reference(layout, out_features):
    # Maxima above 256 * 2^-14 keep max / 256 a normal fp16 number; below it the
    # loader's fp16 prescale goes subnormal and loses bits (covered by the next test).
    tensors, codes, scale_codes, scale_max, perm = random_layer(layout, out_features, max_scale=(0.02, 0.1))
    weight = dequantize_exl2(tensors, out_features)
    in_features = codes.shape[0]
    assert weight.shape == (in_features, out_features) and weight.dtype == torch.float16

    act_ordered = torch.empty(in_features, out_features, dtype=torch.float64)
    row = 0
    for g, (bits, rows) in enumerate(layout):
        scale = (scale_codes[g].double() + 1) ** 2 * scale_max[g].double() / 256
        act_ordered[row : row + rows] = (codes[row : row + rows].double() - 2 ** (bits - 1)) * scale
        row += rows
    # Row k of the act-ordered matrix is input perm[k] of the layer.
    expected = torch.empty_like(act_ordered)
    expected[perm] = act_ordered
    # Two fp16 roundings (the scale, then the product): relative error within 2 * 2^-11.
    assert torch.allclose(weight.double(), expected, rtol=2 * 2**-11, atol=1e-7)
    assert torch.equal(tensors["q_invperm"], torch.argsort(perm).to(torch.int32))


def test_dequantize_rounds_like_fp16_gpu_arithmetic():
    # The loader takes q_scale_max * (1/256) in fp16 (ext.py make_q_matrix), the kernel
    # multiplies (q_scale + 1)^2 by it in fp16 (dq_scale) and then (q - 2^(bits-1)) by
    # that scale in fp16. torch's CPU fp16 multiply rounds the same way.
    layout = [(4, 32), (3, 64)]
    # Small maxima on purpose: max / 256 is subnormal in fp16, where rounding bites.
    tensors, codes, scale_codes, scale_max, perm = random_layer(layout, 64, seed=3, max_scale=(1e-4, 4e-3))
    weight = dequantize_exl2(tensors)
    max_over_256 = scale_max * torch.tensor(1 / 256, dtype=torch.float16)
    scales = ((scale_codes.to(torch.int32) + 1) ** 2).to(torch.float16) * max_over_256.unsqueeze(1)
    act_ordered = torch.cat(
        [
            (codes[r0 : r0 + rows].to(torch.int32) - 2 ** (bits - 1)).to(torch.float16) * scales[g]
            for g, ((bits, rows), r0) in enumerate(zip(layout, [0, 32]))
        ]
    )
    expected = torch.empty_like(act_ordered)
    expected[perm] = act_ordered
    assert torch.equal(weight, expected)


def test_padded_columns_are_mid_codes_with_scale_code_15_and_dequantize_to_zero():
    layout = [(4, 64), (2, 64)]
    tensors, codes, *_ = random_layer(layout, 40, seed=1)
    assert tensors["q_weight"].shape == (64 * 4 // 32 + 64 * 2 // 32, 64)
    assert tensors["q_scale"].shape == (2, 8)
    padded_codes = unpack_q_weight(tensors["q_weight"], tensors["q_groups"], 128)
    assert torch.all(padded_codes[:64, 40:] == 8) and torch.all(padded_codes[64:, 40:] == 2)
    assert torch.all(unpack_q_scale(tensors["q_scale"])[:, 40:] == 15)
    full = dequantize_exl2(tensors)
    assert full.shape == (128, 64)
    assert torch.all(full[:, 40:] == 0)
    assert torch.equal(full[:, :40], dequantize_exl2(tensors, 40))


def test_stored_bits_counts_every_tensor_as_stored():
    layout = [(6, 32), (3, 64), (2, 32)]
    tensors, *_ = random_layer(layout, 40)
    q_weight_rows = 32 * 6 // 32 + 64 * 3 // 32 + 32 * 2 // 32
    expected = q_weight_rows * 64 * 32 + 3 * 8 * 32 + 3 * 16 + 6 * 16 + 128 * 32
    assert stored_bits(tensors) == expected
