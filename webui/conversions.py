"""Conversions the app runs for its users: the request a form or the API makes, the task
that watches one conversion, and the queue that runs them.

- Conversions run one at a time per device (they fill its memory), in arrival order;
  each waiting job knows its place. A job's work dir is named after what it converts
  and how, so starting the same job again resumes it.
- Each conversion runs as a child process, `python -m core.convert ... --events jsonl`,
  whose events the task reads line by line. An out-of-memory error or a CUDA fault
  kills the child, not the server and its chats, and the device memory the converter
  held comes back when it exits. Cancel is SIGINT (the child stops after the current
  module, everything kept); Resume runs the same command again.
- Each browser session (or API client) owns what it submitted: only it can cancel, and
  it may have at most MAX_CONVERSIONS_PER_SESSION waiting or running, out of
  MAX_CONVERSIONS at once for the whole app.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import IO

from core.convert.__main__ import EXIT_BAD_INPUT, EXIT_CANCELLED
from core.convert.allocate import DEFAULT_OBJECTIVE
from core.convert.floor import refuse_below_floor
from core.convert.job import ConversionError, ConversionResult, ConversionSettings
from core.convert.progress import ConversionCancelled, ProgressEvent
from core.convert.workdir import WorkDir, event_from_dict
from core.loader import default_device
from core.paths import cache_dir
from core.sources import resolve_model_config, resolve_model_source

from .common import scrub
from .library import base_name, hub_base_model, models_dir, read_sidecar, write_sidecar

log = logging.getLogger("quantlab.webui")

REPO_ROOT = Path(__file__).resolve().parent.parent  # where `python -m core.convert` finds core
POLL_SECONDS = 1.0  # how often a page or an API stream looks at a task
MAX_CONVERSIONS_PER_SESSION = 2  # waiting or running, per browser session / API client
MAX_CONVERSIONS = 8  # waiting or running, for the whole app
GGUF_MAGIC = b"GGUF"
CALIBRATION_SELF, CALIBRATION_FILE, CALIBRATION_HUB = "written by the model", "a text file", "a Hub dataset file"

# How much of a whole conversion each stage takes, roughly (measurement dominates), so one
# progress bar and one ETA can span the stages.
STAGE_WEIGHTS = {"load": 0.01, "calibration": 0.04, "measure": 0.60, "optimize": 0.01, "quantize": 0.30,
                 "head": 0.02, "write": 0.02, "done": 0.0}
STAGES = list(STAGE_WEIGHTS)
RESUME_HINT = "everything finished so far is kept: press Resume to continue from where it stopped"


def work_root() -> Path:
    return cache_dir() / "work"


# ---------------------------------------------------------------- form -> request


def chosen_source(typed: str | None, upload: str | None) -> str:
    """An uploaded GGUF wins over the typed source; an upload that is no GGUF is refused here,
    before it reaches the queue."""
    if upload:
        path = Path(upload)
        with open(path, "rb") as handle:
            magic = handle.read(4)
        if path.suffix.lower() != ".gguf" or magic != GGUF_MAGIC:
            raise ValueError(f"{path.name} is not a GGUF file (a GGUF starts with the bytes 'GGUF'); "
                             "upload a .gguf model file, or type a Hub id or a local folder instead")
        return str(path)
    source = (typed or "").strip()
    if not source:
        raise ValueError('choose a model: "demo", a Hub id like owner/name, a local folder or a .gguf path')
    return source


def calibration_source(kind: str, upload: str | None, dataset: str | None) -> str | None:
    if kind == CALIBRATION_FILE:
        if not upload:
            raise ValueError("upload a calibration text file (.txt, .jsonl with a 'text' field, or .parquet)")
        return str(upload)
    if kind == CALIBRATION_HUB:
        dataset = (dataset or "").strip()
        repo, _, filename = dataset.partition(":")
        if not repo or not filename:
            raise ValueError("give the Hub dataset file as owner/dataset:path/in/repo.parquet")
        return f"hf:{repo}:{filename}"
    return None


def conversion_request(source: str, bpw: float, head_bits, calibration: str | None, rows, length,
                       measurement_rows, objective: str, token: str | None = None, library: Path | None = None,
                       roots: tuple[Path, ...] | None = None, output_format: str = "exl2") -> ConversionRequest:
    """From the form's values; raises ValueError with the user's mistake in words."""
    try:
        bpw, head_bits, rows, length = round(float(bpw), 2), int(head_bits), int(rows), int(length)
        measurement_rows = min(int(measurement_rows), rows)
    except (TypeError, ValueError, OverflowError):
        raise ValueError("bits per weight, head bits, rows, length and measurement rows must be numbers") from None
    settings = ConversionSettings(bpw=bpw, format=(output_format or "exl2").lower(), head_bits=head_bits,
                                  rows=rows, length=length,
                                  measurement_rows=measurement_rows,
                                  measurement_eval_rows=min(ConversionSettings.measurement_eval_rows, measurement_rows),
                                  calibration=calibration, objective=objective or DEFAULT_OBJECTIVE)
    settings.validate()  # the bounds the page, the API and the CLI share
    return ConversionRequest(source, settings, token=(token or "").strip() or None, library=library, roots=roots)


# ---------------------------------------------------------------- disk


def weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def check_disk_space(source_folder: Path, bpw: float, target: Path) -> None:
    """Refuse early when the work dir and the output cannot fit, rather than after an hour."""
    source_bytes = weights_bytes(source_folder)
    # Output ~ weights at bpw/16 of their fp16 size, the work dir about the same again.
    needed = int(source_bytes * bpw / 16 * 2) + 256 * 1024**2
    probe = Path(target)
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise ConversionError(
            f"not enough disk space: converting this model needs about {needed / 1e9:.1f} GB in {probe}, "
            f"only {free / 1e9:.1f} GB is free"
        )


# ---------------------------------------------------------------- requests and tasks


@dataclass(frozen=True)
class ConversionRequest:
    source: str  # demo, a folder, a .gguf file or a Hub id
    settings: ConversionSettings
    device: str = field(default_factory=default_device)
    # Only for fetching a gated source; kept in memory, never in a file, a log or a repr.
    token: str | None = field(default=None, repr=False, compare=False)
    # The visitor's models folder on a public server (None: the app's), and where files it names
    # may be read from (None: anywhere); see access.py.
    library: Path | None = None
    roots: tuple[Path, ...] | None = None

    def signature(self) -> str:
        described = {"source": self.source, "settings": asdict(self.settings)}
        if self.library is not None:
            described["library"] = str(self.library)  # two visitors never share one task or its output
        described = json.dumps(described, sort_keys=True)
        return hashlib.sha256(described.encode()).hexdigest()[:10]

    def measurement_signature(self) -> str:
        """What a measurement depends on: the model and the calibration, not the target."""
        s = self.settings
        described = {"source": self.source, "calibration": s.calibration, "rows": s.rows, "length": s.length,
                     "measurement_rows": s.measurement_rows, "measurement_eval_rows": s.measurement_eval_rows,
                     "seed": s.seed}
        if s.format != "exl2":  # EXL2 work dirs made before EXL3 existed keep their names, and their measurements
            described["format"] = s.format
        described = json.dumps(described, sort_keys=True)
        return hashlib.sha256(described.encode()).hexdigest()[:10]


QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"


@dataclass(eq=False)
class ConversionTask:
    """One submitted conversion: its place in line, its events as they arrive, how it ended."""

    request: ConversionRequest
    work_dir: Path
    output_dir: Path
    owner: str = ""  # the browser session or API client that submitted it
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    state: str = QUEUED
    events: list[ProgressEvent] = field(default_factory=list)
    chosen: dict[str, int] = field(default_factory=dict)  # module -> candidate index, once allocated
    result: ConversionResult | None = None
    message: str = ""  # why it failed or stopped, for the user
    cancel: threading.Event = field(default_factory=threading.Event)
    process: subprocess.Popen | None = field(default=None, repr=False)  # the converter, while it runs
    submitted_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    resumed_from: str = ""  # what an earlier run had already finished
    _places: dict = field(default_factory=dict, repr=False)  # (stage, module/layer) -> index in events

    @property
    def finished(self) -> bool:
        return self.state in (DONE, FAILED, CANCELLED)

    @property
    def last_event(self) -> ProgressEvent | None:
        return self.events[-1] if self.events else None

    def record(self, event: ProgressEvent) -> None:
        if event.allocation:
            self.chosen = {module: int(index) for module, index in event.allocation.get("choice", {}).items()}
        # A run killed between a module's event and its progress file measures that module
        # again on Resume: the chart keeps one point set per module, the latest.
        key = (event.stage, event.module if event.stage == "measure" else event.layer)
        if event.stage in ("measure", "quantize") and key in self._places:
            self.events[self._places[key]] = event
            return
        self._places[key] = len(self.events)
        self.events.append(event)

    def record_all(self, events: Iterable[ProgressEvent]) -> None:
        for event in events:
            self.record(event)

    def overall_fraction(self) -> float:
        event = self.last_event
        if self.state == DONE:
            return 1.0
        if event is None or event.stage not in STAGE_WEIGHTS:
            return 0.0
        index = STAGES.index(event.stage)
        before = sum(STAGE_WEIGHTS[s] for s in STAGES[:index])
        return min(1.0, before + STAGE_WEIGHTS[event.stage] * max(0.0, min(1.0, event.fraction)))

    def eta_seconds(self, now: float | None = None) -> float | None:
        """From the pace so far; None until there is a pace to go by."""
        if self.state != RUNNING or self.started_at is None:
            return None
        done = self.overall_fraction() - self._fraction_at_start
        elapsed = (now or time.time()) - self.started_at
        if done < 0.02 or elapsed < 2:
            return None
        return elapsed / done * (1.0 - self.overall_fraction())

    _fraction_at_start: float = 0.0


# ---------------------------------------------------------------- the converter as a child process


def conversion_command(request: ConversionRequest, work_dir: Path, output_dir: Path,
                       measurement: Path | None = None, source: str | None = None) -> list[str]:
    """The CLI command that runs this conversion (of `source`, default the request's); running it again resumes it."""
    s = request.settings
    # --flag=value for what a user typed, so a value starting with "-" stays a value.
    command = [sys.executable, "-m", "core.convert", f"--in-dir={source or request.source}", f"--out-dir={work_dir}",
               f"--compile-full={output_dir}", f"--format={s.format}", f"--bits={s.bpw!r}", f"--head-bits={s.head_bits}",
               f"--dataset-rows={s.rows}", f"--length={s.length}", f"--measurement-rows={s.measurement_rows}",
               f"--measurement-eval-rows={s.measurement_eval_rows}", f"--seed={s.seed}", f"--objective={s.objective}",
               f"--calibration-recipe={s.calibration_recipe}",
               f"--device={request.device}", "--events=jsonl"]
    if s.calibration:
        command.append(f"--cal-dataset={s.calibration}")
    if measurement is not None:
        command.append(f"--measurement={measurement}")
    command += [f"--calibration-root={root}" for root in request.roots or ()]
    return command


def _keep_tail(stream: IO[str], tail: deque) -> None:
    for line in stream:
        tail.append(line.rstrip("\n"))


def _forward_cancel(task: ConversionTask, process: subprocess.Popen) -> None:
    """Cancel is SIGINT to the child, which stops after the current module with everything kept."""
    while process.poll() is None:
        if task.cancel.wait(0.2):
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGINT)
            return


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return "unknown"


