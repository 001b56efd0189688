"""The command-line tools as a user runs them."""

import math
import subprocess
import sys

import pytest

from tests.tiny_models import sample_text


def run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout)


def test_one_shot_chat_answers_and_prints_the_speed_line(demo_folder):
    done = run("core.chat", "-m", "demo", "-p", "What is the capital of France?", "--greedy", "--max-new-tokens", "40")
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout
    speed = done.stderr.strip().splitlines()[-1]
    assert "first token" in speed and "prompt" in speed and "tok/s" in speed


def test_eval_prints_perplexity_last(demo_folder, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(sample_text(200))
    done = run("core.eval", "-m", "demo", "--data", str(text), "--ctx", "128")
    assert done.returncode == 0, done.stderr
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("ppl ")
    assert 1.0 < float(last.split()[1]) < 1000 and math.isfinite(float(last.split()[1]))


@pytest.mark.parametrize(
    "args, message",
    [
        (("core.chat", "-m", "no/such-model-xyz", "-p", "hi"), "error:"),
        (("core.chat", "-m", "./missing-folder", "-p", "hi"), "error:"),
        (("core.eval", "-m", "demo", "--data", "/nonexistent.txt"), "cannot read"),
        (("core.convert", "-i", "demo", "-o", "/tmp/x-work", "-b", "9"), "between 2.0 and 8.0"),
    ],
)
def test_bad_input_gives_one_readable_line_not_a_traceback(demo_folder, args, message):
    done = run(*args)
    assert done.returncode != 0
    assert message in done.stderr
    assert "Traceback" not in done.stderr
