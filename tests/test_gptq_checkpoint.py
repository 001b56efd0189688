"""GPTQ 4-bit checkpoints in the AutoGPTQ / GPTQModel layout: built here from known
codes, scales and zeros with a packer written from the format's description
(not core.formats.gptq's), then loaded and checked against a float64
dequantization and against transformers on the dequantized weights.

CUDA tests (marked) compare the kernels with the float32 product on the exact
weights, on fresh random layers and inputs, outputs poisoned first.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from core.config import UnsupportedModelError
from core.formats.gptq.layout import sort_rows_by_group, unpack_zeros
from core.formats.gptq import reference as gptq_reference
from core.formats.gptq.linear import GPTQLinear
from core.formats.gptq.reference import dequantize_gptq
from core.loader import load_model
from core.weights import WeightsError
from tests.greedy_check import assert_same_greedy_choices
from tests.tiny_models import build_hf_model, sample_text, save_tiny_tokenizer

# ---------------------------------------------------------------- a GPTQ writer from the spec


def quantize(weight: torch.Tensor, group_size: int, sym: bool, act_order: bool, v1: bool, seed: int) -> dict:
    """Round-to-nearest 4-bit GPTQ of an nn.Linear weight [out, in]: codes [in, out],
    zeros and fp16 scales [groups, out], g_idx [in] (shuffled with act-order)."""
    weight = weight.double().t()
    in_features, out_features = weight.shape
    size = in_features if group_size == -1 else group_size
    groups = math.ceil(in_features / size)
    g_idx = torch.arange(in_features) // size
    if act_order:
        order = torch.randperm(in_features, generator=torch.Generator().manual_seed(seed))
        g_idx = torch.empty_like(g_idx).index_copy_(0, order, g_idx)
    scales = torch.empty(groups, out_features, dtype=torch.float64)
    zeros = torch.empty(groups, out_features, dtype=torch.int64)
    for g in range(groups):
        rows = weight[g_idx == g]
        low, high = rows.min(0).values.clamp(max=0), rows.max(0).values.clamp(min=0)
        if sym:
            scales[g] = torch.maximum(-low, high) * 2 / 15
            zeros[g] = 8
        else:
            scales[g] = (high - low) / 15
            # v1 stores zero - 1, so it cannot hold a zero of 0.
            zeros[g] = torch.round(-low / scales[g]).clamp(1 if v1 else 0, 15)
    scales = scales.clamp(min=1e-4).half()
    codes = torch.round(weight / scales.double()[g_idx] + zeros[g_idx]).clamp(0, 15).to(torch.int64)
    return {"codes": codes, "zeros": zeros, "scales": scales, "g_idx": g_idx.to(torch.int32)}


def exact_weight(q: dict) -> torch.Tensor:
    """float64 [in, out]: scale * (code - zero) straight from the codes."""
    g = q["g_idx"].long()
    return q["scales"].double()[g] * (q["codes"] - q["zeros"][g]).double()


def pack_along_rows(values: np.ndarray) -> np.ndarray:
    """[8r, c] nibbles -> uint32 [r, c]: value 8i + j at bits 4j of word i (AutoGPTQ's qweight)."""
    words = np.zeros((values.shape[0] // 8, values.shape[1]), dtype=np.uint32)
    for j in range(8):
        words |= (values[j::8].astype(np.uint32) & 0xF) << np.uint32(4 * j)
    return words


def pack_layer(q: dict, v1: bool) -> dict[str, torch.Tensor]:
    stored_zeros = q["zeros"].numpy() - (1 if v1 else 0)
    qweight = pack_along_rows(q["codes"].numpy())
    qzeros = pack_along_rows(stored_zeros.T).T  # qzeros packs along the output columns
    return {"qweight": torch.from_numpy(qweight.view(np.int32).copy()),
            "qzeros": torch.from_numpy(np.ascontiguousarray(qzeros).view(np.int32).copy()),
            "scales": q["scales"], "g_idx": q["g_idx"]}


def quantization_config(group_size, sym, act_order, checkpoint_format, bits=4) -> dict:
    return {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": act_order, "sym": sym,
            "checkpoint_format": checkpoint_format, "damp_percent": 0.01, "true_sequential": True}


def write_gptq_checkpoint(folder, hf_model, group_size=128, sym=True, act_order=False, checkpoint_format="gptq",
                          with_g_idx=True, seed=0):
    """Quantize every decoder linear of hf_model (in place, to the dequantized weights)
    and write the model as a GPTQ checkpoint folder; returns {layer: quantized}."""
    v1 = checkpoint_format == "gptq"
    state = {name: tensor.clone().contiguous() for name, tensor in hf_model.state_dict().items()}
    if hf_model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    layers = {}
    with torch.no_grad():
        for index, (name, module) in enumerate(hf_model.named_modules()):
            if not isinstance(module, torch.nn.Linear) or name == "lm_head":
                continue
            q = quantize(module.weight, group_size, sym, act_order, v1, seed + index)
            module.weight.copy_(exact_weight(q).t())
            layers[name] = q
            del state[f"{name}.weight"]
            for tensor_name, tensor in pack_layer(q, v1).items():
                if tensor_name != "g_idx" or with_g_idx:
                    state[f"{name}.{tensor_name}"] = tensor
    hf_model.config.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = quantization_config(group_size, sym, act_order, checkpoint_format)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(state, str(folder / "model.safetensors"))
    return layers


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours.double() - reference.double()).norm() / reference.double().norm())


# ---------------------------------------------------------------- CPU: dequantization and logits

SETTINGS = [(fmt, sym, act, group) for fmt in ("gptq", "gptq_v2") for sym in (True, False) for act in (False, True)
            for group in (32, 128, -1)]


@pytest.mark.parametrize("checkpoint_format,sym,act_order,group_size", SETTINGS)
def test_dequantized_weight_equals_float64_reference(checkpoint_format, sym, act_order, group_size):
    in_features, out_features = 288, 40  # 288 = 2 groups of 128 and a last one of 32
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(7))
    q = quantize(weight, group_size, sym, act_order, checkpoint_format == "gptq", seed=3)
    packed = pack_layer(q, checkpoint_format == "gptq")
    layer = GPTQLinear(in_features, out_features, False, zero_offset=1 if checkpoint_format == "gptq" else 0)
    layer.qweight, layer.qzeros, layer.scales, layer.g_idx = (packed[n] for n in ("qweight", "qzeros", "scales", "g_idx"))
    layer.prepare(group_size)
    # One group over all inputs has nothing to sort, act-order or not.
    assert (layer.perm is not None) == (act_order and group_size != -1)
    # (code - zero) * fp16 scale is exact in float32, so nothing may differ at all.
    assert torch.equal(layer.dense_weight().double(), exact_weight(q).t())