def run_child(task: ConversionTask, command: list[str]) -> ConversionResult:
    """Run the converter, feed its events to the task, and turn how it ended into a result or an error."""
    token = task.request.token
    environment = dict(os.environ)
    if token:
        environment["HF_TOKEN"] = token  # the child's environment only: never argv, never a log
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=environment, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
    task.process = process
    stderr_tail: deque[str] = deque(maxlen=40)
    readers = [threading.Thread(target=_keep_tail, args=(process.stderr, stderr_tail), daemon=True),
               threading.Thread(target=_forward_cancel, args=(task, process), daemon=True)]
    for reader in readers:
        reader.start()
    ending: dict = {}
    for line in process.stdout:
        try:
            values = json.loads(line)
            kind = values.pop("event")
        except (json.JSONDecodeError, AttributeError, KeyError):
            continue  # not an event line (a library's stray output); the events are what count
        if kind == "progress":
            task.record(event_from_dict(values))
        else:
            ending = {"event": kind, **values}
    code = process.wait()
    readers[0].join(5)
    if code not in (0, EXIT_CANCELLED) and stderr_tail:
        log.warning("conversion %s ended with %s; its last output:\n%s", task.id, code,
                    scrub("\n".join(stderr_tail), token))
    if code == 0 and ending.get("event") == "result":
        return ConversionResult(Path(ending["output_dir"]), ending["bpw"], ending["head_bpw"], ending["size_bytes"],
                                ending["seconds"], ending.get("layer_bits", []), ending.get("layer_errors", []))
    if ending.get("event") == "cancelled" or (task.cancel.is_set() and code != 0):
        raise ConversionCancelled("cancelled")
    if code < 0:
        number = -code
        why = " (out of memory, or stopped from outside)" if number == signal.SIGKILL else ""
        raise ConversionError(f"the conversion process was killed (signal {number}, {_signal_name(number)}){why}; "
                              f"{RESUME_HINT}")
    if ending.get("event") == "error":
        message = ending.get("message") or "the conversion failed"
        # Exit code 2: the input needs changing; anything else may well go through on a second try.
        raise ConversionError(message if code == EXIT_BAD_INPUT
                              else f"{message}; the server log has the details; {RESUME_HINT}")
    raise ConversionError(f"the conversion process stopped unexpectedly (exit code {code}); "
                          f"the server log has the details; {RESUME_HINT}")


