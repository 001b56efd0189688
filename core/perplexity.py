"""Perplexity: the yardstick every quantized model is judged by.

The text is cut into non-overlapping windows of `ctx` tokens (a last partial
window is dropped so every window is scored under the same conditions), and
each window is scored on its own, from an empty cache.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .model import CausalLM


def windows(token_ids: list[int], ctx: int) -> torch.Tensor:
    count = len(token_ids) // ctx
    if count == 0:
        raise ValueError(f"the text has {len(token_ids)} tokens, fewer than one window of {ctx}")
    return torch.tensor(token_ids[: count * ctx]).view(count, ctx)


@torch.inference_mode()
def perplexity(
    model: CausalLM, token_ids: list[int], ctx: int = 2048, progress: Callable[[int, int, float], None] | None = None
) -> float:
    rows = windows(token_ids, ctx)
    total_nll, total_tokens = 0.0, 0
    for index, row in enumerate(rows):
        ids = row[None].to(model.device)
        logits = model(ids)[0, :-1]
        nll = F.cross_entropy(logits.float(), ids[0, 1:], reduction="sum")
        total_nll += float(nll)
        total_tokens += ctx - 1
        if progress:
            progress(index + 1, len(rows), math.exp(total_nll / total_tokens))
    return math.exp(total_nll / total_tokens)
