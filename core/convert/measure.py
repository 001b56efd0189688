"""Measurement pass: how much each candidate setting hurts each module's output.

Layer by layer, with only that layer's weights on the compute device: run the
calibration states through it, collect each linear's input Hessian, quantize
the module group with every candidate of its list and record the relative
error of the group's output (`accuracy` = 1 - error) and its exact bits. The
states then move on through the unquantized layer, as in ExLlamaV2.
"""

from __future__ import annotations

import copy

import torch

from ..formats.exl2.reference import dequantize_exl2
from ..model import CausalLM
from .gptq import quantize_matrix_multi
from .layers import MODULE_GROUPS, collect_hessians, linears, relative_output_error, rotary_for, run_block, substituted_weights
from .progress import ProgressCallback, ProgressEvent, check_cancel
from .qparams import ATTENTION_CANDIDATES, MLP_CANDIDATES, QuantSetting, setting_bits

CANDIDATES = {"self_attn": ATTENTION_CANDIDATES, "mlp": MLP_CANDIDATES}
# A module group's candidates (fp16, [out, in] each) wait in host memory when
# they would take more than this share of the GPU memory still free, and each
# is copied in for its forward: ~20 candidates of a 7B MLP's three matrices are
# 5.4 GB, several times the layer itself. Parking costs time (each candidate crosses
# PCIe twice; python3 -m bench.convert_speed --shape llama2-7b --layers 2 measures it),
# so a GPU with room keeps them.
CANDIDATE_SHARE_OF_FREE = 0.5


def dequantized(
    weight: torch.Tensor, hessian: torch.Tensor, settings: list[QuantSetting], results_on=None
) -> dict[QuantSetting, torch.Tensor]:
    """GPTQ-quantize a weight [out, in] with each setting (in one pass) and return
    what the files would give back, [out, in], per setting (on `results_on`, else the weight's device)."""
    return dict(zip(settings, quantize_matrix_multi(weight, hessian, settings, packed=False, results_on=results_on)))


def dequantized_from(stored: dict[str, torch.Tensor], out_features: int) -> torch.Tensor:
    return dequantize_exl2(stored, out_features).T.to(torch.float32)


def _short_of_room(device, candidate_bytes: int) -> bool:
    device = torch.device(device)
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    # Blocks torch's allocator holds but does not use are free to it as well.
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return candidate_bytes > CANDIDATE_SHARE_OF_FREE * free


def measure_layer(
    model: CausalLM, index: int, states: torch.Tensor, device, eval_rows: int, on_event: ProgressCallback, cancel=None
) -> tuple[dict[str, list[dict]], torch.Tensor]:
    """Candidates' results for this layer's module groups, and the states entering the next layer."""
    return measure_layer_with(model, index, states, device, eval_rows, on_event, cancel, _gptq_candidates)


def _gptq_candidates(group: str, modules: dict, hessians: dict, index: int, device, cancel):
    settings = {name: list(dict.fromkeys(candidate[name] for candidate in CANDIDATES[group])) for name in modules}
    candidate_bytes = sum(2 * m.weight.numel() * len(settings[name]) for name, m in modules.items())
    park = _short_of_room(device, candidate_bytes)
    quantized: dict[str, dict[QuantSetting, torch.Tensor]] = {}
    for name, module in modules.items():
        check_cancel(cancel)
        quantized[name] = dequantized(module.weight, hessians[name], settings[name], "cpu" if park else None)
    for candidate in CANDIDATES[group]:
        check_cancel(cancel)
        weights, total_bits = {}, 0
        for name, setting in candidate.items():
            weights[name] = quantized[name][setting]
            total_bits += setting_bits(setting, modules[name].in_features, modules[name].out_features)
        yield weights, total_bits, {name: setting.to_dict() for name, setting in candidate.items()}


def measure_layer_with(
    model: CausalLM, index: int, states: torch.Tensor, device, eval_rows: int, on_event: ProgressCallback, cancel,
    candidates,
) -> tuple[dict[str, list[dict]], torch.Tensor]:
    """measure_layer for any format: candidates(group, modules, hessians, layer index, device, cancel) yields
    each candidate's (weights [out, in] by linear name, total bits, settings by linear name for the entry)."""
    layer = copy.deepcopy(model.model.layers[index]).to(device=device, dtype=torch.float32)
    rotary = rotary_for(model, states.shape[1], device)
    results: dict[str, list[dict]] = {}
    for group in MODULE_GROUPS:
        modules = linears(layer, group)
        with collect_hessians(modules) as hessians:
            reference = run_block(layer, group, states, rotary)
        eval_states, eval_reference = states[:eval_rows], reference[:eval_rows]
        entries = []
        key = f"model.layers.{index}.{group}"
        weights_count = sum(m.weight.numel() for m in modules.values())
        for weights, total_bits, settings in candidates(group, modules, hessians, index, device, cancel):
            with substituted_weights(modules, weights):
                output = run_block(layer, group, eval_states, rotary)
            error = relative_output_error(output, eval_reference)
            entries.append({"accuracy": 1.0 - error, "total_bits": total_bits, **settings})
        results[key] = entries
        on_event(ProgressEvent(
            "measure", (index + (0.5 if group == "self_attn" else 1.0)) / model.config.num_layers,
            f"measured {key}", index, model.config.num_layers, key,
            [{"bpw": e["total_bits"] / weights_count, "error": 1.0 - e["accuracy"]} for e in entries],
        ))
        states = states + reference
        del hessians
    return results, states