def run_conversion(task: ConversionTask, models_folder: Path) -> ConversionResult:
    """The default runner: fetch the source, check the disk, reuse a measurement when one
    fits, convert in a child process, and record what was made beside the model."""
    request = task.request
    # The child checks the floor too, but only after this process has fetched the weights.
    refuse_below_floor(resolve_model_config(request.source, request.token, request.roots), request.settings.bpw,
                       request.settings.format)
    folder = resolve_model_source(request.source, token=request.token, allowed_roots=request.roots)
    check_disk_space(folder, request.settings.bpw, models_folder)
    measurement = reusable_measurement(task.work_dir, request)
    if measurement is not None:
        task.resumed_from = task.resumed_from or f"reusing the measurement of {measurement.parent.name}"
        task.record_all(e for e in WorkDir(measurement.parent).read_events() if e.stage == "measure")
    # On a public server the child gets the folder checked here: it must not read a Hub id as a server path.
    source = str(folder) if request.roots is not None else None
    result = run_child(task, conversion_command(request, task.work_dir, task.output_dir, measurement, source))
    write_sidecar(result.output_dir, {
        "source": request.source,
        "base_name": base_name(request.source),
        "base_model": hub_base_model(request.source),
        "settings": asdict(request.settings),
        "result": {"bpw": result.bpw, "head_bpw": result.head_bpw, "size_bytes": result.size_bytes,
                   "seconds": result.seconds, "layer_bits": result.layer_bits, "layer_errors": result.layer_errors},
        "target_bpw": request.settings.bpw,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    })
    return result


