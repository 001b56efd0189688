"""The peers' own converters on the demo model, scored by our loader on bench.quality's held-out domains.

    python -m bench.peer_quality [--peers exl2 exl3] [--bpw 2.5 3.0 4.0] [--tokens 8192] [--ctx 512]

For the device machine, with the peer packages importable (PYTHONPATH=/tmp/site,
the wheels carried; no internet needed): ExLlamaV2 converts with its default
settings (`python -m exllamav2.conversion.convert_exl2`, its built-in
calibration set, measurement once and reused for the other sizes, also by a
later call with the same --work), ExLlamaV3 with its converter's defaults
(`exllamav3.conversion.convert_model`, as its convert.py calls it).
Both start from the HF folder that core.demo.demo_model_folder() makes, and
each output is scored with our loader and perplexity on exactly the tokens
bench.quality scores, as ratios to fp16, so report.py shows the two side by
side. A format our loader cannot read yet keeps its conversion time and
size, with the reason it was not scored.

Each peer's CUDA extension builds just in time on first import; that build
runs first and is timed apart (kernel_build_s), not counted as conversion.

Time on an H100 (MISSION.md: ExLlamaV2 measures the demo in ~101 s and
quantizes one size in ~130 s, its extension builds in ~2 min): three EXL2
sizes do not fit one 10-minute device call. Split them over calls on the
same warm machine with the same --work (the measurement is kept there), e.g.
`--peers exl2 --bpw 2.5 3.0`, then `--peers exl2 --bpw 4.0`, then `--peers exl3`;
each call writes its own results file, and report.py shows the newest run of
each set of conversions in one table.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

from bench.heldout import DOMAINS
from bench.provenance import write_run
from bench.quality import domain_sources, domain_tokens, score_domains, scored_row
from core.convert.layers import MODULE_GROUPS
from core.demo import demo_model_folder
from core.loader import load_model
from core.tokenizer import Tokenizer

# ExLlamaV3's convert.py drives its converter as parser -> prepare -> main; some
# releases' convert_model module has no __main__ block of its own, so
# `python -m exllamav3.conversion.convert_model` may exit without converting.
# Call the same three where they exist, else run the module as a script.
EXL3_CONVERT = """
import runpy, sys
import exllamav3.conversion.convert_model as convert
if all(hasattr(convert, name) for name in ("parser", "prepare", "main")):
    in_args, job_state, ok, error = convert.prepare(convert.parser.parse_args(sys.argv[1:]))
    if not ok:
        sys.exit(f"exllamav3 refused the job: {error}")
    convert.main(in_args, job_state)
else:
    sys.argv[0] = convert.__file__
    runpy.run_module("exllamav3.conversion.convert_model", run_name="__main__")
