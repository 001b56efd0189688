"""What the tabs share across sessions: the conversion queue, the loaded-model cache and
chat sessions.

- Conversions run one at a time per device (they fill its memory), in arrival order;
  each waiting job knows its place. A job's work dir is named after what it converts
  and how, so starting the same job again resumes it.
- Loaded models are cached by spec and device, least recently used first out, bounded
  by count and by bytes.
- Each chat session owns its Generator (and so its KV cache); the conversation itself
  lives in the browser and is re-encoded every turn, so a session that lost its
  generator to the bound only pays a new prefill.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from core.convert.job import ConversionError, ConversionJob, ConversionResult, ConversionSettings
from core.convert.progress import ConversionCancelled, ProgressEvent
from core.generator import GenerationStats, Generator
from core.loader import LoadedModel, default_device, load
from core.paths import cache_dir
from core.sampling import SamplingSettings
from core.sources import is_hub_id, resolve_model_source

from .common import scrub

log = logging.getLogger("quantlab.webui")

DEMO = "demo"
DEMO_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
SIDECAR = "quantlab.json"  # what the app knows about a model it made: source, settings, result, quality
CHAT_CONTEXT = 2048

# How much of a whole conversion each stage takes, roughly (measurement dominates), so one
# progress bar and one ETA can span the stages.
STAGE_WEIGHTS = {"load": 0.01, "calibration": 0.04, "measure": 0.60, "optimize": 0.01, "quantize": 0.30,
                 "head": 0.02, "write": 0.02, "done": 0.0}
STAGES = list(STAGE_WEIGHTS)


def models_dir() -> Path:
    return cache_dir() / "models"


def work_root() -> Path:
    return cache_dir() / "work"


# ---------------------------------------------------------------- the models folder


@dataclass(frozen=True)
class LocalModel:
    name: str  # what the dropdowns and the API show
    spec: str  # what core.loader.load takes
    bpw: float | None  # None: unquantized
    meta: dict = field(default_factory=dict, compare=False)


def read_sidecar(folder: Path) -> dict:
    try:
        return json.loads((Path(folder) / SIDECAR).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def write_sidecar(folder: Path, meta: dict) -> None:
    temporary = Path(folder) / f".{SIDECAR}.tmp"
    temporary.write_text(json.dumps(meta, indent=1), encoding="utf-8")
    os.replace(temporary, Path(folder) / SIDECAR)


def local_models(folder: Path | None = None) -> list[LocalModel]:
    """`demo` first, then every complete model folder in the models folder, by name.

    Hidden folders are the writer's and importer's unfinished work; they never show.
    """
    from core.demo import DEMO_FOLDER_NAME

    folder = folder or models_dir()
    found = [LocalModel(DEMO, DEMO, None, {"source": DEMO})]
    if folder.is_dir():
        for child in sorted(folder.iterdir()):
            if child.name.startswith(".") or child.name == DEMO_FOLDER_NAME or not (child / "config.json").is_file():
                continue
            meta = read_sidecar(child)
            bpw = meta.get("result", {}).get("bpw") or _config_bits(child)
            found.append(LocalModel(child.name, str(child), bpw, meta))
    return found


def _config_bits(folder: Path) -> float | None:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    quantization = config.get("quantization_config") or {}
    return quantization.get("bits") if quantization.get("quant_method") == "exl2" else None


def find_local_model(name: str, folder: Path | None = None) -> LocalModel:
    """The listed model called `name` (or with that path); chat only loads what the list shows."""
    name = (name or "").strip()
    for model in local_models(folder):
        if name in (model.name, model.spec):
            return model
    raise ValueError(f"no local model called {name!r}; pick one from the list (quantize a model to add it)")


def base_name(source: str) -> str:
    """A short folder-friendly name for what is being converted."""
    if source == DEMO:
        return DEMO_BASE_MODEL.split("/")[-1]
    path = Path(source)
    if source.lower().endswith(".gguf"):
        name = path.stem
    elif is_hub_id(source) and not path.exists():
        name = source.split("/")[-1]
    else:
        name = path.name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"


def hub_base_model(source: str) -> str | None:
    """The Hub id a model card can name as base_model, when the source has one."""
    if source == DEMO:
        return DEMO_BASE_MODEL
    if is_hub_id(source) and "/" in source and not Path(source).exists():
        return source
    return None


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


# ---------------------------------------------------------------- conversions


@dataclass(frozen=True)
class ConversionRequest:
    source: str  # demo, a folder, a .gguf file or a Hub id
    settings: ConversionSettings
    device: str = field(default_factory=default_device)
    # Only for fetching a gated source; kept in memory, never in a file, a log or a repr.
    token: str | None = field(default=None, repr=False, compare=False)

    def signature(self) -> str:
        described = json.dumps({"source": self.source, "settings": asdict(self.settings)}, sort_keys=True)
        return hashlib.sha256(described.encode()).hexdigest()[:10]

    def measurement_signature(self) -> str:
        """What a measurement depends on: the model and the calibration, not the target."""
        s = self.settings
        described = json.dumps({"source": self.source, "calibration": s.calibration, "rows": s.rows,
                                "length": s.length, "measurement_rows": s.measurement_rows,
                                "measurement_eval_rows": s.measurement_eval_rows, "seed": s.seed}, sort_keys=True)
        return hashlib.sha256(described.encode()).hexdigest()[:10]


QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"


@dataclass(eq=False)
class ConversionTask:
    """One submitted conversion: its place in line, its events as they arrive, how it ended."""

    request: ConversionRequest
    work_dir: Path
    output_dir: Path
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    state: str = QUEUED
    events: list[ProgressEvent] = field(default_factory=list)
    chosen: dict[str, int] = field(default_factory=dict)  # module -> candidate index, once allocated
    result: ConversionResult | None = None
    message: str = ""  # why it failed or stopped, for the user
    cancel: threading.Event = field(default_factory=threading.Event)
    submitted_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    resumed_from: str = ""  # what an earlier run had already finished

    @property
    def finished(self) -> bool:
        return self.state in (DONE, FAILED, CANCELLED)

    @property
    def last_event(self) -> ProgressEvent | None:
        return self.events[-1] if self.events else None

    def record(self, event: ProgressEvent) -> None:
        self.events.append(event)
        if event.stage in ("measure", "quantize"):
            _append_event_log(event_log_path(self.work_dir), event)
        if event.stage == "quantize" and not self.chosen:
            self.chosen = _chosen_from_work_dir(self.work_dir)

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


def event_log_path(work_dir: Path) -> Path:
    # Beside the work dir, not in it: the converter owns what is inside.
    return work_dir.with_name(work_dir.name + ".events.jsonl")


def _append_event_log(path: Path, event: ProgressEvent) -> None:
    try:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(asdict(event)) + "\n")
    except OSError:
        log.warning("could not write the event log %s", path)


def read_event_log(path: Path) -> list[ProgressEvent]:
    events = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return events
    for line in lines:
        try:
            events.append(ProgressEvent(**json.loads(line)))
        except (json.JSONDecodeError, TypeError):
            continue  # a line cut short by a kill; the rest still count
    return events


def _chosen_from_work_dir(work_dir: Path) -> dict[str, int]:
    # The converter records the allocation it quantizes with in quant_progress.json; its
    # events do not carry it (yet), and the chart wants to mark the chosen candidates.
    try:
        progress = json.loads((work_dir / "quant_progress.json").read_text(encoding="utf-8"))
        return {module: int(index) for module, index in progress.get("choice", {}).items()}
    except (OSError, json.JSONDecodeError, AttributeError, ValueError):
        return {}


def _work_dir_progress(work_dir: Path) -> str:
    """A sentence on what an earlier run of this job finished, or ""."""
    if (work_dir / "measurement.json").is_file():
        try:
            layers = json.loads((work_dir / "quant_progress.json").read_text())["next_layer"]
            return f"measurement done, {layers} layers quantized"
        except (OSError, json.JSONDecodeError, KeyError):
            return "measurement done"
    try:
        layers = json.loads((work_dir / "measurement.partial.json").read_text())["next_layer"]
        return f"{layers} layers measured" if layers else ""
    except (OSError, json.JSONDecodeError, KeyError):
        return ""


def run_conversion(task: ConversionTask, models_folder: Path) -> ConversionResult:
    """The default runner: fetch the source, check the disk, reuse a measurement when one
    fits, convert, and record what was made beside the model."""
    request = task.request
    folder = resolve_model_source(request.source, token=request.token)
    check_disk_space(folder, request.settings.bpw, models_folder)
    measurement = reusable_measurement(task.work_dir, request)
    if measurement is not None:
        task.resumed_from = task.resumed_from or f"reusing the measurement of {measurement.parent.name}"
        for event in read_event_log(event_log_path(measurement.parent)):
            if event.stage == "measure":
                task.events.append(event)
    job = ConversionJob(str(folder), task.work_dir, task.output_dir, request.settings, measurement_file=measurement,
                        device=request.device, on_event=task.record, cancel=task.cancel)
    result = job.run()
    task.chosen = _chosen_from_work_dir(task.work_dir) or task.chosen
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
    if (work_dir / "measurement.json").is_file() or (work_dir / "measurement.partial.json").is_file():
        return None  # this job's own, finished or under way, comes first
    prefix = f"{base_name(request.source)}-m{request.measurement_signature()}-"
    for candidate in sorted(work_dir.parent.glob(prefix + "*")):
        if candidate != work_dir and (candidate / "measurement.json").is_file():
            return candidate / "measurement.json"
    return None


Runner = Callable[[ConversionTask, Path], ConversionResult]


class ConversionQueue:
    """Runs conversions one at a time per device, first come first served.

    A worker thread per device; tasks wait in a deque. Submitting the same job (same
    source and settings) while it waits or runs gives back that task, so two people
    pressing Start on one model watch one conversion.
    """

    def __init__(self, models_folder: Path | None = None, work_folder: Path | None = None, runner: Runner = run_conversion):
        self._models_folder = models_folder
        self._work_folder = work_folder
        self.runner = runner
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
        name = f"{base}-exl2-{s.bpw:.2f}bpw-h{s.head_bits}"
        output = self.models_folder / name
        existing = read_sidecar(output) if output.exists() else None
        taken = {t.output_dir for t in self.tasks.values() if t.work_dir != work_dir and not t.finished}
        if (existing is not None and existing.get("settings") != asdict(s)) or output in taken:
            # Same size, other calibration or source: both stay, told apart by the signature.
            output = self.models_folder / f"{name}-{request.signature()[:6]}"
        return work_dir, output

    def submit(self, request: ConversionRequest) -> ConversionTask:
        request.settings.validate()
        work_dir, output = self.paths_for(request)
        with self._lock:
            for task in self.tasks.values():
                if task.work_dir == work_dir and not task.finished:
                    return task
            task = ConversionTask(request, work_dir, output)
            if (made := _already_made(request, output)) is not None:
                # Pressing Quantize again on a finished model shows it rather than redoing the tail of it.
                task.result, task.state = made, DONE
                task.started_at = task.finished_at = task.submitted_at
                task.events.extend(read_event_log(event_log_path(work_dir)))
                task.chosen = _chosen_from_work_dir(work_dir)
                self.tasks[task.id] = task
                return task
            task.resumed_from = _work_dir_progress(work_dir)
            if work_dir.is_dir():
                # A resumed job's chart starts with what the earlier runs measured.
                task.events.extend(read_event_log(event_log_path(work_dir)))
            self.tasks[task.id] = task
            self._waiting.setdefault(request.device, deque()).append(task)
            self._ensure_worker(request.device)
            self._lock.notify_all()
        return task

    def get(self, task_id: str | None) -> ConversionTask | None:
        return self.tasks.get(task_id or "")

    def position(self, task: ConversionTask) -> int:
        """0 while running or finished; otherwise how many jobs run or wait before it."""
        with self._lock:
            waiting = self._waiting.get(task.request.device, deque())
            if task not in waiting:
                return 0
            return list(waiting).index(task) + (1 if task.request.device in self._running else 0)

    def cancel(self, task: ConversionTask) -> None:
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
                task.message = "cancelled; everything finished so far is kept: press Resume to continue from there"
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
                with self._lock:
                    task.finished_at = time.time()
                    self._running.pop(device, None)
                    self._lock.notify_all()



# ---------------------------------------------------------------- loaded models


def model_bytes(loaded: LoadedModel) -> int:
    """Memory the model holds once it has run: its tensors, plus the dense copy the torch
    reference path keeps of every quantized layer."""
    from core.linear import QuantizedLinear

    total = 0
    for tensor in list(loaded.model.parameters()) + [b for b in loaded.model.buffers() if b is not None]:
        total += tensor.numel() * tensor.element_size()
    if loaded.device.type == "cpu":
        for module in loaded.model.modules():
            if isinstance(module, QuantizedLinear):
                total += module.in_features * module.out_features * torch.finfo(module.compute_dtype).bits // 8
    return total


def default_cache_bytes() -> int:
    if gigabytes := os.environ.get("QUANTLAB_MODEL_CACHE_GB"):
        return int(float(gigabytes) * 1024**3)
    if torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(0).total_memory * 0.7)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.4)
    except (ValueError, OSError, AttributeError):
        return 8 * 1024**3


class ModelCache:
    """Loaded models by (spec, device), least recently used evicted past `max_models` or `max_bytes`."""

    def __init__(self, max_models: int = 3, max_bytes: int | None = None, loader=load):
        self.max_models = max_models
        self.max_bytes = max_bytes if max_bytes is not None else default_cache_bytes()
        self.loader = loader
        self._models: OrderedDict[tuple, tuple[LoadedModel, int]] = OrderedDict()
        self._loading: dict[tuple, threading.Lock] = {}
        self._lock = threading.Lock()
        self.on_evict: list[Callable[[LoadedModel], None]] = []

    def get(self, spec: str, device: str | None = None) -> LoadedModel:
        key = (spec, device or default_device())
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key][0]
            loading = self._loading.setdefault(key, threading.Lock())
        # One load per model even when many sessions ask for it at once; others wait for it.
        with loading:
            with self._lock:
                if key in self._models:
                    self._models.move_to_end(key)
                    return self._models[key][0]
            loaded = self.loader(spec, device=key[1])
            size = model_bytes(loaded) if isinstance(loaded, LoadedModel) else 0
            with self._lock:
                self._models[key] = (loaded, size)
                evicted = self._evict(keep=key)
                self._loading.pop(key, None)
        for model in evicted:
            for listener in self.on_evict:
                listener(model)
        return loaded

    def _evict(self, keep: tuple) -> list[LoadedModel]:
        evicted = []
        while len(self._models) > 1 and (
            len(self._models) > self.max_models or sum(size for _, size in self._models.values()) > self.max_bytes
        ):
            oldest = next(k for k in self._models if k != keep)
            evicted.append(self._models.pop(oldest)[0])
        return evicted

    def loaded(self) -> list[str]:
        with self._lock:
            return [spec for spec, _ in self._models]


# ---------------------------------------------------------------- chat sessions


@dataclass(eq=False)
class ChatSession:
    id: str
    lock: threading.Lock = field(default_factory=threading.Lock)  # one answer at a time per session
    cancel: threading.Event = field(default_factory=threading.Event)
    generator: Generator | None = None
    model: LoadedModel | None = None


class ChatSessions:
    """Per-session generators; at most `max_generators` keep their KV cache at once."""

    def __init__(self, max_generators: int = 8, max_seq_len: int = CHAT_CONTEXT):
        self.max_generators = max_generators
        self.max_seq_len = max_seq_len
        self._sessions: OrderedDict[str, ChatSession] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, session_id: str) -> ChatSession:
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                session = self._sessions[session_id] = ChatSession(session_id)
            self._sessions.move_to_end(session_id)
            # Sessions long idle give their cache back; the conversation is in the browser.
            holders = [s for s in self._sessions.values() if s.generator is not None and s is not session]
            for idle in holders[: max(0, len(holders) + 1 - self.max_generators)]:
                if idle.lock.acquire(blocking=False):
                    idle.generator = idle.model = None
                    idle.lock.release()
            return session

    def generator_for(self, session: ChatSession, loaded: LoadedModel) -> Generator:
        """Call with session.lock held."""
        if session.generator is None or session.model is not loaded:
            session.generator = None  # free the old cache before allocating the new one
            session.generator = Generator(loaded.model, loaded.tokenizer,
                                          max_seq_len=min(self.max_seq_len, loaded.model.config.max_position_embeddings))
            session.model = loaded
        return session.generator

    def forget_model(self, loaded: LoadedModel) -> None:
        """An evicted model's memory only comes back once no generator holds it."""
        with self._lock:
            sessions = list(self._sessions.values())
        for session in sessions:
            if session.model is loaded and session.lock.acquire(blocking=False):
                session.generator = session.model = None
                session.lock.release()

    def stop(self, session_id: str) -> None:
        with self._lock:
            session = self._sessions.get(session_id)
        if session is not None:
            session.cancel.set()


