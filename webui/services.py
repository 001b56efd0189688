"""What one running app shares between its tabs and its API: the conversion queue, the
cache of loaded models and the chat sessions. One of each per app, made in build_app.

Tabs and api.py talk to these, never to each other."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .chats import ChatSessions, ModelCache, sampling_settings, speed_line, stream_answer
from .conversions import ConversionQueue
from .library import DEMO, LocalModel, find_local_model, local_models


@dataclass
class Services:
    conversions: ConversionQueue
    models: ModelCache
    chats: ChatSessions

    @classmethod
    def create(cls, models_folder: Path | None = None, work_folder: Path | None = None) -> "Services":
        services = cls(ConversionQueue(models_folder, work_folder), ModelCache(), ChatSessions())
        # A model evicted from the cache only frees its memory once no chat generator holds it.
        services.models.on_evict.append(services.chats.forget_model)
        return services

    @property
    def models_folder(self) -> Path:
        return self.conversions.models_folder

    def local_models(self) -> list[LocalModel]:
        return local_models(self.models_folder)

    def model_names(self) -> list[str]:
        return [model.name for model in self.local_models()]

    def find_model(self, name: str) -> LocalModel:
        return find_local_model(name, self.models_folder)

    def answer(self, session_id: str, model_name: str, messages: list[dict], temperature, top_k, top_p, min_p,
               repetition_penalty, max_new_tokens, seed) -> Iterator[tuple[str, str | None]]:
        """(answer so far, None) while it streams, then (answer, speed line). Raises ValueError and
        friends with the user's mistake in words; the callers turn them into notices."""
        if not messages or messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
            raise ValueError("type a message first")
        settings = sampling_settings(temperature, top_k, top_p, min_p, repetition_penalty, seed)
        model = self.find_model(model_name or DEMO)
        loaded = self.models.get(model.spec)
        session = self.chats.get(session_id)
        for text, stats in stream_answer(self.chats, session, loaded, messages, settings, int(max_new_tokens)):
            yield text, speed_line(stats, loaded) if stats is not None else None
