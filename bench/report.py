"""bench/RESULTS.md from bench/results/*.json: the current numbers, one table per benchmark.

    python -m bench.report              # rewrite bench/RESULTS.md
    python -m bench.report --check      # exit 1 when bench/RESULTS.md is not what the JSON files say
    python -m bench.report --results DIR --out FILE

A results file holds one run (a JSON object) or a list of runs (convert_speed
appends one per invocation). Every run names its benchmark, command, device and
date, and the commit it measured where known (bench/provenance.py writes them).
For each benchmark and device the newest run is current; a benchmark whose runs
measure different things (convert: the demo, a 7B shape) keeps the newest run of
each. Older runs are listed at the end. Hand-written prose that must stay current
lives in bench/results/notes.md and is copied in as it is.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RESULTS_DIR = BENCH / "results"
RESULTS_MD = BENCH / "RESULTS.md"
REQUIRED = ("benchmark", "command", "device", "date")


class ResultsError(ValueError):
    """A results file the report cannot place: the message names the file and what it lacks."""


@dataclass(frozen=True)
class Run:
    file: str  # name inside the results folder
    index: int | None  # position in a file that lists several runs
    fields: dict

    @property
    def where(self) -> str:
        return f"`{self.file}`" if self.index is None else f"`{self.file}` [{self.index}]"

    @property
    def commands(self) -> list[str]:
        command = self.fields["command"]
        return command if isinstance(command, list) else [command]

    @property
    def commit(self) -> str:
        if self.fields.get("commit"):
            return self.fields["commit"]
        recorded = self.fields.get("recorded_in")
        return f"not recorded (file from {recorded})" if recorded else "not recorded"


def load_runs(folder: Path) -> list[Run]:
    runs = []
    for path in sorted(folder.glob("*.json")):
        try:
            content = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ResultsError(f"{path.name} is not valid JSON: {error}") from None
        entries = [(None, content)] if isinstance(content, dict) else list(enumerate(content))
        for index, fields in entries:
            missing = [name for name in REQUIRED if not isinstance(fields, dict) or fields.get(name) in (None, "")]
            if missing:
                where = path.name if index is None else f"{path.name} [{index}]"
                raise ResultsError(f"{where} has no {', '.join(missing)}: every run names its benchmark, command, "
                                   "device and date (see bench/provenance.py)")
            runs.append(Run(path.name, index, fields))
    return runs


# Formatting: a missing value reads as a dash, never as "nan" or "None".
def number(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def share(value) -> str:
    return number(value, ".0%")


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def speed_models(run: Run) -> str:
    rows = run.fields["rows"]
    measured_in = any("measured_in" in row for row in rows)
    header = ["model", "layers", "engine", "bpw (real)", "decode tok/s", "graph, host-synced", "eager",
              "roofline tok/s", "ratio", "prefill tok/s", "peak GiB"] + (["measured in"] if measured_in else [])
    body = []
    for row in rows:
        body.append([row["model"], str(row["layers"]), row["engine"], f"{row['bpw']:g} ({row['real_bpw']:.2f})",
                     number(row["decode_tok_s"], ".0f"), number(row.get("decode_graph_sync_tok_s"), ".0f"),
                     number(row.get("decode_eager_tok_s"), ".0f"), number(row["roofline_tok_s"], ".0f"),
                     share(row["roofline_ratio"]), number(row["prefill_tok_s"], ",.0f"),
                     number(row["peak_mem_gib"], ".1f")]
                    + ([row.get("measured_in", "this run")] if measured_in else []))
    return ("Batch-1 decode (graph replay, as the chat generator runs it) and prefill, all layers, random weights; "
            "roofline = copy bandwidth / bytes read per token.\n\n" + table(header, body))


def speed_matrix(run: Run) -> str:
    rows = run.fields["matrix_4096x11008"]
    copy = run.fields["copy_bandwidth_gb_s"]
    widths = list(dict.fromkeys(row["bits"] for row in rows))
    cells: dict[tuple, dict] = {}
    for row in rows:
        cells.setdefault((row["shape"], row["batch"]), {})[row["bits"]] = row
    body = []
    for (shape, batch), by_width in cells.items():
        body.append([shape.replace("x", "×"), str(batch)] + [
            f"{by_width[w]['us']:.1f} ({by_width[w]['gb_s'] / copy:.0%})" if w in by_width else "–" for w in widths])
    header = ["in × out", "batch"] + [f"{w} bits" if isinstance(w, int) else str(w) for w in widths]
    return (f"µs per product (share of the copy bandwidth, {copy / 1000:.2f} TB/s in this run); a graph of 24 calls "
            "over 6 copies, so L2 holds none.\n\n" + table(header, body))


def gptq4_kernels(run: Run) -> str:
    copy = run.fields["copy_bandwidth"] / 1e9
    body = []
    for row in run.fields["rows"]:
        early = "–"
        if "prefetch" in row:
            early = "async copy" if row["async_copy"] else "L2 prefetch" if row["prefetch"] else "none"
        body.append([row["kernel"], ("yes" if row["act_order"] else "no") if "act_order" in row else "–",
                     str(row["batch"]), f"{row['threads']} × {row['blocks_per_sm']}" if "threads" in row else "–",
                     early, f"{row['us']:.1f}", f"{row['gb_s']:.0f}", f"{row['gb_s'] / copy:.0%}"])
    header = ["kernel", "act-order", "batch", "threads × blocks/SM", "weights early", "µs", "GB/s", "of copy"]
    return (f"One 4096×11008 layer, group size 128; copy bandwidth {copy / 1000:.2f} TB/s in this run.\n\n"
            + table(header, body))


def domains_table(run: Run) -> str:
    """A run scored on several held-out domains: each method's perplexity over fp16's, and their geometric mean."""
    fields = run.fields
    domains = fields["domains"]
    rows = sorted(fields["rows"], key=lambda row: (row["bpw"], row["method"]))
    skipped = any("skipped" in row for row in rows)
    body = [[row["method"], number(row.get("bpw"), ".3f")]
            + [number(row["ratio"].get(name), ".3f") if row.get("ratio") else "–" for name in domains]
            + [number(row.get("geomean_ratio"), ".3f"), number(row.get("seconds") or None, ".1f")]
            + ([row.get("skipped", "")] if skipped else [])
            for row in rows]
    header = ["method", "real bpw"] + domains + ["geomean", "conversion s"] + (["not scored"] if skipped else [])
    fp16 = next((row.get("ppl") for row in rows if row["method"] == "fp16"), None)
    reference = ", ".join(f"{name} {fp16[name]:.2f}" for name in domains) if fp16 else "not in this run"
    sources = fields.get("domain_sources") or {}
    where = "; ".join(f"{name}: {sources[name]}" for name in domains if name in sources)
    return (f"Demo model, perplexity over fp16's on the same tokens ({fields['tokens_per_domain']:,} held-out tokens "
            f"per domain, windows of {fields['ctx']}; fp16 perplexity {reference}); geomean over the domains. "
            "Conversion time includes calibration and measurement for the first size of each recipe."
            + (f" Texts: {where}." if where else "") + "\n\n" + table(header, body))


def merged_domains_table(runs: list[Run]) -> str:
    """Runs of one benchmark that each converted part of the sizes (one device call each), as one table."""
    if len(runs) == 1:
        return domains_table(runs[0])
    first = runs[0].fields
    rows = [row for row in first["rows"] if row["method"] == "fp16"]
    rows += [row for run in runs for row in run.fields["rows"] if row["method"] != "fp16"]
    return domains_table(Run(runs[0].file, runs[0].index, {**first, "rows": rows}))


def quality_table(run: Run) -> str:
    if "domains" in run.fields:
        return domains_table(run)
    rows = sorted(run.fields["rows"], key=lambda row: row["bpw"])
    with_run = any("run" in row for row in rows)

    def perplexity(value: float) -> str:
        return f"{value:,.0f}" if value >= 1000 else f"{value:.2f}"

    body = [[row["method"], f"{row['bpw']:.3f}", perplexity(row["ppl"]),
             number(row.get("seconds") or None, ".1f")] + ([str(row.get("run", ""))] if with_run else [])
            for row in rows]
    header = ["method", "real bpw", "perplexity", "conversion s"] + (["command"] if with_run else [])
    tokens, ctx = run.fields.get("heldout_tokens"), run.fields.get("ctx")
    scope = f"{tokens:,} held-out tokens, windows of {ctx}" if tokens and ctx else "held-out text"
    return (f"Demo model, perplexity on {scope}; EXL2 conversion time includes the measurement for the first "
            "size only." + (" The last column is the command's number above." if with_run else "")
            + "\n\n" + table(header, body))


def convert_table(runs: list[Run]) -> str:
    stages = list(dict.fromkeys(stage for run in runs for stage in run.fields["stages"] if stage != "done"))
    body = []
    for run in runs:
        fields = run.fields
        body.append([fields["model"], run.commit, fields["date"][:10], f"{fields['target_bpw']:g}",
                     number(fields.get("bpw"), ".3f"), f"{fields['seconds']:.1f}"]
                    + [number(fields["stages"].get(stage), ".1f") for stage in stages]
                    + [number(fields.get("peak_mem_gib"), ".2f"), number(fields.get("kernel_build_s"), ".1f"),
                       fields.get("note", "")])
    header = (["model", "commit", "date", "target bpw", "real bpw", "total s"] + [f"{s} s" for s in stages]
              + ["peak GPU GiB", "kernel build s", "note"])
    return ("From an empty work dir; the one-time kernel build is timed apart.\n\n" + table(header, body))


def cpu_decode_table(run: Run) -> str:
    fields = run.fields
    body = [[row["engine"], number(row["prefill_tok_s"], ".0f"), number(row["decode_tok_s"], ".1f")]
            for row in fields["rows"]]
    return (f"Demo model, float32, {fields['threads']} threads, {fields['prompt_tokens']}-token chat prompt, "
            f"{fields['new_tokens']} new tokens, greedy, median of {fields['repeats']} alternating runs "
            f"(transformers {fields['transformers']}).\n\n"
            + table(["engine", "prefill tok/s", "decode tok/s"], body))


def generic_table(run: Run) -> str:
    """Any benchmark the report has no layout for yet: its rows' plain fields as columns."""
    rows = [row for row in run.fields.get("rows", []) if isinstance(row, dict)]
    if not rows:
        return "(no rows)"
    columns = list(dict.fromkeys(key for row in rows for key, value in row.items()
                                 if not isinstance(value, (dict, list))))

    def cell(value) -> str:
        return "–" if value is None else format(value, ".4g") if isinstance(value, float) else str(value)

    return table(columns, [[cell(row.get(c)) for c in columns] for row in rows])


