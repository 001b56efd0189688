"""Where a benchmark's numbers came from, written into every results JSON.

bench/report.py builds bench/RESULTS.md from these fields alone: which
benchmark, the command line that ran it, the device, the commit of the tree it
measured and when. The device machine gets a copy of the work tree without
its git directory, so there the commit comes from QUANTLAB_COMMIT (launch with
`QUANTLAB_COMMIT=$(git rev-parse --short HEAD)` from the checkout).
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"


def command_line(module: str, argv: list[str] | None = None) -> str:
    """The command as a user would retype it, e.g. `python3 -m bench.speed --quick`."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python3", "-m", module, *(shlex.quote(arg) for arg in args)])


def git_commit() -> str | None:
    """The short commit of the measured tree, with `-dirty` when tracked files differ from it; None if unknown."""
    if os.environ.get("QUANTLAB_COMMIT"):
        return os.environ["QUANTLAB_COMMIT"]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
        clean = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=REPO).returncode == 0
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit if clean else f"{commit}-dirty"


def provenance(benchmark: str, module: str, device: str, argv: list[str] | None = None) -> dict:
    """The fields bench/report.py needs, to merge into the top of a results record."""
    return {
        "benchmark": benchmark,
        "command": command_line(module, argv),
        "device": device,
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_run(benchmark: str, module: str, device: str, payload: dict, out: Path | None = None,
              argv: list[str] | None = None) -> Path:
    """Write one run, provenance first. By default each run gets a file of its own (device and time in the
    name), so a new run never overwrites the one before: bench/report.py shows the newest and lists the rest."""
    record = {**provenance(benchmark, module, device, argv), **payload}
    if out is None:
        slug = device.replace("NVIDIA ", "").replace(" ", "-")
        stamp = datetime.datetime.fromisoformat(record["date"]).strftime("%Y%m%d-%H%M%S")
        out = RESULTS / f"{benchmark}-{slug}-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}", flush=True)
    return out
