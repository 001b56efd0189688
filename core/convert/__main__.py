"""python -m core.convert -i <model> -o <work dir> -cf <output folder> -b 4.0

Flags mirror ExLlamaV2's convert.py. Run the same command again after Ctrl-C
or a crash: it resumes from the work dir.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time

from .job import ConversionError, ConversionJob, ConversionSettings
from .progress import ConversionCancelled, ProgressEvent


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m core.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-i", "--in-dir", required=True, help="demo, a model folder, a .gguf file or a Hub id")
    parser.add_argument("-o", "--out-dir", required=True, help="work dir (resumable)")
    parser.add_argument("-cf", "--compile-full", default=None, help="output model folder (default: <work dir>/output)")
    parser.add_argument("-b", "--bits", type=float, default=4.0, help="target average bits per weight, 2.0 to 8.0")
    parser.add_argument("-hb", "--head-bits", type=int, default=6, help="bits of the output layer (2-8, default 6)")
    parser.add_argument("-c", "--cal-dataset", default=None,
                        help="calibration text: a .txt/.jsonl/.parquet file, or hf:<dataset id>:<file> "
                             "(default: text the model writes itself)")
    parser.add_argument("--calibration-root", action="append", default=None, metavar="DIR",
                        help="read a calibration file only from inside DIR (repeatable; a public server's uploads)")
    parser.add_argument("-m", "--measurement", default=None, help="reuse this measurement.json")
    parser.add_argument("-r", "--dataset-rows", type=int, default=ConversionSettings.rows)
    parser.add_argument("-l", "--length", type=int, default=ConversionSettings.length, help="tokens per calibration row")
    parser.add_argument("-mr", "--measurement-rows", type=int, default=ConversionSettings.measurement_rows)
    parser.add_argument("--objective", default=ConversionSettings.objective, help="bit allocation objective")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
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


def main(argv=None) -> int:
    args = parse_args(argv)
    cancel = threading.Event()

    def on_interrupt(*_):
        if cancel.is_set():
            raise KeyboardInterrupt
        print("\nstopping after the current module (Ctrl-C again to stop at once)...", file=sys.stderr)
        cancel.set()

    signal.signal(signal.SIGINT, on_interrupt)
    try:
        settings = ConversionSettings(
            bpw=args.bits, head_bits=args.head_bits, rows=args.dataset_rows, length=args.length,
            measurement_rows=min(args.measurement_rows, args.dataset_rows), calibration=args.cal_dataset,
            objective=args.objective,
        )
        job = ConversionJob(args.in_dir, args.out_dir, args.compile_full, settings, args.measurement, args.device,
                            ProgressPrinter(), cancel, calibration_roots=args.calibration_root)
        result = job.run()
    except ConversionCancelled as stop:
        print(f"\n{stop}", file=sys.stderr)
        return 130
    except (ValueError, OSError) as error:
        print(f"\nerror: {error}", file=sys.stderr)
        return 2
    print(file=sys.stderr)
    print(f"output: {result.output_dir}")
    print(f"bits per weight: {result.bpw:.4f} (target {args.bits}), head {result.head_bpw:.2f}")
    print(f"size: {result.size_bytes / 1e6:.1f} MB, time: {result.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
