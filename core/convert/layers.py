"""Running one decoder layer piece by piece for the converter: its attention
and MLP blocks on calibration states, with the Hessian of every linear's input
collected on the way. Uses the model's own modules, so the converter computes
exactly what inference will."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ..linear import DenseLinear
from ..model import CausalLM, DecoderLayer
from .gptq import accumulate_hessian
from .qparams import ATTENTION_MODULES, MLP_MODULES

# Module group -> (attribute on the decoder layer, its linears).
MODULE_GROUPS = {"self_attn": ATTENTION_MODULES, "mlp": MLP_MODULES}


def linears(layer: DecoderLayer, group: str) -> dict[str, DenseLinear]:
    block = getattr(layer, group)
    return {name: getattr(block, name) for name in MODULE_GROUPS[group]}


def rotary_for(model: CausalLM, seq: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = model.rotary(0, seq, torch.float32)
    return cos.to(device), sin.to(device)


def run_block(layer: DecoderLayer, group: str, states: torch.Tensor, rotary, batch_rows: int = 8) -> torch.Tensor:
    """The block's contribution to the residual for states [rows, seq, hidden], a few rows at a time."""
    outputs = []
    for start in range(0, states.shape[0], batch_rows):
        x = states[start : start + batch_rows]
        if group == "self_attn":
            outputs.append(layer.self_attn(layer.input_layernorm(x), *rotary, None, 0))
        else:
            outputs.append(layer.mlp(layer.post_attention_layernorm(x)))
    return torch.cat(outputs)


# These read the same input tensor as another linear of their block, so they share its Hessian.
SHARED_INPUT = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}


@contextmanager
def collect_hessians(modules: dict[str, torch.nn.Module]):
    """Sum xᵀx of each module's input while the block runs; yields the dict it fills.

    Linears that share an input are hooked once; their entries alias the shared sum."""
    hessians: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in modules.items():
        if SHARED_INPUT.get(name) in modules:
            continue

        def hook(_module, args, name=name):
            hessians[name] = accumulate_hessian(hessians.get(name), args[0])

        handles.append(module.register_forward_pre_hook(hook))
    try:
        yield hessians
    finally:
        for handle in handles:
            handle.remove()
        for name, source in SHARED_INPUT.items():
            if name in modules and source in hessians:
                hessians[name] = hessians[source]


@contextmanager
def substituted_weights(modules: dict[str, DenseLinear], weights: dict[str, torch.Tensor]):
    """Run a block with other weights [out, in] for some of its linears, then put the originals back."""
    originals = {name: modules[name].weight for name in weights}
    try:
        for name, weight in weights.items():
            original = originals[name]
            modules[name].weight = torch.nn.Parameter(weight.to(original.device, original.dtype), requires_grad=False)
        yield
    finally:
        for name, weight in originals.items():
            modules[name].weight = weight


def relative_output_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    return float((output - reference).double().norm() / reference.double().norm().clamp_min(1e-30))
