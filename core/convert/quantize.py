"""Quantization pass: GPTQ with the chosen setting, layer by layer.

Each layer sees the states the already-quantized layers before it produce,
and inside a layer each stage sees the quantized stages before it (q/k/v
before o, gate/up before down), so GPTQ corrects for the errors upstream.
"""

from __future__ import annotations

import copy

import torch

from ..model import CausalLM
from .gptq import accumulate_hessian, quantize_matrix
from .layers import MODULE_GROUPS, collect_hessians, linears, relative_output_error, rotary_for, run_block
from .measure import dequantized_from
from .qparams import QuantSetting

# Within a block, linears quantized together (they read the same input), in order.
STAGES = {"self_attn": (("q_proj", "k_proj", "v_proj"), ("o_proj",)), "mlp": (("gate_proj", "up_proj"), ("down_proj",))}


def quantize_layer(
    model: CausalLM, index: int, states: torch.Tensor, settings: dict[str, QuantSetting], device
) -> tuple[dict[str, torch.Tensor], torch.Tensor, float]:
    """(tensors to write under their checkpoint names, states for the next layer, the layer's relative output error).

    settings: linear name ("q_proj", ...) -> its setting.
    """
    return quantize_layer_with(model, index, states, settings, device, _gptq_linear)


def _gptq_linear(module, hessian: torch.Tensor, setting: QuantSetting, index: int, name: str):
    stored = quantize_matrix(module.weight, hessian, setting)
    return stored, dequantized_from(stored, module.out_features)


def quantize_layer_with(model: CausalLM, index: int, states: torch.Tensor, settings: dict, device, quantize_linear):
    """quantize_layer for any format: quantize_linear(module, hessian, setting, layer index, linear name)
    gives the linear's stored tensors (after its prefix) and the weight [out, in] they decode to."""
    original = model.model.layers[index]
    layer = copy.deepcopy(original).to(device=device, dtype=torch.float32)
    reference_layer = copy.deepcopy(original).to(device=device, dtype=torch.float32)
    rotary = rotary_for(model, states.shape[1], device)
    prefix = f"model.layers.{index}"
    tensors: dict[str, torch.Tensor] = {
        f"{prefix}.input_layernorm.weight": original.input_layernorm.weight,
        f"{prefix}.post_attention_layernorm.weight": original.post_attention_layernorm.weight,
    }
    reference = states
    for group in MODULE_GROUPS:
        modules = linears(layer, group)
        for stage in STAGES[group]:
            with collect_hessians({name: modules[name] for name in stage}) as hessians:
                run_block(layer, group, states, rotary)
            for name in stage:
                module = modules[name]
                stored, weight = quantize_linear(module, hessians[name], settings[name], index, name)
                for suffix, tensor in stored.items():
                    tensors[f"{prefix}.{group}.{name}.{suffix}"] = tensor.cpu()
                if module.bias is not None:
                    tensors[f"{prefix}.{group}.{name}.bias"] = original_bias(original, group, name)
                # Later stages and layers must see what inference will compute.
                module.weight = torch.nn.Parameter(weight.to(device), requires_grad=False)
        states = states + run_block(layer, group, states, rotary)
        reference = reference + run_block(reference_layer, group, reference, rotary)
    return tensors, states, relative_output_error(states, reference)


def original_bias(layer, group: str, name: str) -> torch.Tensor:
    return getattr(getattr(layer, group), name).bias


def quantize_head(model: CausalLM, states: torch.Tensor, setting: QuantSetting, device) -> dict[str, torch.Tensor]:
    norm = copy.deepcopy(model.model.norm).to(device=device, dtype=torch.float32)
    hessian = None
    for start in range(0, states.shape[0], 8):
        hessian = accumulate_hessian(hessian, norm(states[start : start + 8]))
    weight = model.lm_head.weight.to(device=device, dtype=torch.float32)
    stored = quantize_matrix(weight, hessian, setting)
    return {f"lm_head.{suffix}": tensor.cpu() for suffix, tensor in stored.items()}
