"""Token generation over a preallocated cache, streamed as token ids or text deltas.

The cache survives between calls: a chat's next prompt usually starts with the
previous prompt and answer, so only the new tail is prefilled.

On a GPU the token loop runs one step ahead: the step that feeds a token is
queued before the host has read that token, so the host's wait, its text work
and the next launch all overlap the device's work instead of leaving it idle
between steps.
"""

from __future__ import annotations

import numbers
import threading
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from .cache import ContextOverflowError, KVCache
from .graph_decode import GraphDecoder, graphs_wanted
from .model import CausalLM
from .sampling import SamplingSettings, sample_token_tensor

DEFAULT_CONTEXT = 4096


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens reused from the previous call's cache
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0  # time after the first new token
    stop_reason: str = ""  # eos, stop_string, length, cancelled

    @property
    def time_to_first_token_s(self) -> float:
        return self.prefill_s

    @property
    def prompt_tok_s(self) -> float:
        processed = self.prompt_tokens - self.cached_tokens
        return processed / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def generation_tok_s(self) -> float:
        return (self.new_tokens - 1) / self.decode_s if self.new_tokens > 1 and self.decode_s > 0 else 0.0

    def summary(self) -> str:
        return (
            f"prompt {self.prompt_tokens} tokens ({self.cached_tokens} cached), "
            f"first token {self.time_to_first_token_s * 1000:.0f} ms, "
            f"prompt {self.prompt_tok_s:.1f} tok/s, "
            f"generation {self.new_tokens} tokens at {self.generation_tok_s:.1f} tok/s"
        )


@dataclass
class GenerationChunk:
    text: str  # new text since the previous chunk
    token_ids: list[int] = field(default_factory=list)
    stats: GenerationStats | None = None
    done: bool = False


