"""The Quantize tab: pick a model and a size, watch the conversion layer by layer, then
download the result, push it to the Hub or chat with it.

The conversion itself runs in the app's queue (webui/conversions.py), not in the request: a
closed browser does not stop it, and the page only watches the task's events.
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from core.convert.allocate import DEFAULT_OBJECTIVE, OBJECTIVES
from core.convert.job import MAX_BPW, MAX_LENGTH, MAX_ROWS, MIN_LENGTH, ConversionSettings
from core.convert.targets import TARGETS

from . import hub, plots, quality
from .common import notice, on_space, owner_of, readable, scrub
from .conversions import (
    CALIBRATION_FILE, CALIBRATION_HUB, CALIBRATION_SELF, CANCELLED, DONE, FAILED, POLL_SECONDS, QUEUED,
    ConversionTask, calibration_source, chosen_source, conversion_request,
)
from .library import DEMO
from .services import Services

STAGE_NAMES = {
    "load": "loading the model",
    "calibration": "preparing calibration text",
    "measure": "measuring every candidate setting",
    "optimize": "allocating bits",
    "quantize": "quantizing layer by layer",
    "head": "quantizing the output layer",
    "write": "writing the model folder",
    "done": "done",
}


# ---------------------------------------------------------------- task -> page


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def status_html(task: ConversionTask, position: int) -> str:
    """Progress bar, stage, layer, ETA or queue place, and how it ended."""
    fraction = task.overall_fraction()
    event = task.last_event
    lines = []
    if task.state == QUEUED:
        lines.append(f"Waiting in line: {position} conversion{'s' if position != 1 else ''} ahead "
                     "(one conversion runs at a time per device).")
    elif not task.finished:
        stage = STAGE_NAMES.get(event.stage, event.stage) if event else "starting"
        where = f" · layer {event.layer + 1} of {event.layers}" if event and event.layer is not None and event.layers else ""
        eta = task.eta_seconds()
        lines.append(f"<b>{html.escape(stage)}</b>{where} · {fraction * 100:.0f}%"
                     + (f" · about {_minutes(eta)} left" if eta else ""))
        if event and event.message:
            lines.append(f'<span class="ql-dim">{html.escape(event.message)}</span>')
    elif task.state == DONE:
        lines.append(f"<b>Done</b> in {_minutes(task.result.seconds)}: {html.escape(task.output_dir.name)}")
    if task.resumed_from and task.state != DONE:
        lines.append(f'<span class="ql-dim">resumed: {html.escape(task.resumed_from)}</span>')
    bar = (f'<div class="ql-progress" role="progressbar" aria-valuenow="{fraction * 100:.0f}" aria-valuemin="0" '
           f'aria-valuemax="100"><div style="width:{fraction * 100:.1f}%"></div></div>')
    body = bar + "".join(f"<div>{line}</div>" for line in lines)
    if task.state == CANCELLED:
        body += notice(task.message, "warning")
    elif task.state == FAILED:
        body += notice(task.message)
    return f'<div class="ql-status" data-state="{task.state}">{body}</div>'


def result_markdown(task: ConversionTask) -> str:
    result = task.result
    settings = task.request.settings
    allocated = next((e.message for e in reversed(task.events) if e.stage == "optimize"), "")
    rows = [
        ("bits per weight (decoder layers)", f"**{result.bpw:.3f}** (target {settings.bpw:g})"),
        ("allocation", allocated or "from the measurement"),
        ("output layer", f"{settings.head_bits} bits ({result.head_bpw:.2f} bpw)"),
        ("size on disk", f"{result.size_bytes / 1e6:.1f} MB"),
        ("time", _minutes(result.seconds)),
        ("folder", f"`{result.output_dir}`"),
    ]
    return f"| result | {task.output_dir.name} |\n|---|---|\n" + "\n".join(f"| {name} | {value} |" for name, value in rows)


# What the format choice offers. EXL2 stays the default until EXL3 has measured better on the held-out
# domains here and its trellis search runs on a verified kernel (in torch it takes hours on a real model).
FORMAT_CHOICES = [("EXL2 (ExLlamaV2, TabbyAPI, text-generation-webui)", "exl2"),
                  ("EXL3 (ExLlamaV3): trellis codes; slow to convert until its GPU search is verified", "exl3")]
DEFAULT_FORMAT = "exl2"


def head_choices(output_format: str) -> list[tuple[str, int]]:
    return [("16 (unquantized)" if bits == 16 else str(bits), bits) for bits in TARGETS[output_format].head_bits]


def bpw_range_info(output_format: str) -> str:
    return f"average over the decoder layers; {TARGETS[output_format].min_bpw:g} to {MAX_BPW:g}"


def format_limits(output_format: str) -> tuple[gr.Slider, gr.Dropdown]:
    """The size slider's range and the head choices of a format."""
    target = TARGETS[output_format]
    head = ConversionSettings.head_bits
    return (gr.Slider(minimum=target.min_bpw, maximum=MAX_BPW, info=bpw_range_info(output_format)),
            gr.Dropdown(choices=head_choices(output_format),
                        value=head if head in target.head_bits else max(target.head_bits)))


