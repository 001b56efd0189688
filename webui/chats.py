"""Chats: the cache of loaded models and the chat sessions that answer with them.

- Loaded models are cached by spec and device, least recently used first out, bounded
  by count and by bytes.
- Each chat session owns its Generator (and so its KV cache); the conversation itself
  lives in the browser and is re-encoded every turn, so a session that lost its
  generator to the bound only pays a new prefill.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from core.generator import GenerationStats, Generator
from core.loader import LoadedModel, default_device, load
from core.sampling import SamplingSettings

CHAT_CONTEXT = 2048
CHAT_CONCURRENCY = "chat"  # one limit for the Chat tab, Compare and the /chat endpoint
CHAT_CONCURRENCY_LIMIT = 8


# ---------------------------------------------------------------- loaded models


def default_cache_bytes() -> int:
    if gigabytes := os.environ.get("QUANTLAB_MODEL_CACHE_GB"):
        return int(float(gigabytes) * 1024**3)
    if torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(0).total_memory * 0.7)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.4)
    except (ValueError, OSError, AttributeError):
        return 8 * 1024**3


class ModelCache:
    """Loaded models by (spec, device), least recently used evicted past `max_models` or `max_bytes`."""

    def __init__(self, max_models: int = 3, max_bytes: int | None = None, loader=load):
        self.max_models = max_models
        self.max_bytes = max_bytes if max_bytes is not None else default_cache_bytes()
        self.loader = loader
        self._models: OrderedDict[tuple, tuple[LoadedModel, int]] = OrderedDict()
        self._loading: dict[tuple, threading.Lock] = {}
        self._lock = threading.Lock()
        self.on_evict: list[Callable[[LoadedModel], None]] = []

    def get(self, spec: str, device: str | None = None) -> LoadedModel:
        key = (spec, device or default_device())
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key][0]
            loading = self._loading.setdefault(key, threading.Lock())
        # One load per model even when many sessions ask for it at once; others wait for it.
        with loading:
            with self._lock:
                if key in self._models:
                    self._models.move_to_end(key)
                    return self._models[key][0]
            loaded = self.loader(spec, device=key[1])
            size = loaded.model_bytes() if isinstance(loaded, LoadedModel) else 0
            with self._lock:
                self._models[key] = (loaded, size)
                evicted = self._evict(keep=key)
                self._loading.pop(key, None)
        for model in evicted:
            for listener in self.on_evict:
                listener(model)
        return loaded

    def _evict(self, keep: tuple) -> list[LoadedModel]:
        evicted = []
        while len(self._models) > 1 and (
            len(self._models) > self.max_models or sum(size for _, size in self._models.values()) > self.max_bytes
        ):
            oldest = next(k for k in self._models if k != keep)
            evicted.append(self._models.pop(oldest)[0])
        return evicted

    def loaded(self) -> list[str]:
        with self._lock:
            return [spec for spec, _ in self._models]


# ---------------------------------------------------------------- chat sessions


@dataclass(eq=False)
class ChatSession:
    id: str
    lock: threading.Lock = field(default_factory=threading.Lock)  # one answer at a time per session
    cancel: threading.Event = field(default_factory=threading.Event)
    generator: Generator | None = None
    model: LoadedModel | None = None


class ChatSessions:
    """Per-session generators; at most `max_generators` keep their KV cache at once."""

    def __init__(self, max_generators: int = 8, max_seq_len: int = CHAT_CONTEXT):
        self.max_generators = max_generators
        self.max_seq_len = max_seq_len
        self._sessions: OrderedDict[str, ChatSession] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, session_id: str) -> ChatSession:
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                session = self._sessions[session_id] = ChatSession(session_id)
            self._sessions.move_to_end(session_id)
            # Sessions long idle give their cache back; the conversation is in the browser.
            holders = [s for s in self._sessions.values() if s.generator is not None and s is not session]
            for idle in holders[: max(0, len(holders) + 1 - self.max_generators)]:
                if idle.lock.acquire(blocking=False):
                    idle.generator = idle.model = None
                    idle.lock.release()
            return session

    def generator_for(self, session: ChatSession, loaded: LoadedModel) -> Generator:
        """Call with session.lock held."""
        if session.generator is None or session.model is not loaded:
            session.generator = None  # free the old cache before allocating the new one
            session.generator = Generator(loaded.model, loaded.tokenizer,
                                          max_seq_len=min(self.max_seq_len, loaded.model.config.max_position_embeddings))
            session.model = loaded
        return session.generator

    def forget_model(self, loaded: LoadedModel) -> None:
        """An evicted model's memory only comes back once no generator holds it."""
        with self._lock:
            sessions = list(self._sessions.values())
        for session in sessions:
            if session.model is loaded and session.lock.acquire(blocking=False):
                session.generator = session.model = None
                session.lock.release()

    def stop(self, session_id: str) -> None:
        with self._lock:
            session = self._sessions.get(session_id)
        if session is not None:
            session.cancel.set()