def sampling_settings(temperature: float, top_k: int, top_p: float, min_p: float, repetition_penalty: float,
                      seed: int | float | None) -> SamplingSettings:
    """From the UI's sliders; raises ValueError with the user's mistake in words."""
    seed = None if seed in (None, "", -1) else int(seed)
    if seed is not None and seed < 0:
        seed = None
    return SamplingSettings(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p), min_p=float(min_p),
                            repetition_penalty=float(repetition_penalty), seed=seed)


def fit_to_context(loaded: LoadedModel, messages: list[dict], max_seq_len: int, room: int) -> list[int]:
    """The conversation's prompt ids, dropping the oldest turns while no room is left to answer."""
    messages = list(messages)
    first_turn = 1 if messages and messages[0]["role"] == "system" else 0
    while True:
        ids = loaded.tokenizer.encode_chat(messages, add_generation_prompt=True)
        if len(ids) + room <= max_seq_len or len(messages) - first_turn <= 1:
            return ids
        del messages[first_turn : first_turn + 2]


def stream_answer(sessions: ChatSessions, session: ChatSession, loaded: LoadedModel, messages: list[dict],
                  settings: SamplingSettings, max_new_tokens: int) -> Iterator[tuple[str, GenerationStats | None]]:
    """(answer so far, None) per chunk, then (whole answer, stats)."""
    with session.lock:
        session.cancel.clear()
        generator = sessions.generator_for(session, loaded)
        room = min(int(max_new_tokens), generator.max_seq_len // 2)
        prompt_ids = fit_to_context(loaded, messages, generator.max_seq_len, room)
        text = ""
        for chunk in generator.stream(prompt_ids, settings, int(max_new_tokens), loaded.stop_token_ids, (),
                                      session.cancel):
            text += chunk.text
            if chunk.done:
                yield text, chunk.stats
            elif chunk.text:
                yield text, None


def kernel_path(loaded: LoadedModel) -> str:
    if loaded.device.type != "cuda":
        return "CPU reference"
    from core.kernels import dispatch
    from core.linear import QuantizedLinear

    if not any(isinstance(module, QuantizedLinear) for module in loaded.model.modules()):
        return "fp16 (cuBLAS)"
    # Quantized layers take the kernels when the extension built; otherwise their torch twin.
    return "CUDA kernels" if dispatch.enabled(loaded.device) else "torch reference on CUDA"


def memory_in_use(loaded: LoadedModel) -> str:
    if loaded.device.type == "cuda":
        return f"{torch.cuda.memory_allocated(loaded.device) / 1024**3:.2f} GiB GPU memory in use"
    return f"{model_bytes(loaded) / 1024**2:.0f} MiB model memory (CPU)"


def speed_line(stats: GenerationStats, loaded: LoadedModel) -> str:
    stopped = " · stopped" if stats.stop_reason == "cancelled" else ""
    return (
        f"prompt {stats.prompt_tokens} tokens ({stats.cached_tokens} cached) · "
        f"TTFT {stats.time_to_first_token_s * 1000:.0f} ms · "
        f"prompt {stats.prompt_tok_s:.1f} tok/s · "
        f"generation {stats.new_tokens} tokens at {stats.generation_tok_s:.1f} tok/s · "
        f"{memory_in_use(loaded)} · {loaded.device} · {kernel_path(loaded)}{stopped}"
    )
