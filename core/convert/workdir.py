"""The work dir of one conversion: the only module that knows its file names.

    job.json                       what is being converted, with which settings
    calibration.safetensors        the calibration rows
    measurement.partial.json       measured layers so far, plus
    measure_states.safetensors     the states entering the next layer to measure
    measurement.json               the finished measurement (reusable with -m)
    quant/layer_NNNNN.safetensors  each quantized layer, plus
    quant_states.safetensors       the states entering the next layer to quantize
    quant_progress.json            the allocation being quantized and the next layer
    events.jsonl                   the measure, optimize and quantize events so far, for charts
    .lock                          held (flock) by the conversion running in it

The converter (core/convert/job.py) writes them; the web app only reads what a
finished or interrupted run left (what it got to, its events).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, fields
from pathlib import Path

from .progress import ProgressEvent

# Stages worth keeping for a chart drawn after a restart; the rest are momentary.
LOGGED_STAGES = ("measure", "optimize", "quantize")
_EVENT_FIELDS = {f.name for f in fields(ProgressEvent)}


class WorkDirBusy(ValueError):
    """Another conversion holds the work dir's lock."""


def event_from_dict(values: dict) -> ProgressEvent:
    """A ProgressEvent from its JSON form (a log line or a --events jsonl line); unknown keys are ignored."""
    return ProgressEvent(**{key: value for key, value in values.items() if key in _EVENT_FIELDS})


class WorkDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"WorkDir({str(self.path)!r})"

    # -- names ----------------------------------------------------------------------------------

    @property
    def job_file(self) -> Path:
        return self.path / "job.json"

    @property
    def calibration(self) -> Path:
        return self.path / "calibration.safetensors"

    @property
    def measurement(self) -> Path:
        return self.path / "measurement.json"

    @property
    def measurement_partial(self) -> Path:
        return self.path / "measurement.partial.json"

    @property
    def measure_states(self) -> Path:
        return self.path / "measure_states.safetensors"

    @property
    def quant_folder(self) -> Path:
        return self.path / "quant"

    def quant_layer(self, index: int) -> Path:
        return self.quant_folder / f"layer_{index:05d}.safetensors"

    @property
    def quant_states(self) -> Path:
        return self.path / "quant_states.safetensors"

    @property
    def quant_progress(self) -> Path:
        return self.path / "quant_progress.json"

    @property
    def event_log(self) -> Path:
        return self.path / "events.jsonl"

    @property
    def default_output(self) -> Path:
        return self.path / "output"

    @property
    def lock_file(self) -> Path:
        return self.path / ".lock"

    # -- the lock -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Held for a whole run; a second conversion into the same work dir is refused at once.

        flock, not a pid file: the kernel drops it when the holder exits, kill -9 included,
        so a crashed run never leaves a stale lock behind.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        handle = open(self.lock_file, "a+")
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise WorkDirBusy(f"work dir {self.path} is in use by another conversion; "
                                  "wait for it to finish (or cancel it), or use another work dir") from None
            yield
        finally:
            handle.close()  # closing the descriptor releases the lock

    # -- what a run left ------------------------------------------------------------------------

    def has_measurement(self) -> bool:
        return self.measurement.is_file()

    def measurement_started(self) -> bool:
        return self.measurement.is_file() or self.measurement_partial.is_file()

    def progress_summary(self) -> str:
        """A sentence on what earlier runs in this work dir finished, or ""."""
        if self.has_measurement():
            layers = (read_json(self.quant_progress) or {}).get("next_layer")
            return f"measurement done, {layers} layers quantized" if layers is not None else "measurement done"
        layers = (read_json(self.measurement_partial) or {}).get("next_layer")
        return f"{layers} layers measured" if layers else ""

    def append_event(self, event: ProgressEvent) -> None:
        if event.stage not in LOGGED_STAGES:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        line = json.dumps(asdict(event)) + "\n"
        with open(self.event_log, "a+b") as handle:
            # A run killed mid-line leaves it unterminated; start on a fresh line so only that one is lost.
            handle.seek(0, os.SEEK_END)
            if handle.tell():
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":
                    line = "\n" + line
            handle.write(line.encode("utf-8"))

    def read_events(self) -> list[ProgressEvent]:
        events = []
        try:
            lines = self.event_log.read_text(encoding="utf-8").splitlines()
        except OSError:
            return events
        for line in lines:
            try:
                events.append(event_from_dict(json.loads(line)))
            except (json.JSONDecodeError, TypeError, AttributeError):
                continue  # a line cut short by a kill; the rest still count
        return events


def read_json(path: Path):
    """A JSON file of the work dir, or None where it is missing or cut short by a kill."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