@dataclass
class QuantizeTab:
    """The components other tabs and the app wire to."""

    result_model: gr.Textbox  # the name of the model just made, for "Chat with it"
    chat_button: gr.Button


def build(services: Services) -> QuantizeTab:
    offline = hub.hub_offline()
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=320):
            source = gr.Dropdown(
                choices=source_choices(services), value=DEMO, allow_custom_value=True, filterable=True,
                label="Model", elem_id="ql-source",
                info="demo, a Hub id (type to search) or an uploaded .gguf file" if services.access.public else
                "demo, a Hub id (type to search), a local model folder or a .gguf path",
            )
            gr.Markdown(
                "Hub search is off: HF_HUB_OFFLINE is set. Type a full id of a model already in the cache, "
                "or use a local folder, a GGUF file or the demo." if offline else
                "Type two or more letters to search the Hub's text-generation models.",
                elem_classes=["ql-note"], elem_id="ql-hub-note",
            )
            upload = gr.File(label="…or upload a GGUF file", file_types=[".gguf"], type="filepath",
                             elem_id="ql-upload", height=120)
            output_format = gr.Radio(FORMAT_CHOICES, value=DEFAULT_FORMAT, label="Format", elem_id="ql-format")
            bpw = gr.Slider(TARGETS[DEFAULT_FORMAT].min_bpw, MAX_BPW, value=4.0, step=0.05,
                            label="Target bits per weight", elem_id="ql-bpw", info=bpw_range_info(DEFAULT_FORMAT))
            head_bits = gr.Dropdown(choices=head_choices(DEFAULT_FORMAT), value=ConversionSettings.head_bits,
                                    label="Output layer bits", elem_id="ql-head-bits")
            with gr.Accordion("Calibration and advanced settings", open=False, elem_id="ql-advanced"):
                calibration_kind = gr.Radio([CALIBRATION_SELF, CALIBRATION_FILE, CALIBRATION_HUB], value=CALIBRATION_SELF,
                                            label="Calibration text", elem_id="ql-calibration")
                calibration_file = gr.File(label="Calibration file (.txt, .jsonl, .parquet)",
                                           file_types=[".txt", ".jsonl", ".parquet"], type="filepath", height=120)
                calibration_dataset = gr.Textbox(label="Hub dataset file", placeholder="owner/dataset:data/train.parquet")
                with gr.Row():
                    rows = gr.Number(ConversionSettings.rows, precision=0, minimum=1, maximum=MAX_ROWS,
                                     label="Calibration rows", elem_id="ql-rows")
                    length = gr.Number(ConversionSettings.length, precision=0, minimum=MIN_LENGTH, maximum=MAX_LENGTH,
                                       label="Tokens per row", elem_id="ql-length")
                    measurement_rows = gr.Number(ConversionSettings.measurement_rows, precision=0, minimum=1,
                                                 maximum=MAX_ROWS, label="Measurement rows",
                                                 elem_id="ql-measurement-rows")
                objective = gr.Dropdown(list(OBJECTIVES), value=DEFAULT_OBJECTIVE, label="Bit allocation objective",
                                        info="maximin (ExLlamaV2's) measured best on the demo model")
                source_token = gr.Textbox(label="Hugging Face token for a gated or private source (kept in memory only)",
                                          type="password", visible=not on_space(), elem_id="ql-source-token")
            with gr.Row():
                start = gr.Button("Quantize", variant="primary", elem_id="ql-start")
                cancel = gr.Button("Cancel", variant="stop", interactive=False, elem_id="ql-cancel")
                resume = gr.Button("Resume", visible=False, elem_id="ql-resume")
        with gr.Column(scale=3, min_width=420):
            status = gr.HTML(notice("Pick a model and a size, then press Quantize.", "info"), elem_id="ql-status")
            chart = gr.Plot(plots.empty_figure("the per-layer error chart fills in as layers are measured"),
                            label="Per-layer error", elem_id="ql-chart")
    task_id = gr.State("")
    with gr.Group(visible=False, elem_id="ql-result") as result_box:
        with gr.Row(equal_height=False):
            with gr.Column(scale=2):
                result_text = gr.Markdown(elem_id="ql-result-text")
                result_model = gr.Textbox(visible=False)
                with gr.Row():
                    chat_button = gr.Button("Chat with it", variant="primary", elem_id="ql-chat-with")
                    zip_button = gr.Button("Download as zip", elem_id="ql-zip")
                zip_file = gr.File(label="Zip", visible=False, elem_id="ql-zip-file")
            with gr.Column(scale=3):
                bits_chart = gr.Plot(label="Bits per layer", elem_id="ql-bits-chart")
        with gr.Row(equal_height=False):
            with gr.Column(scale=2):
                gr.Markdown("**Push to the Hugging Face Hub** with a generated model card")
                if on_space():
                    gr.LoginButton()
                repo = gr.Textbox(label="Repo", placeholder="my-model-exl2 or owner/my-model-exl2", elem_id="ql-repo")
                private = gr.Checkbox(True, label="Private repo")
                push_token = gr.Textbox(label="Token with write access (kept in memory only)", type="password",
                                        visible=not on_space(), elem_id="ql-push-token")
                push = gr.Button("Push to Hub", elem_id="ql-push")
                push_status = gr.HTML(elem_id="ql-push-status")
            with gr.Column(scale=3):
                quality_chart = gr.Plot(label="Perplexity vs bits per weight", elem_id="ql-quality-chart")
                measure = gr.Button("Measure perplexity of every size of this model", elem_id="ql-measure")
                measure_status = gr.HTML()

    watch_outputs = [task_id, status, chart, result_box, result_text, result_model, bits_chart, quality_chart,
                     start, cancel, resume]

    def watch(task: ConversionTask):
        drawn = -1
        while True:
            finished = task.finished  # read once: the last frame must show the whole run
            count = len(task.events)
            figure = plots.measurement_figure(task.events, task.chosen) if count != drawn or finished else gr.skip()
            drawn = count
            done = task.state == DONE
            yield (
                task.id, status_html(task, services.conversions.position(task)), figure,
                gr.Group(visible=done),
                result_markdown(task) if done else gr.skip(),
                task.output_dir.name if done else gr.skip(),
                plots.bits_per_layer_figure(task.result.layer_bits, task.request.settings.bpw, task.result.bpw)
                if done else gr.skip(),
                quality.figure_for(task.output_dir.name, services.local_models(task.request.library))
                if done else gr.skip(),
                gr.Button(interactive=finished),
                gr.Button(interactive=not finished),
                gr.Button(visible=task.state in (CANCELLED, FAILED)),
            )
            if finished:
                return
            time.sleep(POLL_SECONDS)

    def refused(message: str):
        return ("", notice(message), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(),
                gr.Button(interactive=True), gr.Button(interactive=False), gr.skip())

    def on_start(typed, uploaded, format_value, bpw_value, head, kind, cal_file, dataset, rows_value, length_value,
                 measurement_value, objective_value, token, request: gr.Request,
                 profile: gr.OAuthProfile | None = None, oauth_token: gr.OAuthToken | None = None):
        # On a Space the signed-in user's token opens gated and private sources; locally, the field.
        token = (oauth_token.token if oauth_token else None) or token
        access = services.access
        try:
            access.accept_upload(uploaded, check=lambda path: chosen_source(None, path))
            if kind == CALIBRATION_FILE:
                access.accept_upload(cal_file)
            source = chosen_source(typed, uploaded)
            access.check_source(source)
            conversion = conversion_request(source, bpw_value, head,
                                            calibration_source(kind, cal_file, dataset), rows_value, length_value,
                                            measurement_value, objective_value, token,
                                            library=services.library(request, profile), roots=access.roots,
                                            output_format=format_value)
            task = services.conversions.submit(conversion, owner_of(request))
        except Exception as error:  # noqa: BLE001 - every refusal becomes a sentence on the page
            yield refused(readable(error))
            return
        yield from watch(task)

    def on_resume(current: str, request: gr.Request):
        task = services.conversions.get(current)
        if task is None:
            yield refused("nothing to resume: start a conversion first")
            return
        # The same request maps to the same work dir, so the new task picks up where this one stopped.
        try:
            resumed = services.conversions.submit(task.request, owner_of(request))
        except Exception as error:  # noqa: BLE001
            yield refused(readable(error))
            return
        yield from watch(resumed)

    def on_cancel(current: str, request: gr.Request):
        task = services.conversions.get(current)
        if task is not None:
            try:
                services.conversions.cancel(task, owner_of(request))
            except Exception as error:  # noqa: BLE001
                gr.Warning(readable(error))
        return gr.Button(interactive=False)

    output_format.change(format_limits, output_format, [bpw, head_bits], api_visibility="private", queue=False)
    start.click(on_start, [source, upload, output_format, bpw, head_bits, calibration_kind, calibration_file, calibration_dataset,
                           rows, length, measurement_rows, objective, source_token], watch_outputs,
                api_visibility="private", concurrency_limit=None, show_progress="hidden")
    resume.click(on_resume, task_id, watch_outputs, api_visibility="private", concurrency_limit=None,
                 show_progress="hidden")
    cancel.click(on_cancel, task_id, cancel, api_visibility="private", queue=False)

    def on_search(typed_data: gr.KeyUpData):
        found = hub.search_models(typed_data.input_value)
        if not found:
            return gr.skip()
        return gr.Dropdown(choices=source_choices(services) + found)

    if not offline:
        source.key_up(on_search, None, source, api_visibility="private", show_progress="hidden",
                      trigger_mode="always_last")

    def on_zip(model_name: str, request: gr.Request, profile: gr.OAuthProfile | None = None):
        try:
            model = services.find_model(model_name, services.library(request, profile))
            return gr.File(value=str(hub.zip_model(Path(model.spec), quality.card_perplexity(model))), visible=True)
        except Exception as error:  # noqa: BLE001
            gr.Warning(readable(error))
            return gr.skip()

    zip_button.click(on_zip, result_model, zip_file, api_visibility="private")

    def on_push(model_name: str, repo_id: str, private_repo: bool, token: str, request: gr.Request,
                profile: gr.OAuthProfile | None = None, oauth_token: gr.OAuthToken | None = None):
        secret = (oauth_token.token if oauth_token else None) or (token or "").strip() or None
        try:
            model = services.find_model(model_name, services.library(request, profile))
            url = hub.push_to_hub(Path(model.spec), repo_id, secret, private_repo, quality.card_perplexity(model))
        except Exception as error:  # noqa: BLE001
            return notice(scrub(readable(error), secret))
        return notice(f"pushed to {url}", "success")

    push.click(on_push, [result_model, repo, private, push_token], push_status, api_visibility="private")

    def on_measure(model_name: str, request: gr.Request, profile: gr.OAuthProfile | None = None):
        library = services.local_models(services.library(request, profile))
        try:
            for message in quality.measure_family(services.models, model_name, library):
                yield notice(message, "info"), gr.skip()
        except Exception as error:  # noqa: BLE001
            yield notice(readable(error)), gr.skip()
            return
        yield "", quality.figure_for(model_name, library)

    measure.click(on_measure, result_model, [measure_status, quality_chart], api_visibility="private")
    return QuantizeTab(result_model, chat_button)


def source_choices(services: Services) -> list[str]:
    """demo and the unquantized local models; quantizing a quantized model makes no sense."""
    return [model.name if model.spec == DEMO else model.spec
            for model in services.local_models() if model.bpw is None]
