"""The linear-layer family. Every member has the same call signature, so the
model never learns how its weights are stored; a quantized layer replaces a
dense one by name when the loader finds its tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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


# Tensor names (after the layer's prefix) of an EXL2 layer, as ExLlamaV2 writes them.
EXL2_TENSORS = ("q_weight", "q_scale", "q_scale_max", "q_groups", "q_invperm")


class EXL2Linear(nn.Module):
    """A layer stored in ExLlamaV2's mixed-bit format.

    On a GPU with the kernels built, the packed tensors are all it keeps: a few
    rows read them directly, a prefill dequantizes a transient fp16 tile
    (core/kernels/exl2.py). Elsewhere (the CPU, or no kernels) the torch
    reference dequantizes the weight once, on first use, and keeps it."""

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None, dtype=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = dtype or torch.float32
        for name in EXL2_TENSORS:
            self.register_buffer(name, None)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False)
        else:
            self.bias = None
        self._dense: torch.Tensor | None = None
        self._plan = None  # kernel tables, made on first use on the GPU

    def quantized_tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in EXL2_TENSORS}

    def dense_weight(self) -> torch.Tensor:
        """[out_features, in_features] in the compute dtype, as nn.Linear would hold it."""
        if self._dense is None:
            from .exl2_format import dequantize_exl2

            weight = dequantize_exl2(self.quantized_tensors(), self.out_features)
            self._dense = weight.t().contiguous().to(self.compute_dtype)
        return self._dense

    def kernel_plan(self):
        """The kernels' per-layer tables, or None where the torch reference runs."""
        from .kernels import exl2

        if not exl2.enabled(self.q_weight.device):
            return None
        if self._plan is None or self._plan.perm.device != self.q_weight.device:
            self._plan = exl2.plan_layer(self.quantized_tensors(), self.out_features)
            self._dense = None
        return self._plan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self.kernel_plan() if x.is_cuda else None
        if plan is not None:
            from .kernels import exl2

            return exl2.matmul(x, self.quantized_tensors(), plan, self.bias)
        return F.linear(x, self.dense_weight(), self.bias)


class GPTQLinear(nn.Module):
    """A layer from a GPTQ 4-bit checkpoint (AutoGPTQ / GPTQModel layout, core/gptq_checkpoint.py).

    `prepare()`, run once after loading, sorts the rows by group (act-order
    shuffles them), so the kernels see each group as one run of rows and
    permute the few input columns instead (`perm`). On a GPU with the kernels
    built the packed tensors are all it keeps (core/kernels/gptq4.py); elsewhere
    the torch reference dequantizes the weight once, on first use, and keeps it."""

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None, dtype=None,
                 zero_offset: int = 1, name: str = ""):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = dtype or torch.float32
        self.zero_offset = zero_offset  # added to each stored zero nibble: 1 for checkpoint_format gptq, 0 for gptq_v2
        self.name = name
        from .gptq_checkpoint import GPTQ_TENSORS

        for tensor_name in GPTQ_TENSORS:
            self.register_buffer(tensor_name, None)
        self.register_buffer("perm", None)  # stored row r is input perm[r]; None when already in group order
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False)
        else:
            self.bias = None
        self._dense: torch.Tensor | None = None
        self._plan = None

    def prepare(self, group_size: int = -1) -> None:
        from .gptq_checkpoint import check_layer_tensors, default_g_idx, sort_rows_by_group

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

    def dense_weight(self) -> torch.Tensor:
        """[out_features, in_features] in the compute dtype, as nn.Linear would hold it."""
        if self._dense is None:
            from .gptq_checkpoint import dequantize_gptq

            weight = dequantize_gptq(self.qweight, self.qzeros, self.scales, self.g_idx, self.zero_offset, self.perm)
            self._dense = weight.t().contiguous().to(self.compute_dtype)
        return self._dense

    def kernel_plan(self):
        """The kernels' per-layer tables, or None where the torch reference runs."""
        from .kernels import gptq4

        if not gptq4.enabled(self.qweight.device):
            return None
        if self._plan is None or self._plan.perm.device != self.qweight.device:
            self._plan = gptq4.plan_layer(self.qweight, self.qzeros, self.scales, self.g_idx, self.perm,
                                          self.zero_offset)
            self._dense = None
        return self._plan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self.kernel_plan() if x.is_cuda else None
        if plan is not None:
            from .kernels import gptq4

            return gptq4.matmul(x, self.qweight, plan, self.bias)
        return F.linear(x, self.dense_weight(), self.bias)
