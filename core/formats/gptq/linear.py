"""The GPTQ layer: its stored tensors in, the kernels on a GPU, the torch reference elsewhere."""

from __future__ import annotations

import torch

from ...linear import QuantizedLinear
from . import kernel
from .layout import LAYER_TENSORS, check_layer_tensors, default_g_idx, sort_rows_by_group
from .reference import dequantize_gptq


class GPTQLinear(QuantizedLinear):
    """A layer from a GPTQ 4-bit checkpoint (AutoGPTQ / GPTQModel layout, layout.py).

    `prepare()`, run once after loading, sorts the rows by group (act-order
    shuffles them), so the kernels see each group as one run of rows and
    permute the few input columns instead (`perm`). Kernels: kernel.py."""

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None, dtype=None,
                 zero_offset: int = 1, name: str = ""):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.zero_offset = zero_offset  # added to each stored zero nibble: 1 for checkpoint_format gptq, 0 for gptq_v2
        self.name = name
        for tensor_name in LAYER_TENSORS:
            self.register_buffer(tensor_name, None)
        self.register_buffer("perm", None)  # stored row r is input perm[r]; None when already in group order

    def prepare(self, group_size: int = -1) -> None:
        if self.g_idx is None:
            self.g_idx = default_g_idx(self.in_features, group_size, self.qweight.device)
        check_layer_tensors(self.name, self.in_features, self.out_features, self.qweight, self.qzeros, self.scales, self.g_idx)
        self.qweight, self.g_idx, self.perm = sort_rows_by_group(self.qweight, self.g_idx)
        self._dense, self._plan = None, None

    def quantized_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"qweight": self.qweight, "qzeros": self.qzeros, "scales": self.scales, "g_idx": self.g_idx}
        if self.perm is not None:
            tensors["perm"] = self.perm
        return tensors

    def packed_weight(self) -> torch.Tensor:
        return self.qweight

    def dequantized(self) -> torch.Tensor:
        return dequantize_gptq(self.qweight, self.qzeros, self.scales, self.g_idx, self.zero_offset, self.perm)

    def make_plan(self):
        return kernel.plan_layer(self.qweight, self.qzeros, self.scales, self.g_idx, self.perm, self.zero_offset)

    def kernel_matmul(self, x: torch.Tensor, plan) -> torch.Tensor:
        return kernel.matmul(x, self.qweight, plan, self.bias)
