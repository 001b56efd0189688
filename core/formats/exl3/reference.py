"""The torch twins of the EXL3 products: the CPU path of an EXL3 layer, the GPU path until
its kernels exist (kernel.py), and what the tests hold those kernels to.

A layer's weight in the original basis is W = diag(suh) H_k W_r H_n diag(svh), with W_r the
decoded trellis and H the 128-block Hadamard (../shared/EXL3.md sections 3-4); y = x W.
`tensors` below is a layer's stored tensors by name after its prefix: trellis, suh or su,
svh or sv, and mcg or mul1 where it has a marker.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .codebook import MARKERS, codebook_of_layer, codebook_values
from .hadamard import block_hadamard
from .layout import POSITIONS, bits_of_trellis, tiles_to_matrix, unpack_signs, unpack_trellis

# Tiles decoded per step: bounds the int64 states in flight on a large layer.
_DECODE_TILES = 1 << 15


def decode_tiles(trellis: torch.Tensor, codebook: str | torch.Tensor) -> torch.Tensor:
    """int16 [k/16, n/16, 16*K] -> fp16 W_r [k, n]: each position's state through the codebook
    (a name, or its fp16 table of 65536 values), placed at its tile position."""
    bits = bits_of_trellis(trellis.shape)
    table = codebook_values(codebook) if isinstance(codebook, str) else codebook
    table = table.to(trellis.device)
    tiles_k, tiles_n = trellis.shape[0], trellis.shape[1]
    values = torch.empty(tiles_k, tiles_n, POSITIONS, dtype=torch.float16, device=trellis.device)
    rows = max(1, _DECODE_TILES // max(tiles_n, 1))
    for row in range(0, tiles_k, rows):
        values[row:row + rows] = table[unpack_trellis(trellis[row:row + rows], bits)]
    return tiles_to_matrix(values)


def layer_scales(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(suh, svh) fp16: as stored, or +-1 from legacy packed sign words (su, sv)."""
    suh = tensors.get("suh")
    svh = tensors.get("svh")
    suh = unpack_signs(tensors["su"]) if suh is None else suh
    svh = unpack_signs(tensors["sv"]) if svh is None else svh
    return suh.to(torch.float16), svh.to(torch.float16)


def layer_codebook(tensors: dict[str, torch.Tensor], key: str = "") -> str:
    return codebook_of_layer(key or "an EXL3 layer", {name: tensors.get(name) for name in MARKERS})


def dequantize_exl3(tensors: dict[str, torch.Tensor], codebook: str | None = None) -> torch.Tensor:
    """The layer's weight, fp16 [k, n] (padded in_features x padded out_features; slice off the padding).

    Computed in float32 from the exact fp16 codebook values, suh and svh, and rounded to fp16
    once: the fp16 weight closest to the exact product. ExLlamaV3's kernels round at other
    points (x*suh and had(x*suh) in fp16, the post-scale in fp16), so neither they nor this
    is bit-exact to the other; x @ this weight and the kernel's product each agree with the
    exact one within fp16 tolerance, and a single rounding keeps this one the closest.
    """
    codebook = codebook or layer_codebook(tensors)
    suh, svh = layer_scales(tensors)
    weight = decode_tiles(tensors["trellis"], codebook).to(torch.float32)
    weight = block_hadamard(block_hadamard(weight, dim=0), dim=1)
    weight.mul_(suh.to(torch.float32)[:, None]).mul_(svh.to(torch.float32)[None, :])
    return weight.to(torch.float16)


def matmul(x: torch.Tensor, tensors: dict[str, torch.Tensor], out_features: int,
           bias: torch.Tensor | None = None, codebook: str | None = None) -> torch.Tensor:
    """x [..., in_features] @ the layer's weight (+ bias): [..., out_features] in x's dtype, computed
    as ExLlamaV3's kernel does: x*suh in fp16 (x zero-extended to the padded k), the input Hadamard
    in fp32 rounded to fp16, the product of fp16 values summed in fp32, the output Hadamard in fp32
    rounded to fp16, times svh in fp16, then the padding columns trimmed."""
    codebook = codebook or layer_codebook(tensors)
    suh, svh = layer_scales(tensors)
    scaled = x.to(torch.float16) * suh[: x.shape[-1]]
    scaled = F.pad(scaled, (0, suh.shape[0] - x.shape[-1]))
    rotated = block_hadamard(scaled).to(torch.float16)
    w_r = decode_tiles(tensors["trellis"], codebook)
    product = rotated.to(torch.float32) @ w_r.to(torch.float32)
    out = (block_hadamard(product).to(torch.float16) * svh)[..., :out_features]
    if bias is not None:
        out = out + bias.to(torch.float16)[:out_features]
    return out.to(x.dtype)
