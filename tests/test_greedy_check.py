"""The greedy comparison of kernels and reference (tests/greedy_check.py) fails where it should."""

import pytest
import torch

from tests.greedy_check import assert_same_greedy_choices


def run(steps: int, tie_at: int | None = None) -> tuple[list[int], torch.Tensor]:
    logits = torch.zeros(steps, 16)
    logits[:, 3] = 2.0
    if tie_at is not None:
        logits[tie_at, 5] = 2.0 - 0.01
    return [3] * steps, logits


def test_runs_may_part_at_a_near_tie_only():
    expected, expected_logits = run(20, tie_at=15)
    ours, our_logits = list(expected), expected_logits.clone()
    ours[15] = 5
    assert_same_greedy_choices(ours, our_logits, expected, expected_logits)
    ours[15], ours[10] = 3, 5  # a clear choice
    with pytest.raises(AssertionError, match="step 10"):
        assert_same_greedy_choices(ours, our_logits, expected, expected_logits)


def test_a_tie_too_early_leaves_too_little_compared():
    expected, expected_logits = run(20, tie_at=2)
    ours = list(expected)
    ours[2] = 5
    with pytest.raises(AssertionError, match="parted at step 2"):
        assert_same_greedy_choices(ours, expected_logits, expected, expected_logits)


def test_logits_must_agree_over_the_steps_compared():
    expected, expected_logits = run(20)
    with pytest.raises(AssertionError, match="relative error"):
        assert_same_greedy_choices(expected, expected_logits * 1.1, expected, expected_logits)
