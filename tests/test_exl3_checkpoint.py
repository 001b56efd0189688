"""EXL3 model folders as ExLlamaV3 1.6 writes them, built here from random trellis codes and
scales with a writer written from ../shared/EXL3.md (tests/exl3_spec.py), then loaded and
checked against transformers on the float64 decode of the same codes; and every bad folder
refused with a sentence that names what is wrong.

CUDA tests (marked) check the GPU path (the dense fallback until EXL3 has kernels) against the
CPU reference, and the CUDA-graph decode on an EXL3 model.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from core.config import UnsupportedModelError
from core.formats.exl3.linear import EXL3Linear
from core.loader import load_model
from core.weights import WeightsError
from tests.exl3_spec import exl3_quantization_config, marker, write_exl3_checkpoint
from tests.tiny_models import build_hf_model


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours.double() - reference.double()).norm() / reference.double().norm())


@pytest.mark.parametrize("variant,head", [("llama-gqa", "exl3"), ("llama-bias", "fp16"), ("qwen2-bias", "exl3"),
                                          ("mistral-sliding", "exl3")])
def test_logits_match_transformers_on_the_float64_decode(tmp_path, variant, head):
    reference = build_hf_model(variant, seed=2)
    write_exl3_checkpoint(tmp_path, reference, head=head)
    model = load_model(tmp_path)
    quantized = 7 * model.config.num_layers + (head == "exl3")
    assert sum(isinstance(m, EXL3Linear) for m in model.modules()) == quantized
    ids = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(ids).logits
        ours = model(ids)
    # Our weights are the float64 decode rounded once to fp16 (reference.dequantize_exl3).
    assert relative_error(ours, expected) < 2e-3


@pytest.fixture(scope="module")
def exl3_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("exl3")
    write_exl3_checkpoint(folder, build_hf_model("llama-gqa"))
    return folder


def _copy(source, target, edit_tensors=None, **quantization):
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    if quantization:
        config = json.loads((target / "config.json").read_text())
        config["quantization_config"].update(quantization)
        (target / "config.json").write_text(json.dumps(config))
    if edit_tensors:
        tensors = load_file(str(target / "model.safetensors"))
        edit_tensors(tensors)
        save_file(tensors, str(target / "model.safetensors"))
    return target


UP = "model.layers.0.mlp.up_proj"
Q = "model.layers.1.self_attn.q_proj"
Q0 = "model.layers.0.self_attn.q_proj"  # 4 bits, MUL1 (tests/exl3_spec.py LAYER_KINDS)


@pytest.mark.parametrize("version", ["2.0.0", "0.9", "v1"])
def test_a_format_version_other_than_1_is_refused(exl3_folder, tmp_path, version):
    _copy(exl3_folder, tmp_path, version=version)
    with pytest.raises(UnsupportedModelError, match=rf"EXL3 format version '{version}' is not supported; "
                                                    r"quantlab reads EXL3 version 1.x"):
        load_model(tmp_path)


def test_an_unknown_codebook_in_the_config_is_refused(exl3_folder, tmp_path):
    _copy(exl3_folder, tmp_path, codebook="e8p")
    with pytest.raises(UnsupportedModelError, match="EXL3 codebook 'e8p' is not supported; quantlab reads 3inst, mcg, mul1"):
        load_model(tmp_path)


def test_an_unknown_codebook_marker_is_refused(exl3_folder, tmp_path):
    def edit(tensors):
        tensors[f"{Q0}.mul1"] = torch.tensor(12345, dtype=torch.int32)
    _copy(exl3_folder, tmp_path, edit)
    with pytest.raises(WeightsError, match=rf"{Q0}.mul1 names an unknown codebook \(marker 0x00003039\)"):
        load_model(tmp_path)


def test_a_trellis_width_that_is_no_bit_width_is_refused(exl3_folder, tmp_path):
    def edit(tensors):
        tensors[f"{UP}.trellis"] = tensors[f"{UP}.trellis"][..., :20].contiguous()
    _copy(exl3_folder, tmp_path, edit)
    with pytest.raises(WeightsError, match=rf"{UP}.trellis has 20 words per tile, which is not 16\*K"):
        load_model(tmp_path)


@pytest.mark.parametrize("missing", ["trellis", "suh", "svh"])
def test_a_missing_tensor_is_named(exl3_folder, tmp_path, missing):
    def edit(tensors):
        del tensors[f"{Q}.{missing}"]
    _copy(exl3_folder, tmp_path, edit)
    with pytest.raises(WeightsError, match=rf"lacks 1 tensors, e.g. {Q}.{missing}"):
        load_model(tmp_path)


def test_scales_that_disagree_with_the_trellis_are_refused(exl3_folder, tmp_path):
    def edit(tensors):
        tensors[f"{Q}.suh"] = torch.ones(256, dtype=torch.float16)
    _copy(exl3_folder, tmp_path, edit)
    with pytest.raises(WeightsError, match=rf"{Q}.suh has shape \(256,\), but {Q}.trellis \(8, 8, \d+\) holds a "
                                           r"128x128 weight, so it needs \(128,\)"):
        load_model(tmp_path)


def test_a_trellis_for_another_shape_is_refused(exl3_folder, tmp_path):
    def edit(tensors):
        for name in ("trellis", "svh"):
            tensors[f"{Q}.{name}"] = torch.cat([tensors[f"{Q}.{name}"]] * 2, dim=1 if name == "trellis" else 0)
    _copy(exl3_folder, tmp_path, edit)
    with pytest.raises(WeightsError, match=rf"{Q}.trellis holds a 128x256 weight, but the model's layer has 64 inputs "
                                           r"and 64 outputs, stored padded as 128x128"):
        load_model(tmp_path)


def test_a_half_rate_needs_the_mul1_codebook(exl3_folder, tmp_path):
    half = "model.layers.0.self_attn.k_proj"  # 2.5 bits, MUL1 (tests/exl3_spec.py LAYER_KINDS)

    def edit(tensors):
        del tensors[f"{half}.mul1"]
        tensors[f"{half}.mcg"] = marker("mcg")
    _copy(exl3_folder, tmp_path, edit)
    with pytest.raises(WeightsError, match=rf"{half}.trellis is 2.5 bits per weight with the MCG codebook"):
        load_model(tmp_path)


def test_exl3_tensors_without_an_exl3_config_are_refused(exl3_folder, tmp_path):
    _copy(exl3_folder, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["quantization_config"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match="looks like an EXL3 layer, but config.json's quantization_config"):
        load_model(tmp_path)


def test_quantization_config_defaults_are_exllamav3s():
    config = exl3_quantization_config()
    assert config["quant_method"] == "exl3" and config["codebook"] == "mul1" and config["version"].startswith("1.")


# ---------------------------------------------------------------- CUDA


@pytest.mark.cuda
def test_gpu_fallback_equals_the_cpu_reference(exl3_folder):
    cpu = load_model(exl3_folder)
    gpu = load_model(exl3_folder, device="cuda", dtype=torch.float16)
    for name, module in gpu.named_modules():
        if isinstance(module, EXL3Linear):
            # The GPU decode (torch ops on the device) gives the same fp16 weight bit for bit.
            assert torch.equal(module.dequantized().cpu(), cpu.get_submodule(name).dequantized())
    ids = torch.randint(0, 320, (1, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = cpu(ids)
        ours = gpu(ids.cuda()).float().cpu()
    assert relative_error(ours, expected) < 1e-2


@pytest.mark.cuda
def test_graph_decode_runs_an_exl3_model(exl3_folder):
    from core.cache import KVCache
    from core.graph_decode import GraphDecoder

    model = load_model(exl3_folder, device="cuda", dtype=torch.float16)
    ids = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(4)).cuda()
    with torch.no_grad():
        cache = KVCache(model.config, 64, device="cuda", dtype=torch.float16)
        expected = model(ids, cache)[0, -1].float()
    graph_cache = KVCache(model.config, 64, device="cuda", dtype=torch.float16)
    decoder = GraphDecoder(model, graph_cache)
    with torch.no_grad():
        model(ids[:, :-1], graph_cache)
    logits = decoder.step(int(ids[0, -1]), ids.shape[1] - 1)
    assert relative_error(logits.cpu(), expected.cpu()) < 1e-2
