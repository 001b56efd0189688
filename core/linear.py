"""The linear-layer family. Every member has the same call signature, so the
model never learns how its weights are stored; a quantized layer replaces a
dense one by name when the loader finds its tensors. Each checkpoint format's
layer (core/formats/<format>/linear.py) is a QuantizedLinear that says how to
dequantize, plan and multiply."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import dispatch


class DenseLinear(nn.Module):
    """An unquantized weight [out_features, in_features], as HF stores it."""

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None, dtype=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False)
        else:
            self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class QuantizedLinear(nn.Module):
    """What the quantized layers share. On a GPU with the kernels built, the
    packed tensors are all a layer keeps: a few rows read them directly, a
    prefill dequantizes a transient fp16 tile. Elsewhere (the CPU, or no
    kernels) the torch reference dequantizes the weight once, on first use, and
    keeps it. A subclass says how to dequantize, plan and multiply."""

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None, dtype=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = dtype or torch.float32
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False)
        else:
            self.bias = None
        self._dense: torch.Tensor | None = None
        self._plan = None  # kernel tables, made on first use on the GPU

    def packed_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def dequantized(self) -> torch.Tensor:
        """The weight [in_features, out_features] as the format decodes it."""
        raise NotImplementedError

    def make_plan(self):
        raise NotImplementedError

    def kernel_matmul(self, x: torch.Tensor, plan) -> torch.Tensor:
        raise NotImplementedError

    # Up to this many layers of this kind that read one input run as one kernel launch
    # (kernel_matmul_group); 1: the kind has no such kernel.
    group_most = 1

    @staticmethod
    def kernel_matmul_group(x: torch.Tensor, layers: list["QuantizedLinear"], plans: list) -> list[torch.Tensor]:
        raise NotImplementedError

    # Whether the kind's small-batch kernel can take its input already in its own order (input_slots).
    reads_slots = False

    @staticmethod
    def slot_table(plan) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def kernel_matmul_slots(x_slots: list[torch.Tensor] | None, layers: list["QuantizedLinear"], plans: list,
                            staged=None, routes=(), x: torch.Tensor | None = None) -> list[torch.Tensor]:
        raise NotImplementedError

    def dense_weight(self) -> torch.Tensor:
        """[out_features, in_features] in the compute dtype, as nn.Linear would hold it."""
        if self._dense is None:
            self._dense = self.dequantized().t().contiguous().to(self.compute_dtype)
        return self._dense

    def kernel_plan(self):
        """The kernels' per-layer tables, or None where the torch reference runs."""
        device = self.packed_weight().device
        if not dispatch.enabled(device):
            return None
        if self._plan is None or self._plan.perm.device != device:
            self._plan = self.make_plan()
            self._dense = None
        return self._plan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self.kernel_plan() if x.is_cuda else None
        if plan is not None:
            return self.kernel_matmul(x, plan)
        return F.linear(x, self.dense_weight(), self.bias)


def project(x: torch.Tensor, layers: tuple[nn.Module, ...]) -> list[torch.Tensor]:
    """The same input through several layers (q, k and v; gate and up), each output as layer(x) gives it.

    Quantized layers of one kind on the GPU share one kernel launch for a few input rows:
    decoding a token is a chain of a few hundred small products, and each launch's fixed
    cost (staging the input, the first loads' latency, the tail) is then paid once."""
    kind = type(layers[0])
    if kind is DenseLinear and len(layers) > 1:
        shared = _shared_weight(layers)
        if shared is not None:
            weight, bias = shared
            outs = F.linear(x, weight, bias).split([layer.out_features for layer in layers], dim=-1)
            # Each as its own tensor, as layer(x) gives it (a no-op for a single row): kernels take contiguous inputs.
            return [out.contiguous() for out in outs]
    if (len(layers) > 1 and x.is_cuda and issubclass(kind, QuantizedLinear) and len(layers) <= kind.group_most
            and all(type(layer) is kind and layer.in_features == layers[0].in_features for layer in layers)
            and x.numel() <= dispatch.SMALL_BATCH * x.shape[-1]):
        plans = [layer.kernel_plan() for layer in layers]
        if all(plan is not None for plan in plans):
            return kind.kernel_matmul_group(x, list(layers), plans)
    return [layer(x) for layer in layers]


