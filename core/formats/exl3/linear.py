"""The EXL3 layer: its stored tensors in, the kernels on a GPU where they exist, the torch reference elsewhere."""

from __future__ import annotations

import torch

from ...kernels import dispatch
from ...linear import QuantizedLinear
from ...weights import WeightsError
from . import kernel
from .layout import HALF_BITS, LAYER_TENSORS, MARKER_TENSORS, PAD, check_layer_tensors, unpack_signs
from .reference import dequantize_exl3, layer_codebook


class EXL3Linear(QuantizedLinear):
    """A layer stored in ExLlamaV3's trellis format (layout.py; product: reference.py, kernel.py).

    `prepare()`, run once after loading, checks the tensors, turns legacy packed signs
    (su/sv) into scales (suh/svh), reads the codebook from the marker and trims a padded
    bias. The stored weight is padded to multiples of 128 on both sides: inputs are
    zero-extended and the padding outputs dropped, so the layer keeps the model's shape."""

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None, dtype=None, name: str = ""):
        super().__init__(in_features, out_features, False, device, dtype)
        self.name = name
        self.expects_bias = bias
        # A buffer, not a parameter: ExLlamaV3 may store it padded to the trellis width; prepare() trims it.
        del self.bias
        self.register_buffer("bias", None)
        for tensor_name in LAYER_TENSORS:
            self.register_buffer(tensor_name, None)
        self.codebook: str | None = None
        self.bits: float | None = None
        self._planned_on: torch.device | None = None

    def prepare(self) -> None:
        key = self.name or "an EXL3 layer"
        try:
            self.codebook = layer_codebook({name: getattr(self, name) for name in MARKER_TENSORS}, key)
        except ValueError as error:
            raise WeightsError(str(error)) from None
        suh = self.suh if self.suh is not None else (None if self.su is None else unpack_signs(self.su))
        svh = self.svh if self.svh is not None else (None if self.sv is None else unpack_signs(self.sv))
        self.bits = check_layer_tensors(key, self.trellis, suh, svh)
        if self.bits in HALF_BITS and self.codebook != "mul1":
            raise WeightsError(f"{key}.trellis is {self.bits:g} bits per weight with the {self.codebook.upper()} "
                               "codebook; EXL3 stores half rates with MUL1 only")
        k, n = suh.shape[0], svh.shape[0]
        padded = (-(-self.in_features // PAD) * PAD, -(-self.out_features // PAD) * PAD)
        if (k, n) != padded:
            raise WeightsError(f"{key}.trellis holds a {k}x{n} weight, but the model's layer has {self.in_features} "
                               f"inputs and {self.out_features} outputs, stored padded as {padded[0]}x{padded[1]}")
        self.suh, self.svh = suh.to(torch.float16), svh.to(torch.float16)
        self.su = self.sv = self.scale = None
        if self.bias is not None:
            if not self.out_features <= self.bias.numel() <= n or self.bias.dim() != 1:
                raise WeightsError(f"{key}.bias has shape {tuple(self.bias.shape)}; the layer has "
                                   f"{self.out_features} outputs")
            self.bias = self.bias[: self.out_features]
        elif self.expects_bias:
            raise WeightsError(f"the model's config gives {key} a bias, but the folder stores no {key}.bias")
        self._dense, self._plan, self._planned_on = None, None, None

    def quantized_tensors(self) -> dict[str, torch.Tensor]:
        return {"trellis": self.trellis, "suh": self.suh, "svh": self.svh}

    def packed_weight(self) -> torch.Tensor:
        return self.trellis

    def dequantized(self) -> torch.Tensor:
        weight = dequantize_exl3(self.quantized_tensors(), self.codebook)
        return weight[: self.in_features, : self.out_features]

    def make_plan(self):
        return kernel.plan_layer(self.quantized_tensors(), self.codebook, self.in_features, self.out_features)

    def kernel_plan(self):
        """The kernels' tables, or None where the dense fallback runs (the CPU, no kernels built,
        or no EXL3 kernel for this layer: kernel.plan_layer)."""
        device = self.trellis.device
        if device.type != "cuda" or not dispatch.enabled(device):
            return None
        if self._planned_on != device:
            self._plan, self._planned_on = self.make_plan(), device
            if self._plan is not None:
                self._dense = None
        return self._plan

    def kernel_matmul(self, x: torch.Tensor, plan) -> torch.Tensor:
        return kernel.matmul(x, self.quantized_tensors(), plan, self.bias, self.out_features)