"""

PEERS = {
    # name: (package, module that builds its extension, converter command from (source, work, output, bpw))
    "exl2": ("exllamav2", "exllamav2.ext",
             lambda source, work, out, bpw, measurement: [
                 "-m", "exllamav2.conversion.convert_exl2", "-i", str(source), "-o", str(work), "-cf", str(out),
                 "-b", str(bpw), "-nr"] + (["-m", str(measurement)] if measurement else [])),
    "exl3": ("exllamav3", "exllamav3.ext",
             lambda source, work, out, bpw, measurement: [
                 "-c", EXL3_CONVERT, "-i", str(source), "-w", str(work), "-o", str(out), "-b", str(bpw)]),
}
LABELS = {"exl2": "ExLlamaV2", "exl3": "ExLlamaV3"}


def peer_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def run_logged(args: list[str], log: Path, timeout: float) -> tuple[int, float]:
    """Run a peer's command with its output in `log`; (exit status, seconds)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log.open("w") as handle:
        try:
            status = subprocess.run([sys.executable, *args], stdout=handle, stderr=subprocess.STDOUT,
                                    timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            status = 124
    return status, time.perf_counter() - start


def tail(log: Path, lines: int = 3) -> str:
    text = log.read_text(errors="replace").strip().splitlines() if log.is_file() else []
    return " / ".join(line.strip() for line in text[-lines:])


def stored_bpw(output: Path, fp16_model) -> float | None:
    """Bits per decoder-linear weight in the peer's files: every tensor stored under a linear's name."""
    sizes: dict[str, int] = {}
    for path in sorted(output.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                tensor = handle.get_tensor(name)
                sizes[name] = tensor.numel() * tensor.element_size() * 8
    bits = weights = 0
    for index, layer in enumerate(fp16_model.model.layers):
        for group in MODULE_GROUPS:
            for name, linear in getattr(layer, group).named_children():
                prefix = f"model.layers.{index}.{group}.{name}."
                stored = sum(size for key, size in sizes.items() if key.startswith(prefix))
                if not stored:
                    return None  # a layout that names its tensors otherwise
                bits, weights = bits + stored, weights + linear.weight.numel()
    return bits / weights


def score_output(output: Path, device, ids, ctx) -> tuple[dict | None, str]:
    """Perplexity per domain with our loader, or None and why it could not load the folder."""
    try:
        model = load_model(output, device=device)
    except Exception as error:  # noqa: BLE001 - any refusal of a peer's folder is recorded, not fatal
        method = (json.loads((output / "config.json").read_text()).get("quantization_config") or {}).get("quant_method")
        return None, f"our loader cannot read this {method or 'folder'} yet: {type(error).__name__}: {error}"
    ppl = score_domains(model, ids, ctx)
    del model
    return ppl, ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", nargs="+", default=list(PEERS), choices=list(PEERS))
    parser.add_argument("--bpw", type=float, nargs="+", default=[2.5, 3.0, 4.0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=8192, help="held-out tokens scored per domain")
    parser.add_argument("--domains", nargs="+", default=list(DOMAINS), choices=list(DOMAINS))
    parser.add_argument("--work", type=Path, default=Path("/tmp/quantlab-peer-quality"))
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one peer conversion may take")
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    device = torch.device(args.device)

    folder = demo_model_folder()
    ids = domain_tokens(Tokenizer.from_folder(folder), args.domains, args.tokens, args.ctx)
    fp16_model = load_model(folder, device=device, dtype=torch.float16 if device.type == "cuda" else torch.float32)
    fp16 = score_domains(fp16_model, ids, args.ctx)
    rows = [scored_row({"method": "fp16", "format": "fp16", "bpw": 16.0, "seconds": 0.0}, fp16, fp16)]
    builds = {}
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    payload = {"domains": args.domains, "domain_sources": domain_sources(args.domains),
               "tokens_per_domain": args.tokens, "ctx": args.ctx, "kernel_build_s": builds, "rows": rows,
               # What this call converted: report.py shows the newest run of each, side by side.
               "conversions": " ".join(f"{peer} {bpw:g}" for peer in args.peers for bpw in args.bpw)}
    if args.note:
        payload["note"] = args.note
    # Written again after every conversion: a device call's time limit may stop the run between sizes.
    results_file = write_run("peer_quality", "bench.peer_quality", device_name, payload)
    for peer in args.peers:
        package, extension, command = PEERS[peer]
        version = peer_version(package)
        label = f"{LABELS[peer]} {version or '(not installed)'}"
        if version is None:
            print(f"{package} is not importable (PYTHONPATH=/tmp/site with its wheel?); skipping {peer}", flush=True)
            rows += [{"method": f"{label} {bpw}", "format": peer, "target_bpw": bpw, "bpw": bpw, "seconds": None,
                      "skipped": f"{package} not installed"} for bpw in args.bpw]
            continue
        status, builds[peer] = run_logged(["-c", f"import {extension}"], args.work / f"{peer}-build.log", args.timeout)
        print(f"{package} extension build: {builds[peer]:.1f} s (status {status})", flush=True)
        # ExLlamaV2 measures once per model; kept beside the work dirs, a later call (another size, on the
        # same warm machine) reuses it as a user converting several sizes would.
        kept_measurement = args.work / f"{peer}-measurement.json"
        measurement = kept_measurement if peer == "exl2" and kept_measurement.is_file() else None
        for bpw in args.bpw:
            work, output = args.work / f"{peer}-work-{bpw}", args.work / f"{peer}-{bpw}bpw"
            log = args.work / f"{peer}-{bpw}.log"
            for stale in (work, output):  # from an empty work dir, whatever an earlier call left
                shutil.rmtree(stale, ignore_errors=True)
            status, seconds = run_logged(command(folder, work, output, bpw, measurement), log, args.timeout)
            row = {"method": f"{label} {bpw}", "format": peer, "target_bpw": bpw, "bpw": bpw, "seconds": seconds,
                   "measurement_reused": measurement is not None}
            if status != 0 or not (output / "config.json").is_file():
                rows.append({**row, "skipped": f"conversion failed (status {status}): {tail(log)}"})
                print(rows[-1], flush=True)
                write_run("peer_quality", "bench.peer_quality", device_name, payload, out=results_file)
                continue
            if peer == "exl2" and measurement is None and (work / "measurement.json").is_file():
                shutil.copyfile(work / "measurement.json", kept_measurement)
                measurement = kept_measurement
            row["bpw"] = stored_bpw(output, fp16_model) or bpw
            row["size_mb"] = sum(p.stat().st_size for p in output.glob("*.safetensors")) / 1e6
            ppl, why = score_output(output, device, ids, args.ctx)
            rows.append(scored_row(row, ppl, fp16) if ppl else {**row, "skipped": why})
            print(rows[-1], flush=True)
            write_run("peer_quality", "bench.peer_quality", device_name, payload, out=results_file)

    write_run("peer_quality", "bench.peer_quality", device_name, payload, out=results_file)
    for row in rows:
        ratios = " ".join(f"{name} {row['ratio'][name]:.3f}" for name in args.domains) if "ratio" in row else ""
        print(f"{row['method']:28} bpw {row['bpw']:.3f}  {ratios}  "
              + (f"geomean {row['geomean_ratio']:.3f}" if "ratio" in row else f"not scored: {row.get('skipped')}"))


if __name__ == "__main__":
    main()
