"""The step the decode graphs capture is the model's own forward, run on the CPU with plain launches.

GraphDecoder(capture=False) runs CausalLM.decode_step with the torch twins of the fused kernels:
the same layers, masks and cache writes a captured graph replays on the GPU, so the token after
token logits must be the ones CausalLM.forward gives. (The slot-order inputs and handoffs need the
EXL2 kernels: tests/test_graph_decode.py checks them on the device.)
"""

import pytest
import torch

from core.cache import KVCache
from core.graph_decode import GraphDecoder
from core.loader import load_model
from tests.tiny_models import VARIANTS, save_hf_model


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours.double() - reference.double()).norm() / reference.double().norm())


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def model(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    save_hf_model(request.param, folder)
    return load_model(folder)


@pytest.mark.parametrize("attention", ["rope then sdpa", "decode attention twin"])
def test_one_row_steps_give_the_logits_of_the_forward_pass(model, attention):
    # Past mistral-sliding's window of 8, so the step's mask must hide the keys the window drops.
    ids = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(5))
    plain, stepped = KVCache(model.config, 64), KVCache(model.config, 64)
    decoder = GraphDecoder(model, stepped, capture=False)
    assert not decoder.attention_kernel and decoder.slots is None  # no kernels here: the torch twins
    # The attention kernel's twin (kernels/reference.py) takes the kernel's place and arguments.
    decoder.attention_kernel = attention == "decode attention twin"
    with torch.inference_mode():
        expected = model(ids, plain, 0)[0, -1]
        model(ids, stepped, 0)
        for position in range(12, 26):
            token = int(expected.argmax())
            expected = model(torch.tensor([[token]]), plain, position)[0, -1]
            ours = decoder.step(token, position)
            assert relative_error(ours, expected) < 1e-5, (position, relative_error(ours, expected))
    assert stepped.length == plain.length == 26
    for mine, theirs in zip(stepped.keys + stepped.values, plain.keys + plain.values):
        assert relative_error(mine[:, :, :26], theirs[:, :, :26]) < 1e-6


def test_left_padded_rows_step_as_the_forward_pass_steps_them(model):
    lengths = [14, 9, 3]
    longest, total = max(lengths), 40
    ids = torch.zeros(len(lengths), longest, dtype=torch.long)
    key_mask = torch.zeros(len(lengths), total, dtype=torch.bool)
    for row, length in enumerate(lengths):
        ids[row, longest - length:] = torch.randint(3, 320, (length,), generator=torch.Generator().manual_seed(row))
        key_mask[row, longest - length:] = True
    plain = KVCache(model.config, total, batch_size=len(lengths))
    stepped = KVCache(model.config, total, batch_size=len(lengths))
    decoder = GraphDecoder(model, stepped, capture=False)
    decoder.set_key_mask(key_mask)
    with torch.inference_mode():
        expected = model(ids, plain, 0, last_only=True, key_mask=key_mask[:, :longest])[:, -1]
        model(ids, stepped, 0, last_only=True, key_mask=key_mask[:, :longest])
        for position in range(longest, longest + 12):
            tokens = expected.argmax(-1)
            expected = model(tokens[:, None], plain, position, key_mask=key_mask[:, : position + 1])[:, -1]
            ours = decoder.step_rows(tokens, position)
            for row in range(len(lengths)):
                assert relative_error(ours[row], expected[row]) < 1e-5, (position, row)

