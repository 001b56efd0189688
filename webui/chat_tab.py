"""The Chat tab: any local model, the model's own chat template, streaming with Stop,
regenerate and clear, and a speed line after every answer.

Each browser session chats through its own generator (and KV cache); the loaded
weights are shared through the app's model cache.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import gradio as gr

from core.generator import GenerationStats

from .common import history_messages, notice, readable
from .jobs import DEMO, find_local_model, local_models, sampling_settings, speed_line, stream_answer
from .services import Services

CHAT_CONCURRENCY = "chat"  # one limit for the Chat tab, Compare and the /chat endpoint
CHAT_CONCURRENCY_LIMIT = 8


@dataclass
class SamplingControls:
    temperature: gr.Slider
    top_k: gr.Slider
    top_p: gr.Slider
    min_p: gr.Slider
    repetition_penalty: gr.Slider
    max_new_tokens: gr.Slider
    seed: gr.Number

    def as_list(self) -> list:
        return [self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty, self.max_new_tokens,
                self.seed]


def sampling_controls(prefix: str, temperature: float = 0.7) -> SamplingControls:
    return SamplingControls(
        gr.Slider(0.0, 2.0, value=temperature, step=0.05, label="Temperature (0 = greedy)",
                  elem_id=f"{prefix}-temperature"),
        gr.Slider(0, 200, value=50, step=1, label="Top-k (0 = off)", elem_id=f"{prefix}-top-k"),
        gr.Slider(0.05, 1.0, value=0.9, step=0.01, label="Top-p (1 = off)", elem_id=f"{prefix}-top-p"),
        gr.Slider(0.0, 1.0, value=0.0, step=0.01, label="Min-p (0 = off)", elem_id=f"{prefix}-min-p"),
        gr.Slider(0.8, 2.0, value=1.0, step=0.01, label="Repetition penalty (1 = off)",
                  elem_id=f"{prefix}-repetition-penalty"),
        gr.Slider(1, 2048, value=256, step=1, label="Max new tokens", elem_id=f"{prefix}-max-new-tokens"),
        gr.Number(-1, precision=0, label="Seed (-1 = random)", elem_id=f"{prefix}-seed"),
    )


def model_names(services: Services) -> list[str]:
    return [model.name for model in local_models(services.conversions.models_folder)]


def answer_stream(services: Services, session_id: str, model_name: str, messages: list[dict], temperature, top_k,
                  top_p, min_p, repetition_penalty, max_new_tokens, seed) -> Iterator[tuple[str, str | None]]:
    """(answer so far, None) while it streams, then (answer, speed line). Raises ValueError and
    friends with the user's mistake in words; the callers turn them into notices."""
    if not messages or messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
        raise ValueError("type a message first")
    settings = sampling_settings(temperature, top_k, top_p, min_p, repetition_penalty, seed)
    model = find_local_model(model_name or DEMO, services.conversions.models_folder)
    loaded = services.models.get(model.spec)
    session = services.chats.get(session_id)
    stats: GenerationStats | None = None
    for text, stats in stream_answer(services.chats, session, loaded, messages, settings, int(max_new_tokens)):
        yield text, speed_line(stats, loaded) if stats is not None else None


def stream_into_history(services: Services, session_id: str, model_name: str, history: list[dict], system: str,
                        sampling: list):
    """Chatbot history with the assistant's answer growing at its end, and the speed line."""
    messages = history_messages(history, system)
    history = list(history) + [{"role": "assistant", "content": ""}]
    try:
        for text, speed in answer_stream(services, session_id, model_name, messages, *sampling):
            history[-1] = {"role": "assistant", "content": text}
            yield history, (f'<div class="ql-speed">{speed}</div>' if speed else gr.skip())
    except Exception as error:  # noqa: BLE001 - the page shows why; the app keeps serving
        yield history[:-1], notice(readable(error))


def session_id(request: gr.Request | None, part: str) -> str:
    return f"{getattr(request, 'session_hash', None) or 'anonymous'}:{part}"


@dataclass
class ChatTab:
    model: gr.Dropdown


def build(services: Services) -> ChatTab:
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=260):
            model = gr.Dropdown(model_names(services), value=DEMO, label="Model", elem_id="ql-chat-model",
                                info="demo or any model in the models folder")
            system = gr.Textbox(label="System prompt", lines=3, placeholder="You are a helpful assistant.",
                                elem_id="ql-system")
            with gr.Accordion("Sampling", open=False, elem_id="ql-sampling"):
                sampling = sampling_controls("ql-chat")
        with gr.Column(scale=3, min_width=420):
            chatbot = gr.Chatbot(label="Chat", height=440, elem_id="ql-chatbot", buttons=["copy"],
                                 placeholder="Ask something. Answers stream; Stop ends one early.")
            with gr.Row():
                message = gr.Textbox(show_label=False, placeholder="Message", scale=5, elem_id="ql-message",
                                     submit_btn=False, autofocus=False)
                send = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="ql-send")
            with gr.Row():
                stop = gr.Button("Stop", variant="stop", elem_id="ql-stop")
                regenerate = gr.Button("Regenerate", elem_id="ql-regenerate")
                clear = gr.Button("Clear", elem_id="ql-clear")
            speed = gr.HTML(elem_id="ql-speed")

    def add_user_message(text: str, history: list[dict]):
        if not (text or "").strip():
            return gr.skip(), history, notice("type a message first")
        return "", list(history or []) + [{"role": "user", "content": text}], ""

    def respond(model_name, history, system_prompt, temperature, top_k, top_p, min_p, repetition_penalty,
                max_new_tokens, seed, request: gr.Request):
        if not history or history[-1]["role"] != "user":
            return
        yield from stream_into_history(services, session_id(request, "chat"), model_name, history, system_prompt,
                                       [temperature, top_k, top_p, min_p, repetition_penalty, max_new_tokens, seed])

    def drop_last_answer(history: list[dict]):
        history = list(history or [])
        while history and history[-1]["role"] == "assistant":
            history.pop()
        return history

    def on_stop(request: gr.Request):
        services.chats.stop(session_id(request, "chat"))

    answer_inputs = [model, chatbot, system, *sampling.as_list()]
    answer_options = dict(api_visibility="private", concurrency_id=CHAT_CONCURRENCY,
                          concurrency_limit=CHAT_CONCURRENCY_LIMIT, show_progress="hidden")
    for trigger in (send.click, message.submit):
        trigger(add_user_message, [message, chatbot], [message, chatbot, speed], api_visibility="private",
                queue=False).then(respond, answer_inputs, [chatbot, speed], **answer_options)
    regenerate.click(drop_last_answer, chatbot, chatbot, api_visibility="private", queue=False).then(
        respond, answer_inputs, [chatbot, speed], **answer_options)
    stop.click(on_stop, None, None, api_visibility="private", queue=False)
    clear.click(lambda: ([], ""), None, [chatbot, speed], api_visibility="private", queue=False)
    return ChatTab(model)
