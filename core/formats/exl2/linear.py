"""The EXL2 layer: its stored tensors in, the kernels on a GPU, the torch reference elsewhere."""

from __future__ import annotations

import torch

from ...linear import QuantizedLinear
from . import kernel
from .layout import LAYER_TENSORS
from .reference import dequantize_exl2


class EXL2Linear(QuantizedLinear):
    """A layer stored in ExLlamaV2's mixed-bit format (layout.py; kernels: kernel.py)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device, dtype)
        for name in LAYER_TENSORS:
            self.register_buffer(name, None)

    def quantized_tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in LAYER_TENSORS}

    def packed_weight(self) -> torch.Tensor:
        return self.q_weight

    def dequantized(self) -> torch.Tensor:
        return dequantize_exl2(self.quantized_tensors(), self.out_features)

    def make_plan(self):
        return kernel.plan_layer(self.quantized_tensors(), self.out_features)

    def kernel_matmul(self, x: torch.Tensor, plan) -> torch.Tensor:
        return kernel.matmul(x, self.quantized_tensors(), plan, self.bias)

    group_most = kernel.GROUP_MOST

    @staticmethod
    def kernel_matmul_group(x: torch.Tensor, layers: list["EXL2Linear"], plans: list) -> list[torch.Tensor]:
        return kernel.matmul_group(x, [(layer.quantized_tensors(), plan, layer.bias) for layer, plan in zip(layers, plans)])

    reads_slots = True

    @staticmethod
    def slot_table(plan) -> torch.Tensor:
        return plan.xperm

    @staticmethod
    def kernel_matmul_slots(x_slots: list[torch.Tensor] | None, layers: list["EXL2Linear"], plans: list,
                            staged=None, routes=(), x: torch.Tensor | None = None) -> list[torch.Tensor]:
        return kernel.matmul_slots(x_slots, [(layer.quantized_tensors(), plan, layer.bias)
                                           for layer, plan in zip(layers, plans)], staged, routes, x)