@dataclass(frozen=True)
class Layout:
    title: str
    tables: tuple  # (subtitle, function of the current runs -> markdown)
    series: str | None = None  # a field whose values are separate measurements, each with its own newest run


def one(render):
    return lambda runs: render(runs[-1])


LAYOUTS = {
    "speed": Layout("Engine speed on CUDA (bench.speed)", (
        ("whole models", one(speed_models)), ("one matrix, small-batch EXL2 kernel", one(speed_matrix)))),
    "gptq4": Layout("GPTQ 4-bit kernel (bench.gptq4_speed)", (("", one(gptq4_kernels)),)),
    "quality": Layout("Quality per bit (bench.quality)", (("", one(quality_table)),)),
    "peer_quality": Layout("Peer converters on the same held-out domains (bench.peer_quality)",
                           (("", merged_domains_table),), series="conversions"),
    "convert": Layout("Conversion speed (bench.convert_speed)", (("", convert_table),), series="model"),
    "cpu_decode": Layout("CPU decode (bench.cpu_decode)", (("", one(cpu_decode_table)),)),
    "step_ablation": Layout("Decode step with kernels left out (bench.step_ablation)", (("", one(generic_table)),)),
    "read_ceiling": Layout("Read-only kernel ceiling (bench.read_ceiling)", (("", one(generic_table)),)),
    "gptq_speed": Layout("GPTQ on one demo layer's matrices (bench.gptq_speed)", (("", one(generic_table)),)),
}


