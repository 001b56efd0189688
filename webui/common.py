"""Small helpers every tab uses: turning errors into sentences, chat history into
messages, and telling a Space from a laptop."""

from __future__ import annotations

import html
import logging
import os
from collections.abc import Callable

import torch

log = logging.getLogger("quantlab.webui")


def on_space() -> bool:
    # Hugging Face sets SPACE_ID in every Space's environment.
    return bool(os.environ.get("SPACE_ID"))


def readable(error: BaseException) -> str:
    """What the user should read for an error: our own errors are written for them; anything
    else is logged in full on the server and summarised on the page."""
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return ("not enough memory for this model: pick a smaller one or a lower bpw, "
                "or close other chats (loaded models are evicted least recently used first)")
    if isinstance(error, (ValueError, OSError)):
        return str(error) or type(error).__name__
    log.error("unexpected error in the web app", exc_info=error)
    return f"something went wrong ({type(error).__name__}); the server log has the details"


def scrub(text: str, secret: str | None) -> str:
    return text.replace(secret, "***") if secret else text


def notice(text: str, kind: str = "error") -> str:
    """An HTML box the page styles for both themes (see assets/style.css)."""
    return f'<div class="ql-notice ql-{kind}">{html.escape(text)}</div>' if text else ""


def message_text(content) -> str:
    """A Chatbot message's text: Gradio 6 hands content back as a list of typed parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text", "") if content.get("type", "text") == "text" else ""
    if isinstance(content, (list, tuple)):
        return "".join(message_text(part) for part in content)
    return ""


def history_messages(history: list[dict], system: str | None = None) -> list[dict]:
    """Chatbot history -> the plain {"role", "content"} list core.tokenizer renders."""
    messages = [{"role": "system", "content": system.strip()}] if system and system.strip() else []
    for message in history or []:
        text = message_text(message.get("content"))
        if message.get("role") in ("user", "assistant") and (text or message["role"] == "user"):
            messages.append({"role": message["role"], "content": text})
    return messages


def guarded(handler: Callable) -> Callable:
    """For plain (non-streaming) handlers whose first output is a notice: any error becomes
    that notice, so the page never shows a traceback and the server keeps serving."""

    def wrapper(*args, **kwargs):
        try:
            return handler(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - the whole point is to catch everything
            return notice(readable(error))

    wrapper.__name__ = handler.__name__
    wrapper.__doc__ = handler.__doc__
    return wrapper


def session_id(request, part: str) -> str:
    """Who is asking (a gr.Request's browser session) and through which part of the page."""
    return f"{owner_of(request)}:{part}"


def owner_of(request) -> str:
    """The browser session (or gradio_client) a conversion belongs to."""
    return getattr(request, "session_hash", None) or "anonymous"
