"""The Compare tab: one prompt answered by two models side by side (say fp16 and 3.0 bpw),
each with its own speed line.

The two answers run one after the other, not at once, so neither model's speed is
measured while the other one competes for the same device.
"""

from __future__ import annotations

import gradio as gr

from .chats import CHAT_CONCURRENCY, CHAT_CONCURRENCY_LIMIT
from .common import notice, readable, session_id
from .library import DEMO, newest_quantized
from .services import Services
from .widgets import sampling_controls


def build(services: Services) -> tuple[gr.Dropdown, gr.Dropdown]:
    names = services.model_names()
    shared = services.access.shared_library(services.models_folder)
    with gr.Row():
        model_a = gr.Dropdown(names, value=DEMO, label="Model A", elem_id="ql-compare-a")
        model_b = gr.Dropdown(names, value=(shared and newest_quantized(shared)) or DEMO, label="Model B",
                              elem_id="ql-compare-b")
    prompt = gr.Textbox(label="Prompt", lines=2, value="What is the capital of France?", elem_id="ql-compare-prompt")
    with gr.Accordion("Sampling (greedy by default, so the two answers differ only by the model)", open=False):
        sampling = sampling_controls("ql-compare", temperature=0.0)
    run = gr.Button("Compare", variant="primary", elem_id="ql-compare-run")
    with gr.Row(equal_height=False):
        with gr.Column():
            answer_a = gr.Markdown(elem_id="ql-compare-answer-a", elem_classes=["ql-answer"])
            speed_a = gr.HTML(elem_id="ql-compare-speed-a")
        with gr.Column():
            answer_b = gr.Markdown(elem_id="ql-compare-answer-b", elem_classes=["ql-answer"])
            speed_b = gr.HTML(elem_id="ql-compare-speed-b")

    def compare(name_a, name_b, text, temperature, top_k, top_p, min_p, repetition_penalty, max_new_tokens, seed,
                request: gr.Request, profile: gr.OAuthProfile | None = None):
        values = [temperature, top_k, top_p, min_p, repetition_penalty, max_new_tokens, seed]
        messages = [{"role": "user", "content": text or ""}]
        shown = ["", "", "", ""]  # answer a, speed a, answer b, speed b
        for side, name in enumerate((name_a, name_b)):
            try:
                for answer, speed in services.answer(session_id(request, f"compare-{side}"), name, messages, *values,
                                                     library=services.library(request, profile)):
                    shown[2 * side] = answer
                    if speed:
                        shown[2 * side + 1] = f'<div class="ql-speed">{speed}</div>'
                    yield tuple(shown)
            except Exception as error:  # noqa: BLE001 - one model failing leaves the other's answer standing
                shown[2 * side + 1] = notice(readable(error))
                yield tuple(shown)

    run.click(compare, [model_a, model_b, prompt, *sampling.as_list()], [answer_a, speed_a, answer_b, speed_b],
              api_visibility="private", concurrency_id=CHAT_CONCURRENCY, concurrency_limit=CHAT_CONCURRENCY_LIMIT,
              show_progress="hidden")
    return model_a, model_b