def order(run: Run) -> tuple:
    # Runs appended to one file are in the order they ran, whatever their dates say to the second.
    return run.fields["date"], run.file, run.index or 0


def runs_by_series(group: list[Run], layout: Layout) -> dict:
    """The group's runs (oldest first) split by the layout's series field; one list for most benchmarks."""
    by_series: dict = {}
    for run in group:
        by_series.setdefault(run.fields.get(layout.series) if layout.series else None, []).append(run)
    return by_series


def source_line(device: str, current: list[Run], by_series: dict, layout: Layout) -> str:
    sources = []
    for run in current:
        runs_of_series = len(by_series[run.fields.get(layout.series) if layout.series else None])
        details = [run.fields["date"][:10], f"commit {run.commit}"]
        if runs_of_series > 1:
            details.append(f"newest of {runs_of_series} runs")
        text = ", ".join(details)
        if run.fields.get("note") and not layout.series:  # a series layout shows each run's note in its table
            text += f"; {run.fields['note']}"
        if run.fields.get("transcribed_from"):
            text += f"; numbers transcribed from {run.fields['transcribed_from']}"
        sources.append(f"{run.where} ({text})")
    return f"Device: {device}. From " + "; ".join(sources) + "."


def render(folder: Path = RESULTS_DIR) -> str:
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in sorted(load_runs(folder), key=order):
        groups.setdefault((run.fields["benchmark"], run.fields["device"]), []).append(run)
    known = list(LAYOUTS)
    keys = sorted(groups, key=lambda key: (known.index(key[0]) if key[0] in known else len(known), key))
    parts = [
        "# Measured results",
        "<!-- Generated by `python -m bench.report` from bench/results/*.json and bench/results/notes.md: "
        "edit those, then run it again. tests/test_bench_report.py fails when this file is stale. -->",
        "The current numbers: for each benchmark and device, the newest run in `bench/results/`, with the command "
        "that produced it. Older runs are listed at the end; the session-by-session narrative of how the numbers "
        "got here is in `bench/history/`.",
        "To add a run: run the command (on the device machine after `source bench/device_setup.sh`, with "
        "`QUANTLAB_COMMIT=<commit>` where the tree has no git directory), commit its new file in `bench/results/`, "
        "then `python -m bench.report`.",
    ]
    older: list[Run] = []
    for benchmark, device in keys:
        layout = LAYOUTS.get(benchmark, Layout(benchmark, (("", one(generic_table)),)))
        by_series = runs_by_series(groups[(benchmark, device)], layout)
        current = sorted((runs[-1] for runs in by_series.values()), key=order)
        older += [run for runs in by_series.values() for run in runs[:-1]]
        commands = "\n".join(f"    {command}" for run in current for command in run.commands)
        for subtitle, make in layout.tables:
            heading = f"## {layout.title}{': ' + subtitle if subtitle else ''} — {device}"
            parts += [heading, commands, source_line(device, current, by_series, layout), make(current)]
    notes = folder / "notes.md"
    if notes.is_file():
        parts.append(notes.read_text().strip())
    if older:
        rows = [[run.fields["benchmark"], run.fields["device"], run.where, run.fields["date"], run.commit,
                 "<br>".join(f"`{command}`" for command in run.commands), run.fields.get("note", "")]
                for run in sorted(older, key=order)]
        parts += ["## Older runs",
                  "Each superseded by a newer run of the same benchmark on the same device (named above); what "
                  "each session changed is told in `bench/history/RESULTS-to-session-12.md` and "
                  "`bench/history/KERNEL_NOTES.md`.",
                  table(["benchmark", "device", "file", "date", "commit", "command", "note"], rows)]
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="folder of results JSON files")
    parser.add_argument("--out", type=Path, default=RESULTS_MD)
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when the file is stale")
    args = parser.parse_args(argv)
    try:
        text = render(args.results)
    except ResultsError as error:
        print(f"bench.report: {error}", file=sys.stderr)
        return 2
    if args.check:
        if not args.out.is_file() or args.out.read_text() != text:
            print(f"{args.out} is stale: run `python -m bench.report` and commit it", file=sys.stderr)
            return 1
        print(f"{args.out} matches {args.results}")
        return 0
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