def test_act_order_rows_are_sorted_by_group_and_permute_back():
    q = quantize(torch.randn(24, 256), 32, False, True, False, seed=1)
    packed = pack_layer(q, v1=False)
    qweight, g_idx, perm = sort_rows_by_group(packed["qweight"], packed["g_idx"])
    assert bool((g_idx[1:] >= g_idx[:-1]).all())
    assert torch.equal(g_idx, q["g_idx"][perm.long()])
    weight = dequantize_gptq(qweight, packed["qzeros"], packed["scales"], g_idx, 0, perm)
    assert torch.equal(weight.double(), exact_weight(q))


def test_v1_zero_nibble_f_reads_as_sixteen_v2_as_fifteen():
    # AutoGPTQ's readers add one to each nibble; a v1 writer's "-1" (zero 0) cannot round-trip.
    qzeros = torch.tensor([[-1]], dtype=torch.int32)
    assert unpack_zeros(qzeros, 1).tolist() == [[16] * 8]
    assert unpack_zeros(qzeros, 0).tolist() == [[15] * 8]


MODEL_CASES = [
    ("llama-gqa", 128, True, False, "gptq"),
    ("llama-gqa", 32, False, True, "gptq_v2"),
    ("llama-bias", -1, False, True, "gptq"),
    ("qwen2-bias", 32, True, True, "gptq_v2"),
    ("mistral-sliding", 128, False, False, "gptq_v2"),
]


