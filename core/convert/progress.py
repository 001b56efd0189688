"""Progress events the converter emits and the cancel flag it checks.

The CLI prints them (or writes them as JSON lines, --events jsonl), the web app plots
them; neither reaches into a pass.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field


class ConversionCancelled(Exception):
    """The user asked to stop; the work dir keeps everything finished so far."""


@dataclass(frozen=True)
class ProgressEvent:
    stage: str  # calibration, measure, optimize, quantize, head, write, done
    fraction: float  # of the current stage, 0..1
    message: str = ""
    layer: int | None = None
    layers: int | None = None
    module: str | None = None  # e.g. "model.layers.3.mlp"
    # measure: every candidate's {"bpw", "error"}; quantize: the chosen one's too.
    candidates: list[dict] = field(default_factory=list)
    chosen: int | None = None
    error: float | None = None  # quantize: the layer's relative output error
    # optimize: the chosen allocation, {"choice": {module: candidate index}, "bpw", "target_bpw",
    # "objective", "module_bpw": {module: bpw of its chosen candidate}}
    allocation: dict | None = None


ProgressCallback = Callable[[ProgressEvent], None]


def no_progress(event: ProgressEvent) -> None:
    pass


def check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise ConversionCancelled("conversion cancelled; run it again with the same work dir to resume")