def input_slots(layers: tuple[nn.Module, ...], rows: int) -> list[torch.Tensor] | None:
    """Where `rows` input rows for these layers (one input: q, k and v; gate and up; or one layer)
    run as one kernel launch that reads its input in an order of its own, the tables of that
    order a producer kernel writes it in (see project_slots); else None.

    The EXL2 small-batch kernel reads its inputs in an order that lets each weight it decodes
    meet its input without a shuffle. Written in that order by the kernel before it (a norm,
    SwiGLU, attention), they cost the product one contiguous read; without that, torch gathers
    them first (core/formats/exl2/kernel.py, gemm_group)."""
    kind = type(layers[0])
    if (not issubclass(kind, QuantizedLinear) or not kind.reads_slots or len(layers) > kind.group_most
            or rows > dispatch.SMALL_BATCH or any(type(layer) is not kind for layer in layers)
            or len({layer.in_features for layer in layers}) != 1):
        return None
    plans = [layer.kernel_plan() for layer in layers]
    if any(plan is None for plan in plans):
        return None
    return [kind.slot_table(plan) for plan in plans]


def project_slots(x_slots: list[torch.Tensor] | None, layers: tuple[nn.Module, ...], shape: torch.Size,
                  staged=None, routes=(), x: torch.Tensor | None = None) -> list[torch.Tensor | None]:
    """project() of an input of leading shape `shape` that a producer wrote in the tables' orders
    (x_slots[i] in input_slots(layers)[i]'s order; or rows x [M, K] where x_slots is None), each
    output shaped as layer(x) gives it. `staged` and `routes` hand a norm or SwiGLU over between
    two such products (core/kernels/handoff.py); a routed output with no residual is None here."""
    kind = type(layers[0])
    plans = [layer.kernel_plan() for layer in layers]
    outs = kind.kernel_matmul_slots(x_slots, list(layers), plans, staged, routes, x)
    routes = list(routes) + [None] * (len(layers) - len(routes))
    return [None if route is not None and route.residual is None else out.reshape(*shape, layer.out_features)
            for out, layer, route in zip(outs, layers, routes)]


def share_input_weights(model: nn.Module) -> None:
    """Place the weights of dense layers that read one input (q, k and v; gate and up) one
    after the other in one tensor, so project() multiplies them as one matrix: one wide
    product keeps the GPU's memory busier than three narrow ones. Each layer keeps its own
    weight, now a view; quantized layers are left as they are."""
    for module in model.modules():
        groups = []
        if all(hasattr(module, name) for name in ("q_proj", "k_proj", "v_proj")):
            groups.append((module.q_proj, module.k_proj, module.v_proj))
        if all(hasattr(module, name) for name in ("gate_proj", "up_proj")):
            groups.append((module.gate_proj, module.up_proj))
        for layers in groups:
            if not all(type(layer) is DenseLinear for layer in layers) or _shared_weight(layers) is not None:
                continue
            weights = [layer.weight for layer in layers]
            if len({(w.dtype, w.device, w.shape[1]) for w in weights}) != 1 or any(w.is_meta for w in weights):
                continue
            if len({layer.bias is None for layer in layers}) != 1:
                continue
            with torch.no_grad():
                weight = torch.cat(weights)
                bias = torch.cat([layer.bias for layer in layers]) if layers[0].bias is not None else None
                start = 0
                for layer in layers:
                    rows = layer.out_features
                    layer.weight = nn.Parameter(weight[start:start + rows], requires_grad=False)
                    if bias is not None:
                        layer.bias = nn.Parameter(bias[start:start + rows], requires_grad=False)
                    start += rows


def _shared_weight(layers) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, bias) of the whole group where share_input_weights placed the layers' tensors
    back to back, else None."""
    tensors = [[layer.weight for layer in layers]]
    if layers[0].bias is not None:
        if any(layer.bias is None for layer in layers):
            return None
        tensors.append([layer.bias for layer in layers])
    elif any(layer.bias is not None for layer in layers):
        return None
    joined = []
    for parts in tensors:
        base = parts[0]
        offset = base.storage_offset()
        for part in parts:
            if (not part.is_contiguous() or part.dtype != base.dtype or part.device != base.device
                    or part.untyped_storage().data_ptr() != base.untyped_storage().data_ptr()
                    or part.storage_offset() != offset or part.shape[1:] != base.shape[1:]):
                return None
            offset += part.numel()
        rows = sum(part.shape[0] for part in parts)
        joined.append(base.as_strided((rows, *base.shape[1:]), base.stride()))
    return joined[0], joined[1] if len(joined) > 1 else None