def _already_made(request: ConversionRequest, output: Path) -> ConversionResult | None:
    """The finished result in `output`, when that folder was made from this very request."""
    meta = read_sidecar(output) if (output / "config.json").is_file() else {}
    if meta.get("source") != request.source or meta.get("settings") != asdict(request.settings):
        return None
    result = meta.get("result", {})
    try:
        return ConversionResult(output, result["bpw"], result["head_bpw"], result["size_bytes"], result["seconds"],
                                result.get("layer_bits", []), result.get("layer_errors", []))
    except KeyError:
        return None


def reusable_measurement(work_dir: Path, request: ConversionRequest) -> Path | None:
    """A finished measurement of the same model and calibration from another target's work dir."""
    if WorkDir(work_dir).measurement_started():
        return None  # this job's own, finished or under way, comes first
    prefix = f"{base_name(request.source)}-m{request.measurement_signature()}-"
    for candidate in sorted(work_dir.parent.glob(prefix + "*")):
        if candidate != work_dir and WorkDir(candidate).has_measurement():
            return WorkDir(candidate).measurement
    return None


Runner = Callable[[ConversionTask, Path], ConversionResult]


class ConversionQueue:
    """Runs conversions one at a time per device, first come first served.

    A worker thread per device; tasks wait in a deque. Submitting the same job (same
    source and settings) while it waits or runs gives back that task, so two people
    pressing Start on one model watch one conversion.
    """

    def __init__(self, models_folder: Path | None = None, work_folder: Path | None = None, runner: Runner = run_conversion,
                 per_session: int = MAX_CONVERSIONS_PER_SESSION, total: int = MAX_CONVERSIONS):
        self._models_folder = models_folder
        self._work_folder = work_folder
        self.runner = runner
        self.per_session, self.total = per_session, total
        self._lock = threading.Condition()
        self._waiting: dict[str, deque[ConversionTask]] = {}
        self._running: dict[str, ConversionTask] = {}
        self._workers: dict[str, threading.Thread] = {}
        self.tasks: dict[str, ConversionTask] = {}

    @property
    def models_folder(self) -> Path:
        return self._models_folder or models_dir()

    @property
    def work_folder(self) -> Path:
        return self._work_folder or work_root()

    def paths_for(self, request: ConversionRequest) -> tuple[Path, Path]:
        """(work dir, output folder): both follow from the request, so a rerun resumes."""
        base = base_name(request.source)
        work_dir = self.work_folder / f"{base}-m{request.measurement_signature()}-{request.signature()}"
        s = request.settings
        name = f"{base}-{s.format}-{s.bpw:.2f}bpw-h{s.head_bits}"
        library = request.library or self.models_folder
        output = library / name
        existing = read_sidecar(output) if output.exists() else None
        taken = {t.output_dir for t in self.tasks.values() if t.work_dir != work_dir and not t.finished}
        if (existing is not None and existing.get("settings") != asdict(s)) or output in taken:
            # Same size, other calibration or source: both stay, told apart by the signature.
            output = library / f"{name}-{request.signature()[:6]}"
        return work_dir, output

    def submit(self, request: ConversionRequest, owner: str = "") -> ConversionTask:
        """Queue `request` for `owner` (a session); a refusal is a ConversionError that says why."""
        request.settings.validate()
        work_dir, output = self.paths_for(request)
        work = WorkDir(work_dir)
        with self._lock:
            for task in self.tasks.values():
                if task.work_dir == work_dir and not task.finished:
                    return task
            task = ConversionTask(request, work_dir, output, owner)
            if (made := _already_made(request, output)) is not None:
                # Pressing Quantize again on a finished model shows it rather than redoing the tail of it.
                task.result, task.state = made, DONE
                task.started_at = task.finished_at = task.submitted_at
                task.record_all(work.read_events())
                self.tasks[task.id] = task
                return task
            self._check_limits(owner)
            task.resumed_from = work.progress_summary()
            # A resumed job's chart starts with what the earlier runs measured.
            task.record_all(work.read_events())
            self.tasks[task.id] = task
            self._waiting.setdefault(request.device, deque()).append(task)
            self._ensure_worker(request.device)
            self._lock.notify_all()
        return task

    def _check_limits(self, owner: str) -> None:
        """Call with the lock held."""
        unfinished = [task for task in self.tasks.values() if not task.finished]
        mine = sum(task.owner == owner for task in unfinished)
        if mine >= self.per_session:
            raise ConversionError(f"you already have {mine} conversions waiting or running (at most "
                                  f"{self.per_session} at once); wait for one to finish or cancel it")
        if len(unfinished) >= self.total:
            raise ConversionError(f"the conversion queue is full ({len(unfinished)} conversions waiting or running); "
                                  "try again when one has finished")

    def get(self, task_id: str | None) -> ConversionTask | None:
        return self.tasks.get(task_id or "")

    def position(self, task: ConversionTask) -> int:
        """0 while running or finished; otherwise how many jobs run or wait before it."""
        with self._lock:
            waiting = self._waiting.get(task.request.device, deque())
            if task not in waiting:
                return 0
            return list(waiting).index(task) + (1 if task.request.device in self._running else 0)

    def cancel(self, task: ConversionTask, owner: str | None = None) -> None:
        """Stop `task`; with `owner`, only when that session submitted it."""
        if owner is not None and task.owner != owner:
            raise ConversionError("this conversion was started in another session; only that session can cancel it")
        if task.finished:
            return
        with self._lock:
            waiting = self._waiting.get(task.request.device, deque())
            if task in waiting:
                waiting.remove(task)
                task.state, task.message, task.finished_at = CANCELLED, "cancelled before it started", time.time()
                self._lock.notify_all()
                return
        task.cancel.set()

    def wait(self, task: ConversionTask, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while not task.finished:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._lock.wait(left)
        return True

    def _ensure_worker(self, device: str) -> None:
        worker = self._workers.get(device)
        if worker is None or not worker.is_alive():
            worker = threading.Thread(target=self._work, args=(device,), name=f"quantlab-convert-{device}", daemon=True)
            self._workers[device] = worker
            worker.start()

    def _work(self, device: str) -> None:
        while True:
            with self._lock:
                while not self._waiting.get(device):
                    self._lock.wait()
                task = self._waiting[device].popleft()
                self._running[device] = task
                task.state, task.started_at = RUNNING, time.time()
                task._fraction_at_start = task.overall_fraction() if task.events else 0.0
            try:
                task.result = self.runner(task, self.models_folder)
                task.state, task.message = DONE, ""
            except ConversionCancelled:
                task.state = CANCELLED
                task.message = f"cancelled; {RESUME_HINT}"
            except (ValueError, OSError) as error:
                # Our own errors (sources, settings, calibration, disk) are written for users.
                task.state, task.message = FAILED, scrub(str(error), task.request.token)
            except Exception as error:  # the app must keep serving whatever one job does
                log.exception("conversion %s failed", task.id)
                task.state = FAILED
                task.message = scrub(f"the conversion failed unexpectedly ({type(error).__name__}: {error}); "
                                      "the server log has the details", task.request.token)
            finally:
                # The token was needed only to fetch the source.
                task.request = replace(task.request, token=None)
                task.process = None
                with self._lock:
                    task.finished_at = time.time()
                    self._running.pop(device, None)
                    self._lock.notify_all()


