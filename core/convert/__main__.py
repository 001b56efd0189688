"""python -m core.convert -i <model> -o <work dir> -cf <output folder> -b 4.0

Flags mirror ExLlamaV2's convert.py. Run the same command again after Ctrl-C
or a crash: it resumes from the work dir.

--events jsonl writes one JSON object per line to stdout instead of the progress
bar, for a program to read (the web app runs conversions this way):

    {"event": "progress", "stage": "measure", "fraction": 0.25, "message": "...",
     "layer": 0, "layers": 4, "module": "model.layers.0.mlp",
     "candidates": [{"bpw": 2.1, "error": 0.08}, ...], "chosen": null, "error": null, "allocation": null}
    {"event": "progress", "stage": "optimize", ..., "allocation": {"choice": {"model.layers.0.mlp": 5, ...},
     "bpw": 3.98, "target_bpw": 4.0, "objective": "maximin", "module_bpw": {"model.layers.0.mlp": 4.1, ...}}}
    {"event": "result", "output_dir": "...", "bpw": 3.98, "head_bpw": 6.1, "size_bytes": 91000000,
     "seconds": 312.5, "layer_bits": [...], "layer_errors": [...]}
    {"event": "cancelled", "message": "..."}      (exit code 130)
    {"event": "error", "message": "..."}          (exit code 2: the input; 1: anything else)

Stages in order: load, calibration, measure, optimize, quantize, head, write, done.
A measure event carries one module's candidates (bits per weight and relative output
error each); a quantize event one layer's error.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
import traceback
from dataclasses import asdict

import torch

from .job import ConversionJob, ConversionResult, ConversionSettings
from .progress import ConversionCancelled, ProgressEvent

EXIT_CANCELLED, EXIT_BAD_INPUT, EXIT_FAILED = 130, 2, 1


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m core.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-i", "--in-dir", required=True, help="demo, a model folder, a .gguf file or a Hub id")
    parser.add_argument("-o", "--out-dir", required=True, help="work dir (resumable)")
    parser.add_argument("-cf", "--compile-full", default=None, help="output model folder (default: <work dir>/output)")
    parser.add_argument("-f", "--format", choices=("exl2", "exl3"), default=ConversionSettings.format,
                        help="exl2 (ExLlamaV2) or exl3 (ExLlamaV3: trellis codes, better below 4 bpw)")
    parser.add_argument("-b", "--bits", type=float, default=4.0,
                        help="target average bits per weight: 2.0 to 8.0 for EXL2, 1.5 to 8.0 for EXL3")
    parser.add_argument("-hb", "--head-bits", type=int, default=6, help="bits of the output layer (2-8, default 6; EXL3 also 16: unquantized)")
    parser.add_argument("-c", "--cal-dataset", default=None,
                        help="calibration text: a .txt/.jsonl/.parquet file, or hf:<dataset id>:<file> "
                             "(default: text the model writes itself)")
    parser.add_argument("--calibration-recipe", default=ConversionSettings.calibration_recipe,
                        help="what the model writes for its own calibration text: chat (default), wide-chat, free "
                             "or mixed (bench.quality compares them)")
    parser.add_argument("--calibration-root", action="append", default=None, metavar="DIR",
                        help="read a calibration file only from inside DIR (repeatable; a public server's uploads)")
    parser.add_argument("-m", "--measurement", default=None, help="reuse this measurement.json")
    parser.add_argument("-r", "--dataset-rows", type=int, default=ConversionSettings.rows)
    parser.add_argument("-l", "--length", type=int, default=ConversionSettings.length, help="tokens per calibration row")
    parser.add_argument("-mr", "--measurement-rows", type=int, default=ConversionSettings.measurement_rows)
    parser.add_argument("-er", "--measurement-eval-rows", type=int, default=ConversionSettings.measurement_eval_rows,
                        help="of the measurement rows, those each candidate's error is judged on")
    parser.add_argument("--seed", type=int, default=ConversionSettings.seed, help="seed of self-generated calibration")
    parser.add_argument("--objective", default=ConversionSettings.objective, help="bit allocation objective")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--events", choices=("text", "jsonl"), default="text",
                        help="text: a progress bar on stderr (default); jsonl: one JSON object per line on stdout")
    return parser.parse_args(argv)


class ProgressPrinter:
    def __init__(self):
        self.stage = None
        self.stage_start = time.perf_counter()

    def __call__(self, event: ProgressEvent) -> None:
        if event.stage != self.stage:
            if self.stage is not None:
                print(file=sys.stderr)
            self.stage, self.stage_start = event.stage, time.perf_counter()
        elapsed = time.perf_counter() - self.stage_start
        eta = elapsed / event.fraction * (1 - event.fraction) if 0 < event.fraction < 1 else 0.0
        bar = "#" * int(event.fraction * 30)
        line = f"\r{event.stage:<11} [{bar:<30}] {event.fraction * 100:5.1f}%  {event.message[:60]:<60}"
        if eta:
            line += f" ETA {eta:4.0f} s"
        print(line, end="", file=sys.stderr, flush=True)


class JsonLines:
    """--events jsonl: the real stdout carries only event lines; any stray print goes to stderr."""

    def __init__(self):
        self.stream = sys.stdout
        sys.stdout = sys.stderr

    def write(self, kind: str, **fields) -> None:
        # One whole line per write, flushed: the reader is a pipe, and a kill must cut between lines.
        self.stream.write(json.dumps({"event": kind, **fields}) + "\n")
        self.stream.flush()

    def __call__(self, event: ProgressEvent) -> None:
        self.write("progress", **asdict(event))


def result_fields(result: ConversionResult) -> dict:
    return {"output_dir": str(result.output_dir), "bpw": result.bpw, "head_bpw": result.head_bpw,
            "size_bytes": result.size_bytes, "seconds": result.seconds, "layer_bits": result.layer_bits,
            "layer_errors": result.layer_errors}


def main(argv=None) -> int:
    args = parse_args(argv)
    jsonl = JsonLines() if args.events == "jsonl" else None
    try:
        return convert(args, jsonl)
    finally:
        if jsonl:
            sys.stdout = jsonl.stream


def convert(args: argparse.Namespace, jsonl: JsonLines | None) -> int:
    cancel = threading.Event()

    def on_interrupt(*_):
        if cancel.is_set():
            raise KeyboardInterrupt
        print("\nstopping after the current module (Ctrl-C again to stop at once)...", file=sys.stderr)
        cancel.set()

    signal.signal(signal.SIGINT, on_interrupt)

    def failed(message: str, code: int) -> int:
        if jsonl:
            jsonl.write("error", message=message)
        else:
            print(f"\nerror: {message}", file=sys.stderr)
        return code

    try:
        measurement_rows = min(args.measurement_rows, args.dataset_rows)
        settings = ConversionSettings(
            bpw=args.bits, format=args.format, head_bits=args.head_bits, rows=args.dataset_rows, length=args.length,
            measurement_rows=measurement_rows, measurement_eval_rows=min(args.measurement_eval_rows, measurement_rows),
            calibration=args.cal_dataset, seed=args.seed, objective=args.objective,
            calibration_recipe=args.calibration_recipe,
        )
        job = ConversionJob(args.in_dir, args.out_dir, args.compile_full, settings, args.measurement, args.device,
                            jsonl or ProgressPrinter(), cancel, calibration_roots=args.calibration_root)
        result = job.run()
    except ConversionCancelled as stop:
        if jsonl:
            jsonl.write("cancelled", message=str(stop))
        else:
            print(f"\n{stop}", file=sys.stderr)
        return EXIT_CANCELLED
    except (MemoryError, torch.OutOfMemoryError):
        traceback.print_exc()
        return failed("out of memory: use fewer calibration rows or shorter rows, or free the device", EXIT_FAILED)
    except (ValueError, OSError) as error:
        return failed(str(error) or type(error).__name__, EXIT_BAD_INPUT)
    except Exception as error:  # noqa: BLE001 - a reader of --events jsonl still gets a last line
        if not jsonl:
            raise
        traceback.print_exc()
        return failed(f"the conversion failed unexpectedly ({type(error).__name__}: {error})", EXIT_FAILED)
    if jsonl:
        jsonl.write("result", **result_fields(result))
        return 0
    print(file=sys.stderr)
    print(f"output: {result.output_dir}")
    print(f"bits per weight: {result.bpw:.4f} (target {args.bits}), head {result.head_bpw:.2f}")
    print(f"size: {result.size_bytes / 1e6:.1f} MB, time: {result.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
