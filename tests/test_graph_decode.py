"""A left-padded batch decoded by graph replay against the model's own eager decode (device machine only).

Calibration sampling decodes 64 rows or more in lockstep through these graphs,
so each row's padding must stay hidden and each row's logits must be the ones
the plain forward gives it. Also: a step captured under the torch reference path.
"""

import pytest
import torch

from bench.exl2_random import llama_config, random_model
from core.cache import KVCache

pytestmark = pytest.mark.cuda


def assert_every_piece_handed_over(decoder) -> None:
    handoffs = decoder.handoffs
    assert handoffs is not None and handoffs.head_norm is not None
    assert handoffs.attention_norms[0] is None and all(handoffs.attention_norms[1:])
    assert all(handoffs.mlp_norms) and all(handoffs.swiglus)


@pytest.mark.parametrize("bpw", [None, 4.0])
def test_batched_graph_decode_matches_plain_decode_with_left_padding(bpw):
    from core.graph_decode import BUCKET, GraphDecoder

    model = random_model(llama_config("small", layers=2), bpw, "cuda", torch.float16, seed=11)
    vocab, longest = model.config.vocab_size, BUCKET - 3
    lengths = [longest, longest - 40, 5]  # rows padded by 0, 40 and most of the bucket
    total = 2 * BUCKET
    ids = torch.zeros(len(lengths), longest, dtype=torch.long, device="cuda")
    key_mask = torch.zeros(len(lengths), total, dtype=torch.bool, device="cuda")
    for row, length in enumerate(lengths):
        ids[row, longest - length :] = torch.randint(0, vocab, (length,), device="cuda")
        key_mask[row, longest - length :] = True
    plain_cache = KVCache(model.config, total, batch_size=len(lengths), device="cuda", dtype=torch.float16)
    graph_cache = KVCache(model.config, total, batch_size=len(lengths), device="cuda", dtype=torch.float16)
    decoder = GraphDecoder(model, graph_cache)
    decoder.set_key_mask(key_mask)
    if bpw:  # every norm and SwiGLU handed from product to product, o_proj's input gathered by torch
        assert_every_piece_handed_over(decoder)
    with torch.inference_mode():
        expected = model(ids, plain_cache, 0, last_only=True, key_mask=key_mask[:, :longest])[:, -1]
        model(ids, graph_cache, 0, last_only=True, key_mask=key_mask[:, :longest])
        for position in range(longest, BUCKET + 5):  # crosses into the second bucket's graph
            tokens = expected.argmax(-1)
            expected = model(tokens[:, None], plain_cache, position, key_mask=key_mask[:, : position + 1])[:, -1]
            ours = decoder.step_rows(tokens, position)
            assert not ours.isnan().any()
            for row in range(len(lengths)):
                error = (ours[row] - expected[row]).norm() / expected[row].norm()
                assert float(error) < 5e-3, (position, row, float(error))
    assert sorted(decoder.graphs) == [BUCKET, 2 * BUCKET]


def test_single_row_step_refuses_a_batch():
    from core.graph_decode import GraphDecoder

    model = random_model(llama_config("small", layers=1), None, "cuda", torch.float16, seed=12)
    decoder = GraphDecoder(model, KVCache(model.config, 64, batch_size=2, device="cuda", dtype=torch.float16))
    with pytest.raises(ValueError, match="step_rows"):
        decoder.step(3, 0)


def test_a_step_captured_under_the_reference_path_reads_plain_rows():
    # The decoder plans slot-order inputs for its EXL2 products when it is made; a graph captured
    # later inside dispatch.reference_only runs the layers' own forward, which reads plain rows.
    from core.graph_decode import GraphDecoder
    from core.kernels import dispatch

    model = random_model(llama_config("small", layers=2), 4.0, "cuda", torch.float16, seed=13)
    decoder = GraphDecoder(model, KVCache(model.config, 64, device="cuda", dtype=torch.float16))
    assert decoder.slots is not None and decoder.o_slots is not None
    with dispatch.reference_only(), torch.inference_mode():
        ours = decoder.step(5, 0)
        expected = model(torch.tensor([[5]], device="cuda"), KVCache(model.config, 64, device="cuda",
                                                                     dtype=torch.float16), 0)[0, -1]
    assert float((ours - expected).norm() / expected.norm()) < 5e-3


def test_one_masked_row_reads_attention_from_sdpa_not_the_slot_buffer():
    # A batch-1 decoder plans o_proj's inputs in slot order, written by the attention kernel. A key
    # mask then hands attention to SDPA, which writes plain rows: o_proj must read those, not the
    # slot-order buffer that nothing writes any more.
    from core.graph_decode import GraphDecoder

    model = random_model(llama_config("small", layers=2), 4.0, "cuda", torch.float16, seed=14)
    padding, longest, total = 9, 24, 64
    ids = torch.zeros(1, longest, dtype=torch.long, device="cuda")
    ids[0, padding:] = torch.randint(0, model.config.vocab_size, (longest - padding,), device="cuda")
    key_mask = torch.zeros(1, total, dtype=torch.bool, device="cuda")
    key_mask[0, padding:] = True
    plain_cache = KVCache(model.config, total, device="cuda", dtype=torch.float16)
    graph_cache = KVCache(model.config, total, device="cuda", dtype=torch.float16)
    decoder = GraphDecoder(model, graph_cache)
    assert decoder.attention_kernel and decoder.o_slots is not None
    decoder.set_key_mask(key_mask)
    assert not decoder.attention_kernel
    with torch.inference_mode():
        expected = model(ids, plain_cache, 0, last_only=True, key_mask=key_mask[:, :longest])[0, -1]
        model(ids, graph_cache, 0, last_only=True, key_mask=key_mask[:, :longest])
        for position in range(longest, longest + 6):
            token = int(expected.argmax())
            expected = model(torch.tensor([[token]], device="cuda"), plain_cache, position,
                             key_mask=key_mask[:, : position + 1])[0, -1]
            ours = decoder.step(token, position)
            error = (ours - expected).norm() / expected.norm()
            assert float(error) < 5e-3, (position, float(error))
