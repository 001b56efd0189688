"""What a conversion writes: EXL2 or EXL3. Each target gives the job its passes
over one layer (measure, quantize), the head, the folder writer and the bit count;
the job (job.py) runs them in the same order, resumes them the same way and
allocates bits with the same optimizer (allocate.py) from either measurement.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..formats.exl2.layout import stored_bits as exl2_stored_bits
from ..formats.exl2.writer import write_exl2_folder
from ..formats.exl3.writer import write_exl3_folder
from . import measure as exl2_measure
from . import quantize as exl2_quantize
from .exl3 import layer as exl3_layer
from .qparams import HEAD_OPTIONS, QuantSetting


@dataclass(frozen=True)
class Target:
    name: str
    min_bpw: float  # the lowest target the format's candidates can meet on any model
    head_bits: tuple[int, ...]  # what -hb may be
    # (model, layer index, states, device, eval rows, on_event, cancel) -> (measurement of its groups, next states)
    measure_layer: Callable
    # one measurement candidate -> {linear name: what quantize_layer takes for it}
    setting_of: Callable[[Any], Any]
    # (model, layer index, states, {linear name: setting}, device) -> (tensors, next states, relative error)
    quantize_layer: Callable
    # (model, states, head bits, device) -> the head's tensors
    quantize_head: Callable
    # (output dir, source folder, [(name, tensor)], quantization_config) -> the folder
    write_folder: Callable
    # (a linear's stored tensors by suffix, its weights) -> the bits its bpw counts
    stored_bits: Callable[[dict, int], int]
    # the quantization_config a loader reads, without the job's calibration details
    quantization_config: Callable[[float, int], dict]


EXL2 = Target(
    name="exl2", min_bpw=2.0, head_bits=tuple(sorted(HEAD_OPTIONS)),
    measure_layer=exl2_measure.measure_layer,
    setting_of=QuantSetting.from_dict,
    quantize_layer=exl2_quantize.quantize_layer,
    quantize_head=lambda model, states, bits, device: exl2_quantize.quantize_head(model, states, HEAD_OPTIONS[bits], device),
    write_folder=write_exl2_folder,
    stored_bits=lambda tensors, weights: exl2_stored_bits({k: v for k, v in tensors.items() if k.startswith("q_")}),
    # "version": the ExLlamaV2 format version the files follow.
    quantization_config=lambda bpw, head_bits: {"quant_method": "exl2", "version": "0.3.2", "bits": bpw,
                                                "head_bits": head_bits},
)

EXL3 = Target(
    name="exl3", min_bpw=min(exl3_layer.CANDIDATE_BITS), head_bits=(2, 3, 4, 5, 6, 8, 16),
    measure_layer=exl3_layer.measure_layer,
    setting_of=lambda candidate: float(candidate["bits"]),
    quantize_layer=exl3_layer.quantize_layer,
    quantize_head=exl3_layer.quantize_head,
    write_folder=write_exl3_folder,
    stored_bits=exl3_layer.stored_bits,
    # The fields ExLlamaV3 1.6.5's compile step writes; "version" is the release whose files these follow.
    quantization_config=lambda bpw, head_bits: {"quant_method": "exl3", "version": "1.6.5", "bits": round(bpw, 2),
                                                "head_bits": head_bits, "out_scales": "always",
                                                "codebook": exl3_layer.CODEBOOK},
)

TARGETS = {target.name: target for target in (EXL2, EXL3)}