def sampling_settings(temperature: float, top_k: int, top_p: float, min_p: float, repetition_penalty: float,
                      seed: int | float | None) -> SamplingSettings:
    """From the UI's sliders; raises ValueError with the user's mistake in words."""
    seed = None if seed in (None, "", -1) else int(seed)
    if seed is not None and seed < 0:
        seed = None
    return SamplingSettings(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p), min_p=float(min_p),
                            repetition_penalty=float(repetition_penalty), seed=seed)


def fit_to_context(loaded: LoadedModel, messages: list[dict], max_seq_len: int, room: int) -> list[int]:
    """The conversation's prompt ids, without the oldest turns (a user/assistant pair at a time)
    that would leave no room to answer; the system prompt and the last message always stay.

    How many pairs to drop is found by bisection, a few encodings of at most a context's worth of
    turns each: dropping one pair per encoding of the whole history was quadratic in its length
    (2,500 turns took minutes) while it held a chat slot.
    """
    messages = list(messages)
    first_turn = 1 if messages and messages[0]["role"] == "system" else 0
    head, turns = messages[:first_turn], messages[first_turn:]

    def encoded(dropped_pairs: int) -> list[int]:
        return loaded.tokenizer.encode_chat(head + turns[2 * dropped_pairs:], add_generation_prompt=True)

    budget = max_seq_len - room
    most = max(0, (len(turns) - 1) // 2)
    # Every message costs at least a token, so of the turns only the last `budget` can fit.
    low = min(most, max(0, -(-(len(turns) - budget) // 2)))
    ids = encoded(low)
    if len(ids) <= budget:
        return ids
    shortest = encoded(most)
    if len(shortest) > budget:
        return shortest  # even the last message alone is too long; the generator says so
    # Dropping `too_few` pairs leaves too much, dropping `enough` fits: close the gap.
    too_few, enough = low, most
    while enough - too_few > 1:
        middle = (too_few + enough) // 2
        candidate = encoded(middle)
        if len(candidate) <= budget:
            enough, shortest = middle, candidate
        else:
            too_few = middle
    return shortest


def stream_answer(sessions: ChatSessions, session: ChatSession, loaded: LoadedModel, messages: list[dict],
                  settings: SamplingSettings, max_new_tokens: int) -> Iterator[tuple[str, GenerationStats | None]]:
    """(answer so far, None) per chunk, then (whole answer, stats)."""
    with session.lock:
        session.cancel.clear()
        generator = sessions.generator_for(session, loaded)
        room = min(int(max_new_tokens), generator.max_seq_len // 2)
        prompt_ids = fit_to_context(loaded, messages, generator.max_seq_len, room)
        text = ""
        for chunk in generator.stream(prompt_ids, settings, int(max_new_tokens), loaded.stop_token_ids, (),
                                      session.cancel):
            text += chunk.text
            if chunk.done:
                yield text, chunk.stats
            elif chunk.text:
                yield text, None


def speed_line(stats: GenerationStats, loaded: LoadedModel) -> str:
    stopped = " · stopped" if stats.stop_reason == "cancelled" else ""
    return (
        f"prompt {stats.prompt_tokens} tokens ({stats.cached_tokens} cached) · "
        f"TTFT {stats.time_to_first_token_s * 1000:.0f} ms · "
        f"prompt {stats.prompt_tok_s:.1f} tok/s · "
        f"generation {stats.new_tokens} tokens at {stats.generation_tok_s:.1f} tok/s · "
        f"{loaded.memory_in_use()} · {loaded.device} · {loaded.kernel_path()}{stopped}"
    )