class Generator:
    """Owns one KV cache for one model; not for use from two threads at once.

    launch_ahead: queue the next decode step before reading the sampled token (the
    default on a GPU). On the CPU a launch is the whole computation, so queuing it
    first only delays the token; tests turn it on there to check its bookkeeping.
    """

    def __init__(self, model: CausalLM, tokenizer, max_seq_len: int | None = None, prefill_chunk: int = 512,
                 launch_ahead: bool | None = None):
        self.model = model
        self.tokenizer = tokenizer  # only stream() needs one; token_stream() works on ids alone
        self.max_seq_len = max_seq_len or min(model.config.max_position_embeddings, DEFAULT_CONTEXT)
        self.prefill_chunk = prefill_chunk
        self.cache = KVCache(model.config, self.max_seq_len, device=model.device, dtype=model.dtype)
        # Exactly the tokens whose keys and values the cache holds for the conversation, in order.
        self._cached_ids: list[int] = []
        self.launch_ahead = model.device.type == "cuda" if launch_ahead is None else launch_ahead
        self._host_token = _HostToken(model.device)
        # On a GPU each decode step replays a captured graph instead of launching kernels one by one.
        self._graphs = None
        if graphs_wanted(model.device):
            self._graphs = GraphDecoder(model, self.cache)

    def reset(self) -> None:
        self.cache.reset()
        self._cached_ids = []

    @torch.inference_mode()
    def _prefill(self, prompt_ids: list[int]) -> tuple[torch.Tensor, int]:
        reuse = _common_prefix(self._cached_ids, prompt_ids)
        # At least one token must run through the model to produce the next logits.
        reuse = min(reuse, len(prompt_ids) - 1)
        # Track what the cache really holds as chunks land, so an interrupted prefill
        # is never mistaken for a complete one by the next call.
        self._cached_ids = prompt_ids[:reuse]
        logits = None
        while len(self._cached_ids) < len(prompt_ids):
            position = len(self._cached_ids)
            chunk = prompt_ids[position : position + self.prefill_chunk]
            ids = torch.tensor([chunk], device=self.model.device)
            logits = self.model(ids, self.cache, position, last_only=True)
            self._cached_ids += chunk
        return logits[0, -1], reuse

    @torch.inference_mode()
    def _decode_step(self, token: torch.Tensor, position: int) -> torch.Tensor:
        """Logits [vocab] of the device token [1] placed at `position`: queued, not waited for."""
        if self._graphs is not None:
            try:
                return self._graphs.step_rows(token, position)[0]
            except RuntimeError as error:  # a capture the driver refuses must not end the chat
                warnings.warn(f"CUDA graph decoding failed, decoding with plain launches instead: {error}",
                              RuntimeWarning, stacklevel=2)
                self._graphs = None
        return self.model(token.view(1, 1), self.cache, position)[0, -1]

    @torch.inference_mode()
    def token_stream(
        self,
        prompt_ids: list[int],
        settings: SamplingSettings | None = None,
        max_new_tokens: int = 256,
        stop_token_ids: Iterable[int] = (),
        cancel: threading.Event | None = None,
        stats: GenerationStats | None = None,
    ) -> Iterator[int]:
        """Yield the new token ids, a stop token excluded; `stats` receives the counts, timings and stop reason.

        A caller may stop at any token (close the iterator or break out of a for loop):
        the cache then holds what _cached_ids lists, and the step queued ahead for the
        last token, if any, is written over by the next call's prefill.
        """
        settings = settings or SamplingSettings()
        stats = stats if stats is not None else GenerationStats()
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a whole number >= 1, not {max_new_tokens!r}")
        if len(prompt_ids) >= self.max_seq_len:
            raise ContextOverflowError(
                f"the prompt has {len(prompt_ids)} tokens but the context holds {self.max_seq_len}; "
                "shorten the conversation or load the model with a longer context"
            )
        max_new_tokens = min(max_new_tokens, self.max_seq_len - len(prompt_ids))
        stop_ids = set(stop_token_ids)
        device = self.model.device
        rng = None
        if settings.seed is not None:
            rng = torch.Generator(device=device).manual_seed(settings.seed)
        stats.prompt_tokens = len(prompt_ids)
        # The repetition penalty's ids stay on the device, so sampling never waits for the host.
        history = torch.zeros(len(prompt_ids) + max(max_new_tokens, 1), dtype=torch.long, device=device)
        history[: len(prompt_ids)] = torch.tensor(prompt_ids, device=device)

        start = time.perf_counter()
        first_token_time = None
        try:
            logits, stats.cached_tokens = self._prefill(prompt_ids)
            while True:
                if cancel is not None and cancel.is_set():
                    stats.stop_reason = "cancelled"
                    return
                position = len(self._cached_ids)
                token_tensor = sample_token_tensor(logits, settings, history[:position], rng)
                history[position : position + 1] = token_tensor
                self._host_token.fetch(token_tensor)
                more = stats.new_tokens + 1 < max_new_tokens  # and so position + 1 < max_seq_len
                ahead = self.launch_ahead and more
                next_logits = None
                # The first token is read before anything is queued behind it, so time to first token
                # stays the device's time (the first step may also capture a graph, which waits).
                if ahead and first_token_time is not None:
                    next_logits = self._decode_step(token_tensor, position)
                token = self._host_token.read()
                if first_token_time is None:
                    first_token_time = time.perf_counter()
                    stats.prefill_s = first_token_time - start
                if token in stop_ids:
                    stats.stop_reason = "eos"
                    return
                stats.new_tokens += 1
                if ahead and next_logits is None:
                    next_logits = self._decode_step(token_tensor, position)
                yield token
                if not more:
                    stats.stop_reason = "length"
                    return
                if next_logits is None:
                    next_logits = self._decode_step(token_tensor, position)
                self._cached_ids.append(token)
                logits = next_logits
        finally:
            # A step queued for a token that was then dropped moved the cache's end past _cached_ids.
            self.cache.length = len(self._cached_ids)
            if first_token_time is not None:
                stats.decode_s = time.perf_counter() - first_token_time

    def stream(
        self,
        prompt_ids: list[int],
        settings: SamplingSettings | None = None,
        max_new_tokens: int = 256,
        stop_token_ids: Iterable[int] = (),
        stop_strings: Iterable[str] = (),
        cancel: threading.Event | None = None,
    ) -> Iterator[GenerationChunk]:
        """Yield text deltas; the last chunk has done=True and the final stats."""
        stop_strings = [s for s in stop_strings if s]
        stats = GenerationStats()
        decoder = self.tokenizer.stream_decoder(skip_special_tokens=True)
        pending_text = ""  # held back while it could be the start of a stop string
        tokens = self.token_stream(prompt_ids, settings, max_new_tokens, stop_token_ids, cancel, stats)
        try:
            for token in tokens:
                pending_text += decoder.push(token)
                emit, pending_text, hit = _split_at_stop(pending_text, stop_strings)
                if emit:
                    yield GenerationChunk(emit, [token])
                if hit:
                    stats.stop_reason = "stop_string"
                    pending_text = ""
                    break
        finally:
            # Settles the cache's bookkeeping and the decode time now, also when our caller stops early.
            tokens.close()
        if stats.stop_reason != "stop_string":
            pending_text += decoder.finish()
        yield GenerationChunk(pending_text, [], stats, done=True)

    def generate(self, prompt_ids: list[int], **kwargs) -> tuple[str, GenerationStats]:
        text, stats = [], None
        for chunk in self.stream(prompt_ids, **kwargs):
            text.append(chunk.text)
            stats = chunk.stats or stats
        return "".join(text), stats


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _split_at_stop(text: str, stop_strings: list[str]) -> tuple[str, str, bool]:
    """(text safe to emit, text to hold back, whether a stop string was found)."""
    if not stop_strings:
        return text, "", False
    first = min((text.find(s) for s in stop_strings if s in text), default=-1)
    if first >= 0:
        return text[:first], "", True
    # Hold back the longest tail that is a prefix of some stop string.
    hold = 0
    for s in stop_strings:
        for length in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:length]):
                hold = max(hold, length)
                break
    return text[: len(text) - hold], text[len(text) - hold :], False


class _HostToken:
    """Brings a sampled token to the host. On a GPU the copy lands in pinned memory behind an
    event, so waiting for it does not also wait for the step queued after it."""

    def __init__(self, device: torch.device):
        self._on_gpu = device.type == "cuda"
        self._token: torch.Tensor | None = None
        if self._on_gpu:
            self._buffer = torch.empty(1, dtype=torch.long, pin_memory=True)
            self._event = torch.cuda.Event()

    def fetch(self, token: torch.Tensor) -> None:
        if self._on_gpu:
            self._buffer.copy_(token, non_blocking=True)
            self._event.record(torch.cuda.current_stream(token.device))
        else:
            self._token = token

    def read(self) -> int:
        if self._on_gpu:
            self._event.synchronize()
            return int(self._buffer[0])
        return int(self._token)
