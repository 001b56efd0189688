"""Layers that read one input (q, k, v; gate, up) run as one product: core.linear.project.

Dense weights placed back to back by share_input_weights (the graph decoder does it on the
GPU) must give the logits the separate layers gave; the quantized one-launch kernels are
checked against the layers one by one in tests/test_kernels.py (device machine)."""

import pytest
import torch

from core.linear import _shared_weight, project, share_input_weights
from core.loader import load_model
from tests.tiny_models import save_hf_model


@pytest.mark.parametrize("variant", ["llama-gqa", "llama-bias", "qwen2-bias"])
def test_shared_input_weights_keep_the_logits(variant, tmp_path):
    save_hf_model(variant, tmp_path)
    model = load_model(tmp_path)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.inference_mode():
        before = model(ids)
        share_input_weights(model)
        after = model(ids)
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for group in ((attn.q_proj, attn.k_proj, attn.v_proj), (mlp.gate_proj, mlp.up_proj)):
            shared = _shared_weight(group)
            assert shared is not None, "the group's weights are not one tensor"
            weight, bias = shared
            assert weight.shape == (sum(l.out_features for l in group), group[0].in_features)
            assert (bias is None) == (group[0].bias is None)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_project_gives_each_layer_its_own_output(tmp_path):
    save_hf_model("llama-bias", tmp_path)
    model = load_model(tmp_path)
    attn = model.model.layers[0].self_attn
    x = torch.randn(3, 5, attn.q_proj.in_features)
    alone = [layer(x) for layer in (attn.q_proj, attn.k_proj, attn.v_proj)]
    share_input_weights(model)
    together = project(x, (attn.q_proj, attn.k_proj, attn.v_proj))
    for out, expected in zip(together, alone):
        assert out.shape == expected.shape
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
