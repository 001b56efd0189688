"""Comparing greedy generation on the kernels with the reference path.

On random weights the top two logits of some step can lie closer than fp16
rounding, or the order of a split-K sum (fp32 atomics), can tell apart; there
either token is right, and the two runs continue from different tokens. So the
runs must pick the same token at every step until the reference's choice is
such a near tie, and give the same logits up to there; a run cut short by an
early tie fails, so the check cannot pass on nothing.
"""

import torch

# Logit distance under which two candidates count as tied (the kernels' logits differ from
# the reference's by about 1e-3 here).
NEAR_TIE = 0.05


def assert_same_greedy_choices(ours: list[int], our_logits: torch.Tensor, expected: list[int],
                               expected_logits: torch.Tensor, least_steps: int = 12, tolerance: float = 1e-2) -> None:
    steps = len(expected)
    top2 = expected_logits.float().topk(2, dim=-1).values
    gaps = (top2[:, 0] - top2[:, 1]).tolist()
    compared = steps
    for step in range(steps):
        if ours[step] != expected[step]:
            assert gaps[step] < NEAR_TIE, (
                f"step {step}: token {ours[step]} instead of {expected[step]}, which led by {gaps[step]:.3f}")
            compared = step + 1  # this step's logits came from the same tokens; the next ones did not
            break
    assert compared >= least_steps, f"the runs parted at step {compared - 1}, before {least_steps} steps were compared"
    ours_seen, expected_seen = our_logits[:compared].float(), expected_logits[:compared].float()
    error = float((ours_seen - expected_seen).norm() / expected_seen.norm())
    assert error < tolerance, f"logits over {compared} steps: relative error {error:.2e}"
