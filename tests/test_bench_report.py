"""bench/RESULTS.md is generated from bench/results/*.json and cannot go stale."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import report

REPO = Path(__file__).resolve().parent.parent


def speed_run(command: str, device: str, date: str, decode_tok_s: float) -> dict:
    row = {"model": "llama2-7b", "layers": 32, "engine": "quantlab", "bpw": 4.0, "real_bpw": 4.04,
           "decode_tok_s": decode_tok_s, "roofline_tok_s": 850.0, "roofline_ratio": decode_tok_s / 850.0,
           "prefill_tok_s": 39000.0, "peak_mem_gib": 4.8}
    matrix = [{"shape": "4096x11008", "bits": 4, "batch": 1, "us": 10.25, "bytes": 22.7e6, "gb_s": 2215.0}]
    return {"benchmark": "speed", "command": command, "device": device, "commit": "abc1234", "date": date,
            "copy_bandwidth_gb_s": 2950.0, "matrix_4096x11008": matrix, "rows": [row]}


def test_results_md_is_what_the_results_folder_generates():
    assert report.render(REPO / "bench" / "results") == (REPO / "bench" / "RESULTS.md").read_text(), (
        "bench/RESULTS.md is stale: run `python -m bench.report` and commit it")


def test_check_flag_passes_on_the_repo_and_fails_on_a_stale_file(tmp_path, capsys):
    assert report.main(["--check"]) == 0
    stale = tmp_path / "RESULTS.md"
    stale.write_text("# Measured results\n\nold numbers\n")
    assert report.main(["--check", "--out", str(stale)]) == 1
    assert "is stale: run `python -m bench.report`" in capsys.readouterr().err


def test_table_shows_the_command_device_and_numbers_of_a_run(tmp_path):
    (tmp_path / "speed-test.json").write_text(json.dumps(
        speed_run("python3 -m bench.speed --quick", "Test GPU 9000", "2026-12-01T10:00:00+00:00", 512.4)))
    text = report.render(tmp_path)
    assert "## Engine speed on CUDA (bench.speed): whole models — Test GPU 9000" in text
    assert "    python3 -m bench.speed --quick\n" in text
    assert "commit abc1234" in text
    assert "| llama2-7b | 32 | quantlab | 4 (4.04) | 512 | – | – | 850 | 60% | 39,000 | 4.8 |" in text
    assert "| 4096×11008 | 1 | 10.2 (75%) |" in text
    assert "## Older runs" not in text


def test_newest_run_is_current_and_older_runs_are_listed_as_history(tmp_path):
    (tmp_path / "speed-a.json").write_text(json.dumps(
        speed_run("python3 -m bench.speed --old", "Test GPU", "2026-12-01T10:00:00+00:00", 400.0)))
    (tmp_path / "speed-b.json").write_text(json.dumps(
        speed_run("python3 -m bench.speed --new", "Test GPU", "2026-12-02T10:00:00+00:00", 500.0)))
    (tmp_path / "speed-c.json").write_text(json.dumps(
        speed_run("python3 -m bench.speed --other-card", "Other GPU", "2026-11-01T10:00:00+00:00", 300.0)))
    text = report.render(tmp_path)
    current, older = text.split("## Older runs")
    assert "`speed-b.json` (2026-12-02, commit abc1234, newest of 2 runs)" in current
    assert "| 500 |" in current and "| 400 |" not in current
    assert "— Other GPU" in current and "| 300 |" in current  # another device is its own current table
    assert "`speed-a.json`" in older and "`python3 -m bench.speed --old`" in older


def test_convert_keeps_the_newest_run_of_each_model(tmp_path):
    def run(model, seconds, date):
        return {"benchmark": "convert", "command": f"python3 -m bench.convert_speed --shape {model}",
                "device": "cpu", "date": date, "model": model, "target_bpw": 4.0, "bpw": 4.0, "seconds": seconds,
                "stages": {"measure": seconds / 2}}
    (tmp_path / "convert-cpu.json").write_text(json.dumps(
        [run("demo", 300.0, "2026-12-01"), run("big", 900.0, "2026-12-01"), run("demo", 250.0, "2026-12-02")]))
    current = report.render(tmp_path).split("## Older runs")[0]
    assert "| demo | not recorded | 2026-12-02 | 4 | 4.000 | 250.0 | 125.0 |" in current
    assert "| big | not recorded | 2026-12-01 | 4 | 4.000 | 900.0 |" in current
    assert "300.0" not in current


def test_a_benchmark_without_a_layout_still_gets_a_table_with_its_command(tmp_path):
    run = {"benchmark": "new_bench", "command": "python3 -m bench.new_bench --fast", "device": "cpu",
           "date": "2026-12-01", "rows": [{"case": "a", "ms": 1.23456, "skipped": None}]}
    (tmp_path / "new_bench-cpu.json").write_text(json.dumps(run))
    text = report.render(tmp_path)
    assert "    python3 -m bench.new_bench --fast\n" in text
    assert "| case | ms | skipped |\n|---|---|---|\n| a | 1.235 | – |" in text


def test_notes_are_copied_in_as_written(tmp_path):
    (tmp_path / "speed.json").write_text(json.dumps(speed_run("python3 -m bench.speed", "G", "2026-12-01", 1.0)))
    (tmp_path / "notes.md").write_text("## What falls short\n\n- decode is slow\n")
    assert "## What falls short\n\n- decode is slow\n" in report.render(tmp_path)


def test_a_run_without_its_command_is_refused_with_the_file_named(tmp_path):
    run = speed_run("python3 -m bench.speed", "G", "2026-12-01", 1.0)
    del run["command"]
    (tmp_path / "speed-x.json").write_text(json.dumps(run))
    with pytest.raises(report.ResultsError, match=r"speed-x.json has no command: every run names its benchmark"):
        report.render(tmp_path)


def test_a_written_run_gets_its_own_file_and_shows_in_the_report(tmp_path, monkeypatch):
    from bench import provenance

    monkeypatch.setattr(provenance, "RESULTS", tmp_path)
    monkeypatch.setenv("QUANTLAB_COMMIT", "feed123")
    payload = speed_run("unused", "unused", "unused", 480.0)
    payload = {key: value for key, value in payload.items() if key not in ("benchmark", "command", "device", "commit", "date")}
    path = provenance.write_run("speed", "bench.speed", "NVIDIA Test GPU", payload, argv=["--quick"])
    assert path.parent == tmp_path and path.name.startswith("speed-Test-GPU-") and path.suffix == ".json"
    record = json.loads(path.read_text())
    assert (record["command"], record["device"], record["commit"]) == (
        "python3 -m bench.speed --quick", "NVIDIA Test GPU", "feed123")
    text = report.render(tmp_path)
    assert "    python3 -m bench.speed --quick\n" in text and "commit feed123" in text and "| 480 |" in text


def test_command_line_is_retypable():
    from bench.provenance import command_line

    assert command_line("bench.speed", ["--models", "llama2-7b", "--note", "two words"]) == (
        "python3 -m bench.speed --models llama2-7b --note 'two words'")


def test_bench_scripts_still_import():
    code = "import bench.speed, bench.quality, bench.convert_speed, bench.gptq4_speed, bench.cpu_decode, bench.report"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, env={"HF_HUB_OFFLINE": "1", "PATH": ""})


def test_a_quality_run_over_several_domains_shows_each_ratio_and_the_geomean(tmp_path):
    def row(method, bpw, ratio, **extra):
        return {"method": method, "bpw": bpw, "seconds": 12.0, "ppl": {"python": 10 * ratio[0], "docs": 20 * ratio[1]},
                "ratio": {"python": ratio[0], "docs": ratio[1]}, "geomean_ratio": (ratio[0] * ratio[1]) ** 0.5, **extra}
    run = {"benchmark": "peer_quality", "command": "python3 -m bench.peer_quality", "device": "G", "date": "2026-12-07",
           "domains": ["python", "docs"], "tokens_per_domain": 8192, "ctx": 512,
           "rows": [row("fp16", 16.0, (1.0, 1.0)), row("ExLlamaV2 0.3.2 2.5", 2.61, (2.0, 8.0)),
                    {"method": "ExLlamaV3 1.6.5 2.5", "bpw": 2.5, "seconds": 40.0,
                     "skipped": "our loader cannot read this exl3 yet"}]}
    (tmp_path / "peer_quality-G.json").write_text(json.dumps(run))
    text = report.render(tmp_path)
    assert "## Peer converters on the same held-out domains (bench.peer_quality) — G" in text
    assert "fp16 perplexity python 10.00, docs 20.00" in text
    assert "| method | real bpw | python | docs | geomean | conversion s | not scored |" in text
    assert "| ExLlamaV2 0.3.2 2.5 | 2.610 | 2.000 | 8.000 | 4.000 | 12.0 |  |" in text
    assert "| ExLlamaV3 1.6.5 2.5 | 2.500 | – | – | – | 40.0 | our loader cannot read this exl3 yet |" in text


def test_peer_conversions_split_over_device_calls_show_in_one_table(tmp_path):
    def run(conversions, method, geomean, date):
        rows = [{"method": "fp16", "bpw": 16.0, "seconds": 0.0, "ratio": {"docs": 1.0}, "geomean_ratio": 1.0},
                {"method": method, "bpw": 2.6, "seconds": 200.0, "ratio": {"docs": geomean}, "geomean_ratio": geomean}]
        return {"benchmark": "peer_quality", "command": f"python3 -m bench.peer_quality --peers {conversions}",
                "device": "G", "date": date, "domains": ["docs"], "tokens_per_domain": 8192, "ctx": 512,
                "conversions": conversions, "rows": rows}
    (tmp_path / "a.json").write_text(json.dumps(run("exl2 2.5", "ExLlamaV2 2.5", 9.0, "2026-12-07T01:00:00")))
    (tmp_path / "b.json").write_text(json.dumps(run("exl3 2.5", "ExLlamaV3 2.5", 3.0, "2026-12-07T02:00:00")))
    (tmp_path / "c.json").write_text(json.dumps(run("exl2 2.5", "ExLlamaV2 2.5", 7.0, "2026-12-07T03:00:00")))
    current = report.render(tmp_path).split("## Older runs")[0]
    assert "| ExLlamaV2 2.5 | 2.600 | 7.000 | 7.000 | 200.0 |" in current  # the newest exl2 run
    assert "| ExLlamaV3 2.5 | 2.600 | 3.000 | 3.000 | 200.0 |" in current
    assert "9.000" not in current and current.count("| fp16 |") == 1
