"""GPTQ speed on the demo model's matrices, each quantized with every distinct
setting the measurement pass tries on it: one setting at a time against all at once.

    python -m bench.gptq_speed [--device cuda] [--threads N] [--gptq-threads N] [--repeats 2]

Shapes are SmolLM2-135M's (hidden 576, intermediate 1536, 3 KV heads of 64),
so the seven rows add up to the GPTQ work of measuring one demo layer. Weights
are random; the Hessian comes from correlated activations with a few outlier
channels, as a transformer's hidden states look. Columns:

- `before`: one call per setting of quantize_matrix as it was before
  quantize_matrix_multi (read from git at BEFORE_COMMIT; skipped where git or
  the commit is missing), under the ambient torch threads (--threads), which is
  how the measurement pass ran it.
- `per setting`: today's quantize_matrix once per setting.
- `multi`: quantize_matrix_multi with all the settings.

Each figure is the best of --repeats runs (`before` runs once: it is slow).
The last column is the largest relative difference between the per-setting and
the multi results' errors (0 when they agree bit for bit). Writes
bench/results/gptq_speed-<device>-<time>.json for bench/report.py.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import time
import types
from pathlib import Path

import torch

from bench.provenance import write_run
from core.convert import gptq
from core.convert.qparams import ATTENTION_CANDIDATES, MLP_CANDIDATES
from core.formats.exl2.reference import dequantize_exl2

BEFORE_COMMIT = "5799a27af68367b835fed77004721d7712858682"
HIDDEN, INTERMEDIATE, KV = 576, 1536, 192
# name -> (out_features, in_features, candidate list)
DEMO_LINEARS = {
    "q_proj": (HIDDEN, HIDDEN, ATTENTION_CANDIDATES),
    "k_proj": (KV, HIDDEN, ATTENTION_CANDIDATES),
    "v_proj": (KV, HIDDEN, ATTENTION_CANDIDATES),
    "o_proj": (HIDDEN, HIDDEN, ATTENTION_CANDIDATES),
    "gate_proj": (INTERMEDIATE, HIDDEN, MLP_CANDIDATES),
    "up_proj": (INTERMEDIATE, HIDDEN, MLP_CANDIDATES),
    "down_proj": (HIDDEN, INTERMEDIATE, MLP_CANDIDATES),
}


def realistic_hessian(in_features: int, device, tokens: int = 4096, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(in_features, in_features, generator=g) / math.sqrt(in_features) + torch.eye(in_features)
    x = torch.randn(tokens, in_features, generator=g) @ mixing
    x[:, torch.randperm(in_features, generator=g)[: max(1, in_features // 100)]] *= 20.0
    return gptq.accumulate_hessian(None, x.to(device))


def before_module() -> types.ModuleType | None:
    """gptq.py as it was before the multi-setting walk, or None where git cannot give it."""
    root = Path(__file__).resolve().parent.parent
    try:
        source = subprocess.run(
            ["git", "show", f"{BEFORE_COMMIT}:core/convert/gptq.py"], cwd=root, capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    module = types.ModuleType("gptq_before")
    exec(compile(source, "gptq_before.py", "exec"), module.__dict__)
    return module


def timed(fn, device) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, result


def errors_of(stored: list[dict], weight: torch.Tensor, hessian: torch.Tensor) -> list[float]:
    return [gptq.relative_error(weight, dequantize_exl2(s, weight.shape[0]).T.float(), hessian) for s in stored]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="ambient torch threads (default: torch's)")
    parser.add_argument("--gptq-threads", type=int, default=gptq._CPU_THREADS,
                        help="threads the new code uses on CPU; 0 = leave the ambient count")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-before", action="store_true", help="skip the slow pre-change column")
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/gptq_speed-<device>-<time>.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    gptq._CPU_THREADS = args.gptq_threads or None
    before = None if args.no_before else before_module()
    print(f"device {device}, torch threads {torch.get_num_threads()}, GPTQ threads on CPU {gptq._CPU_THREADS or 'ambient'}")

    header = f"| matrix | out x in | settings | before s | per setting s | multi s | speedup vs before | vs per setting | max rel. error diff |"
    print(header)
    print("|" + "---|" * 9)
    totals = [0.0, 0.0, 0.0]
    rows = []
    hessians: dict[int, torch.Tensor] = {}
    for seed, (name, (out_features, in_features, candidates)) in enumerate(DEMO_LINEARS.items()):
        settings = list(dict.fromkeys(c[name] for c in candidates))
        if in_features not in hessians:
            hessians[in_features] = realistic_hessian(in_features, device)
        hessian = hessians[in_features]
        g = torch.Generator().manual_seed(100 + seed)
        weight = (torch.randn(out_features, in_features, generator=g) * 0.02).to(device)
        gptq.quantize_matrix_multi(weight, hessian, settings[:2])  # warm-up (CUDA context, allocator)

        before_s = math.nan
        if before is not None:
            before_s, _ = timed(lambda: [before.quantize_matrix(weight, hessian, s) for s in settings], device)
        single_s, single = min(
            (timed(lambda: [gptq.quantize_matrix(weight, hessian, s) for s in settings], device) for _ in range(args.repeats)),
            key=lambda r: r[0],
        )
        multi_s, multi = min(
            (timed(lambda: gptq.quantize_matrix_multi(weight, hessian, settings), device) for _ in range(args.repeats)),
            key=lambda r: r[0],
        )
        difference = max(abs(a / b - 1) for a, b in zip(errors_of(multi, weight, hessian), errors_of(single, weight, hessian)))
        totals = [totals[0] + before_s, totals[1] + single_s, totals[2] + multi_s]
        print(f"| {name} | {out_features}x{in_features} | {len(settings)} | {before_s:.2f} | {single_s:.2f} | {multi_s:.2f} "
              f"| {before_s / multi_s:.1f}x | {single_s / multi_s:.1f}x | {difference:.1e} |")
        rows.append({"matrix": name, "shape": f"{out_features}x{in_features}", "settings": len(settings),
                     "before_s": None if math.isnan(before_s) else before_s, "per_setting_s": single_s,
                     "multi_s": multi_s, "max_rel_error_diff": difference})
    print(f"| one demo layer | | | {totals[0]:.2f} | {totals[1]:.2f} | {totals[2]:.2f} "
          f"| {totals[0] / totals[2]:.1f}x | {totals[1] / totals[2]:.1f}x | |")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    write_run("gptq_speed", "bench.gptq_speed", name,
              {"torch_threads": torch.get_num_threads(), "gptq_threads": gptq._CPU_THREADS, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
