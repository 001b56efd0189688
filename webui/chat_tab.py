"""The Chat tab: any local model, the model's own chat template, streaming with Stop,
regenerate and clear, and a speed line after every answer.

Each browser session chats through its own generator (and KV cache); the loaded
weights are shared through the app's model cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from .chats import CHAT_CONCURRENCY, CHAT_CONCURRENCY_LIMIT
from .common import history_messages, notice, readable, session_id
from .library import DEMO
from .services import Services
from .widgets import sampling_controls

def stream_into_history(services: Services, session_id: str, model_name: str, history: list[dict], system: str,
                        sampling: list, library=None):
    """Chatbot history with the assistant's answer growing at its end, and the speed line."""
    messages = history_messages(history, system)
    history = list(history) + [{"role": "assistant", "content": ""}]
    try:
        for text, speed in services.answer(session_id, model_name, messages, *sampling, library=library):
            history[-1] = {"role": "assistant", "content": text}
            yield history, (f'<div class="ql-speed">{speed}</div>' if speed else gr.skip())
    except Exception as error:  # noqa: BLE001 - the page shows why; the app keeps serving
        yield history[:-1], notice(readable(error))


@dataclass
class ChatTab:
    model: gr.Dropdown


def build(services: Services) -> ChatTab:
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=260):
            model = gr.Dropdown(services.model_names(), value=DEMO, label="Model", elem_id="ql-chat-model",
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
                max_new_tokens, seed, request: gr.Request, profile: gr.OAuthProfile | None = None):
        if not history or history[-1]["role"] != "user":
            return
        yield from stream_into_history(services, session_id(request, "chat"), model_name, history, system_prompt,
                                       [temperature, top_k, top_p, min_p, repetition_penalty, max_new_tokens, seed],
                                       services.library(request, profile))

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
