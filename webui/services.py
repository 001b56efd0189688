"""What one running app shares between its tabs and its API: the conversion queue, the
cache of loaded models and the chat sessions. One of each per app, made in build_app."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .jobs import ChatSessions, ConversionQueue, ModelCache


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
