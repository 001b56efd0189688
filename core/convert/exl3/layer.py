"""EXL3 conversion of one decoder layer: the measurement (each module group at
every candidate bit width) and the quantization (the allocated width of each
linear). Same order as the EXL2 passes (core/convert/measure.py, quantize.py):
q/k/v before o, gate/up before down, so each stage's Hessian comes from the
quantized stages before it, and each layer from the quantized layers before it.
"""

from __future__ import annotations

import copy

import torch

from ...formats.exl3.codebook import MARKERS, marker_tensor
from ...formats.exl3.reference import dequantize_exl3
from ...model import CausalLM
from ..gptq import accumulate_hessian
from ..layers import MODULE_GROUPS
from ..measure import measure_layer_with
from ..progress import ProgressCallback, check_cancel
from ..quantize import quantize_layer_with
from .ldlq import quantize_exl3

# Bits per weight a module group may get (K of one tensor: ../shared/EXL3.md section 1);
# the half rates need the MUL1 codebook, which is ExLlamaV3's default as well.
CANDIDATE_BITS = (1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0)
CODEBOOK = "mul1"
LINEAR_ORDER = tuple(name for group in MODULE_GROUPS.values() for name in group)


def linear_seed(layer_index: int, name: str) -> int:
    """The seed of one linear's sign flips: fixed by its place, so a resumed run repeats it.
    The head is the linear after the last layer's."""
    return layer_index * len(LINEAR_ORDER) + (LINEAR_ORDER.index(name) if name != "lm_head" else 0)


def quantize_weight(weight: torch.Tensor, hessian: torch.Tensor | None, bits: float, seed: int) -> dict[str, torch.Tensor]:
    """The stored tensors of one linear (after its prefix), weight [out, in] as HF holds it."""
    quantized = quantize_exl3(weight.to(torch.float32), hessian, bits, CODEBOOK, seed)
    stored = {"trellis": quantized.trellis, "suh": quantized.suh, "svh": quantized.svh}
    if CODEBOOK in MARKERS:
        stored[CODEBOOK] = marker_tensor(CODEBOOK).to(quantized.trellis.device)
    return stored


def dequantized_weight(stored: dict[str, torch.Tensor], in_features: int, out_features: int) -> torch.Tensor:
    """What the files give back, float32 [out, in] without the padding."""
    return dequantize_exl3(stored)[:in_features, :out_features].T.to(torch.float32)


def stored_bits(tensors: dict[str, torch.Tensor], weights: int) -> int:
    """K bits per weight of the unpadded matrix, ExLlamaV3's count: the padding to 128 and
    the fp16 scales are left out of bpw (the folder's size says what they cost)."""
    trellis = tensors.get("trellis")
    return 0 if trellis is None else int(round(trellis.shape[-1] / 16 * weights))


def group_bits(bits: float, modules: dict) -> int:
    """Bits a module group holds at `bits` per weight: K times its weights, ExLlamaV3's count."""
    return int(round(bits * sum(m.weight.numel() for m in modules.values())))


def measure_layer(
    model: CausalLM, index: int, states: torch.Tensor, device, eval_rows: int, on_event: ProgressCallback, cancel=None
) -> tuple[dict[str, list[dict]], torch.Tensor]:
    """Every candidate width's relative output error for this layer's module groups, and the next states.

    A candidate quantizes the whole group at one width, each linear with its own
    Hessian (the unquantized layer's); the states then move on through the
    unquantized layer, as in the EXL2 measurement.
    """
    return measure_layer_with(model, index, states, device, eval_rows, on_event, cancel, _width_candidates)


def _width_candidates(group: str, modules: dict, hessians: dict, index: int, device, cancel):
    for bits in CANDIDATE_BITS:
        weights = {}
        for name, module in modules.items():
            check_cancel(cancel)
            stored = quantize_weight(module.weight, hessians[name], bits, linear_seed(index, name))
            weights[name] = dequantized_weight(stored, module.in_features, module.out_features)
        yield weights, group_bits(bits, modules), {name: {"bits": bits} for name in modules}


def quantize_layer(
    model: CausalLM, index: int, states: torch.Tensor, bits: dict[str, float], device
) -> tuple[dict[str, torch.Tensor], torch.Tensor, float]:
    """(tensors under their checkpoint names, states for the next layer, the layer's relative output error).

    bits: linear name ("q_proj", ...) -> its width.
    """
    return quantize_layer_with(model, index, states, bits, device, _exl3_linear)


def _exl3_linear(module, hessian: torch.Tensor, bits: float, index: int, name: str):
    stored = quantize_weight(module.weight, hessian, bits, linear_seed(index, name))
    return stored, dequantized_weight(stored, module.in_features, module.out_features)


def quantize_head(model: CausalLM, states: torch.Tensor, bits: int, device) -> dict[str, torch.Tensor]:
    """The output layer at `bits` (its Hessian from the final norm's output), or fp16 at 16 bits.

    EXL3 always stores a head of its own: a model with tied embeddings gets a copy (EXL3.md section 1).
    """
    weight = model.lm_head.weight
    if bits >= 16:
        return {"lm_head.weight": weight.to(torch.float16)}
    norm = copy.deepcopy(model.model.norm).to(device=device, dtype=torch.float32)
    hessian = None
    for start in range(0, states.shape[0], 8):
        hessian = accumulate_hessian(hessian, norm(states[start : start + 8]))
    stored = quantize_weight(weight.to(device=device, dtype=torch.float32), hessian, float(bits),
                             linear_seed(model.config.num_layers, "lm_head"))
    return {f"lm_head.{suffix}": tensor.cpu() for suffix, tensor in stored.items()}
