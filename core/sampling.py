"""Turning logits into the next token: one row for a chat, many rows at once for calibration.

The filters run in the order transformers applies them (repetition penalty,
temperature, top-k, top-p, min-p), so the same settings mean the same thing
here as in the tools people compare us with.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float = 0.8  # 0 means greedy
    top_k: int = 50  # 0 disables
    top_p: float = 0.9  # 1 disables
    min_p: float = 0.0  # 0 disables
    repetition_penalty: float = 1.0  # 1 disables
    seed: int | None = None

    @classmethod
    def greedy(cls) -> "SamplingSettings":
        return cls(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0)

    def __post_init__(self):
        problems = [f"{name} must be a finite number, not {value!r}" for name, value in self._numbers() if not _finite(value)]
        if problems:
            raise ValueError("; ".join(problems))
        if self.temperature < 0:
            problems.append("temperature must be >= 0")
        if self.top_k < 0 or self.top_k != int(self.top_k):
            problems.append("top_k must be a whole number >= 0")
        if not 0 < self.top_p <= 1:
            problems.append("top_p must be in (0, 1]")
        if not 0 <= self.min_p <= 1:
            problems.append("min_p must be in [0, 1]")
        if self.repetition_penalty <= 0:
            problems.append("repetition_penalty must be > 0")
        if problems:
            raise ValueError("; ".join(problems))

    def _numbers(self):
        return (("temperature", self.temperature), ("top_k", self.top_k), ("top_p", self.top_p),
                ("min_p", self.min_p), ("repetition_penalty", self.repetition_penalty))


def _finite(value) -> bool:
    # NaN passes every comparison check above unnoticed, and a NaN temperature samples garbage.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    return math.isfinite(value)


def apply_repetition_penalty(logits: torch.Tensor, previous_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    if penalty == 1.0 or previous_ids.numel() == 0:
        return logits
    seen = logits.gather(-1, previous_ids)
    # Dividing a negative logit would raise it, so negatives are multiplied instead.
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return logits.scatter(-1, previous_ids, seen)


def filter_logits(logits: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    """Temperature-scaled logits [..., vocab] with each row's excluded tokens at -inf."""
    logits = logits / settings.temperature
    if settings.top_k and settings.top_k < logits.shape[-1]:
        kth = torch.topk(logits, settings.top_k).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if settings.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop the low tail whose mass is at most 1 - top_p; the most likely token always stays.
        drop_sorted = cumulative <= 1 - settings.top_p
        # fill_ takes the value as a kernel argument; item assignment copies it from the host (a sync).
        drop_sorted[..., -1:].fill_(False)
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    if settings.min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < settings.min_p * probs.amax(-1, keepdim=True), float("-inf"))
    return logits


def sample_tokens(
    logits: torch.Tensor, settings: SamplingSettings, rng: torch.Generator | None,
    previous_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each row's next token, long [...] for float32 logits [..., vocab], on the logits' device and
    without waiting for it. previous_ids [..., n]: the ids the repetition penalty looks at."""
    if previous_ids is not None:
        logits = apply_repetition_penalty(logits, previous_ids, settings.repetition_penalty)
    if settings.temperature == 0.0:
        return logits.argmax(-1)
    probs = filter_logits(logits, settings).softmax(-1)
    # torch.multinomial reads its input's validity back to the host; this is the draw it makes
    # for one sample a row (argmax of p / q with q ~ Exp(1), one q per entry in the rows' order),
    # so a seed gives the same tokens as multinomial did, for one row or a batch.
    noise = torch.empty_like(probs).exponential_(1, generator=rng)
    return (probs / noise).argmax(-1)


def sample_token_tensor(
    logits: torch.Tensor, settings: SamplingSettings, previous_ids: torch.Tensor, rng: torch.Generator | None
) -> torch.Tensor:
    """The next token as a long tensor [1] on the logits' device, without waiting for the device.

    logits: float32 [vocab]; previous_ids: the ids the repetition penalty looks at."""
    return sample_tokens(logits, settings, rng, previous_ids).view(1)


def sample_token(
    logits: torch.Tensor, settings: SamplingSettings, previous_ids: torch.Tensor, rng: torch.Generator | None
) -> int:
    """sample_token_tensor, read back to the host."""
    return int(sample_token_tensor(logits, settings, previous_ids, rng))