@pytest.mark.parametrize("variant,group_size,sym,act_order,checkpoint_format", MODEL_CASES)
def test_logits_match_transformers_on_the_dequantized_weights(tmp_path, variant, group_size, sym, act_order,
                                                              checkpoint_format):
    reference = build_hf_model(variant, seed=2)
    write_gptq_checkpoint(tmp_path, reference, group_size, sym, act_order, checkpoint_format)
    model = load_model(tmp_path)
    assert sum(isinstance(m, GPTQLinear) for m in model.modules()) == 7 * model.config.num_layers
    ids = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(ids).logits
        ours = model(ids)
    assert relative_error(ours, expected) < 1e-4


def test_checkpoint_without_g_idx_and_with_quantize_config_json_only(tmp_path):
    # Older AutoGPTQ folders: settings in quantize_config.json, no g_idx without act-order.
    reference = build_hf_model("llama-gqa", seed=4)
    write_gptq_checkpoint(tmp_path, reference, group_size=32, sym=False, with_g_idx=False)
    config = json.loads((tmp_path / "config.json").read_text())
    settings = config.pop("quantization_config")
    del settings["quant_method"], settings["checkpoint_format"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "quantize_config.json").write_text(json.dumps(settings))
    model = load_model(tmp_path)
    ids = torch.randint(0, 320, (1, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert relative_error(model(ids), reference(ids).logits) < 1e-4


def _edit_quantization(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"].update(changes)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def gptq_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gptq")
    write_gptq_checkpoint(folder, build_hf_model("llama-gqa"), group_size=32)
    return folder


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_unsupported_bits_say_which_are_supported(gptq_folder, tmp_path, bits):
    for path in gptq_folder.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    _edit_quantization(tmp_path, bits=bits)
    with pytest.raises(UnsupportedModelError, match=rf"GPTQ with {bits} bits is not supported.* 4 bits only"):
        load_model(tmp_path)


@pytest.mark.parametrize("changes,message", [
    ({"checkpoint_format": "marlin"}, "checkpoint_format 'marlin' is not supported; supported: gptq, gptq_v2"),
    ({"quant_method": "awq"}, "quantization method 'awq' is not supported"),
])
def test_unknown_format_or_method_is_refused_by_name(gptq_folder, tmp_path, changes, message):
    for path in gptq_folder.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    _edit_quantization(tmp_path, **changes)
    with pytest.raises(UnsupportedModelError, match=message):
        load_model(tmp_path)


def test_missing_tensor_is_named(gptq_folder, tmp_path):
    from safetensors.torch import load_file

    for path in gptq_folder.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["model.layers.1.mlp.down_proj.qzeros"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightsError, match=r"lacks 1 tensors, e.g. model.layers.1.mlp.down_proj.qzeros"):
        load_model(tmp_path)


def test_gptq_tensors_without_a_gptq_config_are_refused(gptq_folder, tmp_path):
    for path in gptq_folder.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    del config["quantization_config"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match="looks like a GPTQ layer"):
        load_model(tmp_path)


def test_wrongly_shaped_qweight_is_explained(gptq_folder, tmp_path):
    from safetensors.torch import load_file

    for path in gptq_folder.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    state = load_file(str(tmp_path / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.qweight"
    state[name] = torch.cat([state[name], state[name]])  # what an 8-bit layer's rows would look like
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightsError, match=r"q_proj: qweight has shape \(16, 64\), a 4-bit layer of 64 inputs"):
        load_model(tmp_path)


def test_chat_and_eval_clis_run_a_gptq_folder(tmp_path):
    reference = build_hf_model("llama-gqa", seed=6)
    write_gptq_checkpoint(tmp_path, reference, group_size=32, sym=False, act_order=True, checkpoint_format="gptq")
    save_tiny_tokenizer(tmp_path, reference.config.vocab_size)
    chat = subprocess.run([sys.executable, "-m", "core.chat", "-m", str(tmp_path), "-p", "hello", "--greedy",
                           "--max-new-tokens", "8", "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert chat.returncode == 0, chat.stderr
    assert "tok/s" in chat.stderr.strip().splitlines()[-1]
    text = tmp_path / "text.txt"
    text.write_text(sample_text(60))
    done = subprocess.run([sys.executable, "-m", "core.eval", "-m", str(tmp_path), "--data", str(text), "--ctx", "64",
                           "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    ours = float(done.stdout.strip().splitlines()[-1].split()[1])
    # The same windows through transformers on the dequantized weights.
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tmp_path)(text.read_text(), add_special_tokens=False)["input_ids"]
    windows = torch.tensor(ids[: len(ids) // 64 * 64]).view(-1, 64)
    with torch.no_grad():
        logits = reference(windows).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert ours == pytest.approx(math.exp(float(nll)), rel=1e-3)


@pytest.mark.parametrize("shape", [(4096, 11008), (11008, 4096), (576, 1536), (264, 40)])
@pytest.mark.parametrize("group_size,act_order", [(128, False), (32, True), (-1, False)])
def test_kernel_tables_cover_every_packed_row_once_in_its_group(shape, group_size, act_order):
    # The tables are made on the host, so any machine can check them; the kernel trusts them blindly.
    from bench.gptq4_speed import random_gptq_tensors
    from core.formats.gptq import kernel as gptq4

    tensors = random_gptq_tensors(*shape, group_size, act_order, "cpu", seed=2)
    qweight, g_idx, perm = sort_rows_by_group(tensors["qweight"], tensors["g_idx"])
    plan = gptq4.plan_layer(qweight, tensors["qzeros"], tensors["scales"], g_idx, perm, 1, multiprocessors=132)
    assert plan.word_aligned and plan.permuted == (perm is not None)
    # Staged inputs (8 rows) and, with ASYNC_COPY, the block's weights fit the 48 KiB any GPU gives a block.
    assert 16 * plan.max_slice_rows * (8 + plan.threads) <= 48 * 1024
    segments, covered = plan.segments.tolist(), []
    for first_segment, end_segment, first_row, rows in plan.slices.tolist():
        assert 0 < rows <= plan.max_slice_rows
        in_slice = []
        for group, row, count, _ in segments[first_segment:end_segment]:
            assert bool((g_idx[8 * row: 8 * (row + count)] == group).all())
            in_slice += range(row, row + count)
        assert in_slice == list(range(first_row, first_row + rows))
        covered += in_slice
    assert covered == list(range(shape[0] // 8))


def test_groups_off_packed_rows_are_flagged_for_the_dequant_path():
    from bench.gptq4_speed import random_gptq_tensors
    from core.formats.gptq import kernel as gptq4

    tensors = random_gptq_tensors(576, 576, 128, False, "cpu", seed=3)
    g_idx = (torch.arange(576) // 12 % tensors["scales"].shape[0]).to(torch.int32)  # groups of 12 inputs
    qweight, g_idx, perm = sort_rows_by_group(tensors["qweight"], g_idx)
    plan = gptq4.plan_layer(qweight, tensors["qzeros"], tensors["scales"], g_idx, perm, 1, multiprocessors=132)
    assert not plan.word_aligned


# ---------------------------------------------------------------- CUDA: kernels against float32

# fp16 output of a product whose four-term partial sums are fp16: a few 2^-11 relative.
TOLERANCE = 2e-3
# (in, out): the demo model's widths, Llama-2-7B's MLP, and a short last group.
CUDA_SHAPES = [(576, 576), (576, 1536), (1536, 576), (264, 40)]
_seed = iter(range(10**6))


def cuda_layer(in_features, out_features, group_size, act_order, zero_offset=1):
    from bench.gptq4_speed import random_gptq_tensors, sorted_layer

    tensors = random_gptq_tensors(in_features, out_features, group_size, act_order, "cuda", next(_seed))
    qweight, plan = sorted_layer(tensors, zero_offset)
    exact = dequantize_gptq(tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors["g_idx"], zero_offset)
    return tensors, qweight, plan, exact


def poison(numel: int) -> None:
    torch.full((numel,), float("nan"), dtype=torch.float16, device="cuda")


def kernel_error(out, expected) -> float:
    assert not out.isnan().any(), "an output element was never written"
    return float((out.float() - expected).norm() / expected.norm())


@pytest.fixture
def built():
    from core.kernels.build import kernels

    assert kernels() is not None, "the kernels must build on the device machine"


@pytest.mark.cuda
@pytest.mark.parametrize("zero_offset", [1, 0])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("shape", CUDA_SHAPES)
def test_gptq4_small_batch_matches_float32_reference(built, shape, group_size, act_order, zero_offset):
    from core.formats.gptq import kernel as gptq4

    _, qweight, plan, exact = cuda_layer(*shape, group_size, act_order, zero_offset)
    assert plan.word_aligned and plan.permuted == (act_order and group_size != -1)
    bias = torch.randn(shape[1], device="cuda").half() if zero_offset else None
    for rows in range(1, 17):
        x = torch.randn(rows, shape[0], device="cuda").half()
        poison(rows * shape[1])
        out = gptq4.gemm_small(x, qweight, plan, bias)
        expected = x.float() @ exact + (bias.float() if bias is not None else 0)
        assert out.shape == (rows, shape[1]) and out.dtype == torch.float16
        error = kernel_error(out, expected)
        assert error < TOLERANCE, f"{rows} rows: relative error {error:.2e}"


@pytest.mark.cuda
@pytest.mark.parametrize("async_copy,prefetch", [(False, False), (False, True), (True, False)])
@pytest.mark.parametrize("shape,group_size", [((576, 1536), 128), ((1536, 576), 32), ((4096, 11008), 128)])
def test_gptq4_each_way_of_loading_weights(built, monkeypatch, async_copy, prefetch, shape, group_size):
    from core.formats.gptq import kernel as gptq4

    monkeypatch.setattr(gptq4, "ASYNC_COPY", async_copy)
    monkeypatch.setattr(gptq4, "PREFETCH", prefetch)
    _, qweight, plan, exact = cuda_layer(*shape, group_size, True)
    for rows in (1, 2, 3, 4, 5, 8, 9, 16):
        x = torch.randn(rows, shape[0], device="cuda").half()
        poison(rows * shape[1])
        assert kernel_error(gptq4.gemm_small(x, qweight, plan), x.float() @ exact) < TOLERANCE


@pytest.mark.cuda
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq4_llama_mlp_shapes(built, act_order):
    from core.formats.gptq import kernel as gptq4

    for shape in ((4096, 11008), (11008, 4096)):
        _, qweight, plan, exact = cuda_layer(*shape, 128, act_order)
        for rows in (1, 3, 8, 16):
            x = torch.randn(rows, shape[0], device="cuda").half()
            poison(rows * shape[1])
            assert kernel_error(gptq4.gemm_small(x, qweight, plan), x.float() @ exact) < TOLERANCE


@pytest.mark.cuda
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("shape", CUDA_SHAPES[:2] + [(4096, 11008)])
def test_gptq4_dequant_is_bit_exact(built, shape, act_order):
    from core.formats.gptq import kernel as gptq4

    tensors, qweight, plan, _ = cuda_layer(*shape, 128, act_order)
    poison(shape[0] * shape[1])
    tile = gptq4.dequant(qweight, plan)
    assert not tile.isnan().any()
    assert torch.equal(tile, gptq_reference.dequant(qweight, tensors["qzeros"], tensors["scales"], plan.row_group, 1))


@pytest.mark.cuda
@pytest.mark.parametrize("rows", [17, 300])
def test_gptq4_prefill_product_matches_reference(built, rows):
    from core.formats.gptq import kernel as gptq4

    _, qweight, plan, exact = cuda_layer(1536, 576, 128, True)
    x = torch.randn(2, rows, 1536, device="cuda").half()
    poison(2 * rows * 576)
    out = gptq4.matmul(x, qweight, plan)
    assert out.shape == (2, rows, 576)
    assert kernel_error(out, x.float() @ exact) < TOLERANCE


@pytest.mark.cuda
def test_groups_not_on_packed_rows_take_the_dequant_path(built):
    from core.formats.gptq import kernel as gptq4

    # A g_idx no GPTQ writer produces (groups of 12 inputs) must still compute the right thing.
    tensors, *_ = cuda_layer(576, 576, 128, False)
    tensors["g_idx"] = (torch.arange(576, device="cuda") // 12 % tensors["scales"].shape[0]).to(torch.int32)
    from bench.gptq4_speed import sorted_layer

    qweight, plan = sorted_layer(tensors)
    assert not plan.word_aligned
    exact = dequantize_gptq(tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors["g_idx"], 1)
    x = torch.randn(3, 576, device="cuda").half()
    assert kernel_error(gptq4.matmul(x, qweight, plan), x.float() @ exact) < TOLERANCE


@pytest.mark.cuda
def test_small_batch_leaves_its_scratch_zeroed(built):
    from core.formats.gptq import kernel as gptq4

    _, qweight, plan, _ = cuda_layer(576, 1536, 32, True)
    x = torch.randn(16, 576, device="cuda").half()
    gptq4.gemm_small(x, qweight, plan)
    assert int(gptq4._scratch.buffers[x.device].count_nonzero()) == 0


def _cuda_gptq_model(tmp_path, act_order=True):
    import transformers

    config = transformers.AutoConfig.for_model("llama", vocab_size=512, hidden_size=576, intermediate_size=1536,
                                                num_hidden_layers=3, num_attention_heads=9, num_key_value_heads=3,
                                                max_position_embeddings=512, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    hf_model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in hf_model.named_parameters():
            param.copy_(1.0 + 0.1 * torch.randn_like(param) if "norm" in name else torch.randn_like(param) * 0.05)
    write_gptq_checkpoint(tmp_path, hf_model, 128, sym=False, act_order=act_order, checkpoint_format="gptq")
    return load_model(tmp_path, device="cuda", dtype=torch.float16)


def _greedy(model, prompt, steps):
    from core.cache import KVCache

    cache = KVCache(model.config, 256, device="cuda", dtype=torch.float16)
    tokens, seen = [], []
    with torch.inference_mode():
        logits = model(torch.tensor([prompt], device="cuda"), cache, 0, last_only=True)[0, -1]
        for step in range(steps):
            seen.append(logits.float())
            tokens.append(int(logits.argmax()))
            logits = model(torch.tensor([[tokens[-1]]], device="cuda"), cache, len(prompt) + step)[0, -1]
    return tokens, torch.stack(seen)


@pytest.mark.cuda
def test_greedy_tokens_with_kernels_match_the_reference_path(built, tmp_path):
    from core.kernels import dispatch

    model = _cuda_gptq_model(tmp_path)
    prompt = torch.randint(0, 512, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    ours, our_logits = _greedy(model, prompt, 24)
    assert all(m._dense is None for m in model.modules() if isinstance(m, GPTQLinear)), "kernels keep no dense copy"
    with dispatch.reference_only():
        expected, expected_logits = _greedy(model, prompt, 24)
    assert_same_greedy_choices(ours, our_logits, expected, expected_logits)


@pytest.mark.cuda
def test_graph_decode_runs_gptq_layers(built, tmp_path):
    from core.cache import KVCache
    from core.graph_decode import GraphDecoder

    model = _cuda_gptq_model(tmp_path, act_order=True)
    prompt = torch.randint(0, 512, (1, 30), device="cuda")
    plain, graphed = (KVCache(model.config, 256, device="cuda", dtype=torch.float16) for _ in range(2))
    decoder = GraphDecoder(model, graphed)
    with torch.inference_mode():
        model(prompt, plain, 0)
        model(prompt, graphed, 0)
        token = 7
        for position in range(30, 36):
            expected = model(torch.tensor([[token]], device="cuda"), plain, position)[0, -1]
            ours = decoder.step(token, position)
            assert relative_error(ours, expected) < 5e-3
            token = int(expected.argmax())
