"""What one running app shares between its tabs and its API: the conversion queue, the
cache of loaded models and the chat sessions. One of each per app, made in build_app.

Tabs and api.py talk to these, never to each other."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .access import Access
from .chats import ChatSessions, ModelCache, sampling_settings, speed_line, stream_answer
from .conversions import ConversionQueue
from .library import DEMO, DEMO_MODEL, LocalModel, local_models


@dataclass
class Services:
    conversions: ConversionQueue
    models: ModelCache
    chats: ChatSessions
    access: Access = field(default_factory=Access)

    @classmethod
    def create(cls, models_folder: Path | None = None, work_folder: Path | None = None,
               access: Access | None = None) -> "Services":
        services = cls(ConversionQueue(models_folder, work_folder), ModelCache(), ChatSessions(), access or Access())
        # A model evicted from the cache only frees its memory once no chat generator holds it.
        services.models.on_evict.append(services.chats.forget_model)
        return services

    @property
    def models_folder(self) -> Path:
        return self.conversions.models_folder

    def library(self, request=None, profile=None) -> Path:
        """The visitor's models folder (see access.py): where their conversions go and what they see."""
        return self.access.library(self.models_folder, request, profile)

    def local_models(self, library: Path | None = None) -> list[LocalModel]:
        """The demo and the models of `library`; without one, what every visitor may see."""
        library = library or self.access.shared_library(self.models_folder)
        return local_models(library) if library is not None else [DEMO_MODEL]

    def model_names(self, library: Path | None = None) -> list[str]:
        return [model.name for model in self.local_models(library)]

    def find_model(self, name: str, library: Path | None = None) -> LocalModel:
        """The listed model called `name` (or with that path); chat only loads what the list shows."""
        name = (name or "").strip()
        for model in self.local_models(library):
            if name in (model.name, model.spec):
                return model
        raise ValueError(f"no local model called {name!r}; pick one from the list (quantize a model to add it)")

    def answer(self, session_id: str, model_name: str, messages: list[dict], temperature, top_k, top_p, min_p,
               repetition_penalty, max_new_tokens, seed, library: Path | None = None) -> Iterator[tuple[str, str | None]]:
        """(answer so far, None) while it streams, then (answer, speed line). Raises ValueError and
        friends with the user's mistake in words; the callers turn them into notices."""
        if not messages or messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
            raise ValueError("type a message first")
        settings = sampling_settings(temperature, top_k, top_p, min_p, repetition_penalty, seed)
        model = self.find_model(model_name or DEMO, library)
        loaded = self.models.get(model.spec)
        session = self.chats.get(session_id)
        for text, stats in stream_answer(self.chats, session, loaded, messages, settings, int(max_new_tokens)):
            yield text, speed_line(stats, loaded) if stats is not None else None
