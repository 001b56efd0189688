"""A conversion job: its work dir, the passes in order, and resuming.

The work dir (its files: core/convert/workdir.py) holds everything needed to
continue after Ctrl-C or kill -9. Every file is written under a temporary name
and renamed, and progress files are written last, so a killed run resumes from
the last finished layer and produces the same bytes as an uninterrupted one.
A run holds the work dir's lock: a second conversion into it is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..config import ModelConfig
from ..formats.model_folder import folder_size
from ..loader import load_model
from ..paths import cache_dir
from ..sources import resolve_model_config, resolve_model_source
from ..tokenizer import Tokenizer
from ..weights import weight_files
from . import calibration
from .allocate import DEFAULT_OBJECTIVE, OBJECTIVES, allocate_bits
from .floor import refuse_below_floor
from .layers import MODULE_GROUPS
from .progress import ProgressCallback, ProgressEvent, check_cancel, no_progress
from .targets import TARGETS
from .workdir import WorkDir, read_json

FORMAT_VERSION = 1
# The web page's slider; each format's own floor is in targets.py (EXL3 reaches lower).
MIN_BPW, MAX_BPW = 2.0, 8.0
# What one conversion may ask for, wherever it comes from (the page, the API, the CLI):
# rows x length tokens go through every layer, so these bound its memory and time.
MAX_ROWS = 1024
MIN_LENGTH, MAX_LENGTH = 16, 8192


class ConversionError(ValueError):
    """A conversion cannot start or continue; the message says what to change."""


@dataclass(frozen=True)
class ConversionSettings:
    bpw: float = 4.0
    format: str = "exl2"  # what the output is: "exl2" or "exl3" (targets.py)
    head_bits: int = 6
    # 128 x 512 beat 32 x 512 on the four held-out domains at 2.5, 3.0 and 4.0 bpw (geomean 10.8 vs 13.0,
    # 4.90 vs 4.93, 1.263 vs 1.347: python3 -m bench.quality --rows 128; bench/RESULTS.md), for about
    # the same conversion time on a GPU.
    rows: int = 128  # calibration rows for quantization
    length: int = 512  # tokens per row
    measurement_rows: int = 64  # the first rows, used for measurement
    measurement_eval_rows: int = 16  # of those, the rows each candidate's output error is judged on
    calibration: str | None = None  # a file, "hf:<dataset id>:<file>", or None for self-generated text
    seed: int = 0
    objective: str = DEFAULT_OBJECTIVE
    # How self-generated calibration text is written (calibration.CALIBRATION_RECIPES); unused with a file.
    calibration_recipe: str = "chat"

    def validate(self) -> None:
        target = TARGETS.get(self.format)
        if target is None:
            raise ConversionError(f"the output format must be one of {', '.join(TARGETS)}, got {self.format!r}")
        if not target.min_bpw <= self.bpw <= MAX_BPW:  # also refuses NaN
            raise ConversionError(f"target bits per weight for {self.format.upper()} must be between "
                                  f"{target.min_bpw} and {MAX_BPW}, got {self.bpw}")
        if self.head_bits not in target.head_bits:
            raise ConversionError(f"head bits must be one of {list(target.head_bits)} for {self.format.upper()}, "
                                  f"got {self.head_bits}")
        if not 1 <= self.rows <= MAX_ROWS:
            raise ConversionError(f"calibration rows must be between 1 and {MAX_ROWS}, got {self.rows}")
        if not MIN_LENGTH <= self.length <= MAX_LENGTH:
            raise ConversionError(f"tokens per calibration row must be between {MIN_LENGTH} and {MAX_LENGTH}, "
                                  f"got {self.length}")
        if not 1 <= self.measurement_rows <= self.rows:
            raise ConversionError("measurement rows must be between 1 and the number of calibration rows")
        if not 1 <= self.measurement_eval_rows <= self.measurement_rows:
            raise ConversionError("measurement evaluation rows must be between 1 and the number of measurement rows")
        if self.objective not in OBJECTIVES:
            raise ConversionError(f"the bit allocation objective must be one of {', '.join(OBJECTIVES)}, "
                                  f"got {self.objective!r}")
        if self.calibration_recipe not in calibration.CALIBRATION_RECIPES:
            known = ", ".join(calibration.CALIBRATION_RECIPES)
            raise ConversionError(f"the calibration recipe must be one of {known}, got {self.calibration_recipe!r}")


@dataclass
class ConversionResult:
    output_dir: Path
    bpw: float  # real, from the bits the files hold (head excluded)
    head_bpw: float
    size_bytes: int
    seconds: float
    layer_bits: list[float] = field(default_factory=list)  # bpw of each decoder layer
    layer_errors: list[float] = field(default_factory=list)  # relative output error of each quantized layer


def quantized_weight_count(model) -> int:
    """Weights of every linear that the bpw target covers (the head is counted apart)."""
    return sum(
        linear.weight.numel()
        for layer in model.model.layers
        for group in MODULE_GROUPS
        for linear in getattr(layer, group).children()
    )


def model_fingerprint(folder: Path) -> str:
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for path in weight_files(folder):
        digest.update(f"{path.name}:{path.stat().st_size}".encode())
    return digest.hexdigest()[:16]


def _atomic_json(path: Path, value, indent: int | None = 1) -> None:
    temporary = path.with_name(path.name + ".tmp")
    # indent=None for state rewritten after every layer: json's C encoder only
    # runs without indentation, and the Python one was a visible share of a demo conversion
    # (python3 -m bench.convert_speed --profile).
    temporary.write_text(json.dumps(value, indent=indent), encoding="utf-8")
    os.replace(temporary, path)


def _atomic_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    temporary = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(temporary))
    os.replace(temporary, path)


def _read_tensors(path: Path) -> dict[str, torch.Tensor] | None:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError):
        return None


def _refuse_quantized(source: str, folder: Path, config: ModelConfig) -> None:
    """GPTQ needs the original weights: requantizing a quantized model stacks two roundings."""
    method = (config.raw.get("quantization_config") or {}).get("quant_method")
    if method is None and (folder / "quantize_config.json").is_file():
        method = "gptq"  # AutoGPTQ's own settings file
    if method:
        raise ConversionError(
            f"{source} is already quantized ({method}); convert the original fp16/bf16 model instead"
        )


class ConversionJob:
    """Owns one work dir; `run` does whatever is left and writes the output folder."""

    def __init__(self, source: str, work_dir: str | Path, output_dir: str | Path | None, settings: ConversionSettings,
                 measurement_file: str | Path | None = None, device: str | None = None,
                 on_event: ProgressCallback = no_progress, cancel: threading.Event | None = None,
                 calibration_roots: list[str | Path] | None = None):
        settings.validate()
        self.source = source
        self.work = WorkDir(work_dir)
        self.work_dir = self.work.path
        self.output_dir = Path(output_dir) if output_dir else self.work.default_output
        self.settings = settings
        self.measurement_file = Path(measurement_file) if measurement_file else None
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.on_event = on_event
        self.cancel = cancel
        # Where a calibration file may be read from; None (local use) means anywhere.
        self.calibration_roots = calibration_roots
        self.target = TARGETS[settings.format]

    def emit(self, stage: str, fraction: float, message: str = "", **fields) -> None:
        self._event(ProgressEvent(stage, fraction, message, **fields))

    def _event(self, event: ProgressEvent) -> None:
        # Logged in the work dir too, so a chart drawn after a restart (or of a CLI run) has the earlier layers.
        self.work.append_event(event)
        self.on_event(event)

    # -- setup ----------------------------------------------------------------------------------

    def _open_work_dir(self, folder: Path) -> None:
        job = {
            "format_version": FORMAT_VERSION,
            "model": model_fingerprint(folder),
            "source": self.source,
            "settings": asdict(self.settings),
        }
        existing = read_json(self.work.job_file)
        if existing is not None:
            # A work dir started before a setting existed ran with that setting's default.
            existing["settings"] = {**asdict(ConversionSettings()), **existing.get("settings", {})}
            if existing.get("model") != job["model"]:
                raise ConversionError(
                    f"work dir {self.work_dir} belongs to another model ({existing.get('source')}); "
                    "use a new work dir for this one"
                )
            if existing.get("settings") != job["settings"] or existing.get("format_version") != FORMAT_VERSION:
                changed = sorted(k for k in job["settings"] if existing.get("settings", {}).get(k) != job["settings"][k])
                hint = ""
                if self.work.has_measurement():
                    hint = f"; to reuse its measurement, pass -m {self.work.measurement} with a new work dir"
                raise ConversionError(
                    f"work dir {self.work_dir} was started with other settings ({', '.join(changed) or 'format'})"
                    f"; use a new work dir{hint}"
                )
        else:
            _atomic_json(self.work.job_file, job)

    def _calibration_rows(self, folder: Path, tokenizer: Tokenizer, stop_ids: set[int]) -> torch.Tensor:
        s = self.settings
        signature = {"source": s.calibration or "self-generated", "rows": s.rows, "length": s.length, "seed": s.seed}
        if s.calibration is None:
            signature["recipe"] = s.calibration_recipe

        def make() -> torch.Tensor:
            self.emit("calibration", 0.0, "preparing calibration data")
            if s.calibration is None:
                # Writing text needs the whole model at once, in the compute device's usual precision.
                return calibration.self_generated_rows(
                    load_model(folder, device=self.device), tokenizer, s.rows, s.length, stop_ids, s.seed,
                    progress=lambda done, total: self.emit("calibration", done / total, f"generated {done}/{total} tokens"),
                    recipe=s.calibration_recipe,
                )
            text = calibration.calibration_text(s.calibration, self.calibration_roots)
            return calibration.rows_from_tokens(tokenizer.encode(text, add_special_tokens=False), s.rows, s.length)

        source = make
        if s.calibration is None:
            # The model's own text is slow to write (the calibration stage of
            # python3 -m bench.convert_speed) and serves every size
            # converted from it, so it is also kept beside the model cache.
            key = json.dumps({**signature, "model": model_fingerprint(folder)}, sort_keys=True)
            shared = cache_dir() / "calibration" / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.safetensors"
            source = lambda: calibration.load_or_make_rows(shared, signature, make)  # noqa: E731
        rows = calibration.load_or_make_rows(self.work.calibration, signature, source)
        self.emit("calibration", 1.0, f"{rows.shape[0]} rows of {rows.shape[1]} tokens")
        return rows

    def _embed(self, model, rows: torch.Tensor) -> torch.Tensor:
        return model.model.embed_tokens(rows).to(device=self.device, dtype=torch.float32)

    # -- passes ---------------------------------------------------------------------------------

    def _measure(self, model, rows: torch.Tensor) -> dict:
        if self.measurement_file is not None:
            measurement = read_json(self.measurement_file)
            if not measurement or "measurement" not in measurement:
                raise ConversionError(f"{self.measurement_file} is not a measurement.json")
            # A measurement without the key is EXL2's (ExLlamaV2's and ours before EXL3).
            if measurement.get("format", "exl2") != self.settings.format:
                raise ConversionError(f"{self.measurement_file} measured {measurement.get('format', 'exl2').upper()} "
                                      f"candidates; an {self.settings.format.upper()} conversion needs its own measurement")
            expected = {f"model.layers.{i}.{g}" for i in range(model.config.num_layers) for g in MODULE_GROUPS}
            if set(measurement["measurement"]) != expected:
                raise ConversionError(f"{self.measurement_file} was measured on a model of another shape")
            return measurement["measurement"]
        final = self.work.measurement
        if (done := read_json(final)) is not None:
            return done["measurement"]
        partial_path = self.work.measurement_partial
        states_path = self.work.measure_states
        partial = read_json(partial_path) or {"measurement": {}, "next_layer": 0}
        states = _read_tensors(states_path) if partial["next_layer"] else None
        if states is None:
            partial = {"measurement": {}, "next_layer": 0}
            states = self._embed(model, rows[: self.settings.measurement_rows])
        else:
            states = states["states"].to(self.device)
        layers = model.config.num_layers
        for index in range(partial["next_layer"], layers):
            check_cancel(self.cancel)
            results, states = self.target.measure_layer(model, index, states, self.device,
                                                        self.settings.measurement_eval_rows, self._event, self.cancel)
            partial["measurement"].update(results)
            partial["next_layer"] = index + 1
            _atomic_tensors(states_path, {"states": states})
            _atomic_json(partial_path, partial, indent=None)
        _atomic_json(final, {"measurement": partial["measurement"], "last_module_idx": layers - 1,
                             "format": self.settings.format})
        partial_path.unlink(missing_ok=True)
        states_path.unlink(missing_ok=True)
        return partial["measurement"]

    def _allocate(self, model, measurement: dict):
        total_weights = quantized_weight_count(model)
        allocation = allocate_bits(measurement, total_weights, self.settings.bpw, self.settings.objective)
        module_bpw = {}
        for index, layer in enumerate(model.model.layers):
            for group in MODULE_GROUPS:
                key = f"model.layers.{index}.{group}"
                weights = sum(linear.weight.numel() for linear in getattr(layer, group).children())
                module_bpw[key] = measurement[key][allocation.choice[key]]["total_bits"] / weights
        # The allocation travels as an event so a chart (the web app's, or one fed by --events jsonl)
        # can mark the chosen candidates without reading the work dir.
        self.emit("optimize", 1.0, f"allocated {allocation.bpw:.3f} bpw for a target of {self.settings.bpw}",
                  allocation={"choice": dict(allocation.choice), "bpw": allocation.bpw,
                              "target_bpw": self.settings.bpw, "objective": allocation.objective,
                              "module_bpw": module_bpw})
        settings = []
        for index in range(model.config.num_layers):
            chosen = {}
            for group, names in MODULE_GROUPS.items():
                key = f"model.layers.{index}.{group}"
                candidate = measurement[key][allocation.choice[key]]
                chosen.update({name: self.target.setting_of(candidate[name]) for name in names})
            settings.append(chosen)
        return allocation, settings

    def _quantize(self, model, rows: torch.Tensor, allocation, layer_settings) -> tuple[list[float], torch.Tensor]:
        progress_path = self.work.quant_progress
        states_path = self.work.quant_states
        self.work.quant_folder.mkdir(exist_ok=True)
        progress = read_json(progress_path)
        # A progress file from another allocation (after -m with another target) does not count.
        if not progress or progress.get("choice") != allocation.choice:
            progress = {"choice": allocation.choice, "next_layer": 0, "errors": []}
        states = _read_tensors(states_path) if progress["next_layer"] else None
        if states is None:
            progress.update(next_layer=0, errors=[])
            states = self._embed(model, rows)
        else:
            states = states["states"].to(self.device)
        layers = model.config.num_layers
        for index in range(progress["next_layer"], layers):
            check_cancel(self.cancel)
            tensors, states, error = self.target.quantize_layer(model, index, states, layer_settings[index], self.device)
            _atomic_tensors(self.work.quant_layer(index), tensors)
            _atomic_tensors(states_path, {"states": states})
            progress["next_layer"] = index + 1
            progress["errors"].append(error)
            _atomic_json(progress_path, progress, indent=None)
            self.emit("quantize", (index + 1) / layers, f"quantized layer {index + 1}/{layers}",
                      layer=index, layers=layers, error=error)
        return progress["errors"], states

    def _tensors_to_write(self, model, head: dict[str, torch.Tensor]):
        def fp16(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.to(torch.float16) if tensor.is_floating_point() else tensor

        yield "model.embed_tokens.weight", fp16(model.model.embed_tokens.weight)
        for index in range(model.config.num_layers):
            layer = _read_tensors(self.work.quant_layer(index))
            if layer is None:
                raise ConversionError(f"quantized layer {index} is missing from {self.work_dir}; run again to redo it")
            for name in sorted(layer):
                yield name, fp16(layer[name])
        yield "model.norm.weight", fp16(model.model.norm.weight)
        yield from sorted(head.items())

    # -- the whole job --------------------------------------------------------------------------

    def run(self) -> ConversionResult:
        start = time.perf_counter()
        refuse_below_floor(resolve_model_config(self.source), self.settings.bpw, self.settings.format)
        folder = resolve_model_source(self.source)
        config = ModelConfig.from_folder(folder)
        _refuse_quantized(self.source, folder, config)
        with self.work.lock():
            return self._run_locked(folder, config, start)

    def _run_locked(self, folder: Path, config: ModelConfig, start: float) -> ConversionResult:
        self._open_work_dir(folder)
        check_cancel(self.cancel)
        self.emit("load", 0.0, f"loading {self.source}")
        # The model stays in its storage precision on the CPU; each layer is copied to the
        # compute device in float32 only while it is worked on.
        storage = torch.float32 if config.torch_dtype == "float32" else torch.float16
        model = load_model(folder, device="cpu", dtype=storage)
        tokenizer = Tokenizer.from_folder(folder)
        stop_ids = set(config.eos_token_ids) | ({tokenizer.eos_token_id} - {None})
        rows = self._calibration_rows(folder, tokenizer, stop_ids)
        measurement = self._measure(model, rows)
        allocation, layer_settings = self._allocate(model, measurement)
        errors, states = self._quantize(model, rows, allocation, layer_settings)
        check_cancel(self.cancel)
        self.emit("head", 0.0, f"quantizing the output layer at {self.settings.head_bits} bits")
        head = self.target.quantize_head(model, states, self.settings.head_bits, self.device)
        self.emit("write", 0.0, f"writing {self.output_dir}")
        tensors = list(self._tensors_to_write(model, head))
        quantization_config = {
            **self.target.quantization_config(self.settings.bpw, self.settings.head_bits),
            # ExLlamaV3 names the row length "cols"; both keys are there for either reader.
            "calibration": {
                "rows": self.settings.rows,
                "length": self.settings.length,
                "cols": self.settings.length,
                "dataset": self.settings.calibration or "(self-generated)",
                **({} if self.settings.calibration else {"recipe": self.settings.calibration_recipe}),
            },
            "quantizer": "quantlab",
            "objective": self.settings.objective,
        }
        self.target.write_folder(self.output_dir, folder, tensors, quantization_config)
        result = self._result(dict(tensors), model, errors, time.perf_counter() - start)
        self.emit("done", 1.0, f"{result.output_dir}: {result.bpw:.3f} bpw, {result.size_bytes / 1e6:.1f} MB")
        return result

    def _result(self, tensors: dict[str, torch.Tensor], model, errors: list[float], seconds: float) -> ConversionResult:
        def bits_of(prefix: str, weights: int) -> int:
            stored = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
            return self.target.stored_bits(stored, weights)

        layer_bits, total_bits, total_weights = [], 0, 0
        for index, layer in enumerate(model.model.layers):
            bits = weights = 0
            for group in MODULE_GROUPS:
                for name, linear in getattr(layer, group).named_children():
                    bits += bits_of(f"model.layers.{index}.{group}.{name}", linear.weight.numel())
                    weights += linear.weight.numel()
            layer_bits.append(bits / weights)
            total_bits, total_weights = total_bits + bits, total_weights + weights
        head_weights = model.lm_head.weight.numel()
        head_bpw = 16.0 if "lm_head.weight" in tensors else bits_of("lm_head", head_weights) / head_weights
        return ConversionResult(self.output_dir, total_bits / total_weights, head_bpw,
                                folder_size(self.output_dir), seconds, layer_bits, errors)
