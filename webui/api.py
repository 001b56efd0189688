"""Named endpoints for scripts (gradio_client): /models, /chat, /quantize and /cancel.

    from gradio_client import Client
    client = Client("http://127.0.0.1:7860/")
    client.predict(api_name="/models")
    client.predict("What is the capital of France?", "demo", api_name="/chat")
    job = client.submit("demo", 4.0, api_name="/quantize")   # statuses carry "task_id"
    client.predict(task_id, api_name="/cancel")               # the same client only

They run on the same queue, model cache and chat sessions as the page, under the same
bounds (ConversionSettings.validate) and queue limits. A mistake comes back as an
error whose message says what to change.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import gradio as gr

from core.convert.allocate import DEFAULT_OBJECTIVE
from core.convert.job import ConversionSettings

from .chats import CHAT_CONCURRENCY, CHAT_CONCURRENCY_LIMIT
from .common import history_messages, owner_of, readable, session_id
from .conversions import DONE, POLL_SECONDS, ConversionTask, chosen_source, conversion_request
from .library import DEMO
from .services import Services


def task_status(task: ConversionTask, position: int) -> dict:
    event = task.last_event
    status = {
        "task_id": task.id,
        "state": task.state,
        "queue_position": position,
        "stage": event.stage if event else None,
        "layer": event.layer if event else None,
        "layers": event.layers if event else None,
        "fraction": round(task.overall_fraction(), 4),
        "message": task.message or (event.message if event else ""),
        "resumed_from": task.resumed_from,
    }
    if task.state == DONE and task.result is not None:
        status["model"] = task.output_dir.name
        status["result"] = {"folder": str(task.result.output_dir), "bpw": task.result.bpw,
                            "head_bpw": task.result.head_bpw, "size_bytes": task.result.size_bytes,
                            "seconds": task.result.seconds, "layer_bits": task.result.layer_bits}
    return status


def register(services: Services) -> None:
    """Declare the endpoints; call inside the app's Blocks."""

    def models(request: gr.Request = None, profile: gr.OAuthProfile | None = None) -> list[dict]:
        """Every model the app can chat with: name (what /chat takes), folder, bits per weight
        (null when unquantized). On a public server: the demo and the caller's own models."""
        return [{"name": m.name, "folder": m.spec, "bpw": m.bpw, "quantized": m.bpw is not None}
                for m in services.local_models(services.library(request, profile))]

    def chat(message: str, model: str = DEMO, system: str = "", history: list[dict] | None = None,
             temperature: float = 0.0, top_k: int = 50, top_p: float = 1.0, min_p: float = 0.0,
             repetition_penalty: float = 1.0, max_new_tokens: int = 256, seed: int = -1,
             request: gr.Request = None, profile: gr.OAuthProfile | None = None) -> Iterator[dict]:
        """Stream an answer: {"answer": text so far, "done": false}, then the whole answer with
        "done": true and "speed" (prompt tokens, time to first token, tok/s, memory, device).
        history: earlier turns as [{"role": "user"|"assistant", "content": text}]. Greedy by default."""
        messages = history_messages(list(history or []) + [{"role": "user", "content": message or ""}], system)
        try:
            for answer, speed in services.answer(session_id(request, "api"), model, messages, temperature, top_k,
                                                 top_p, min_p, repetition_penalty, max_new_tokens, seed,
                                                 library=services.library(request, profile)):
                yield {"answer": answer, "done": speed is not None, "speed": speed or ""}
        except Exception as error:  # noqa: BLE001 - the client reads the message, the server keeps serving
            raise gr.Error(readable(error), print_exception=False) from None

    def quantize(source: str = DEMO, bpw: float = 4.0, head_bits: int = ConversionSettings.head_bits,
                 rows: int = ConversionSettings.rows, length: int = ConversionSettings.length,
                 measurement_rows: int = ConversionSettings.measurement_rows, calibration: str = "",
                 objective: str = DEFAULT_OBJECTIVE, output_format: str = "exl2", request: gr.Request = None,
                 profile: gr.OAuthProfile | None = None) -> Iterator[dict]:
        """Convert `source` (demo, a Hub id, a local folder or .gguf path) to `output_format` (exl2 or
        exl3) at `bpw`; streams
        the job's status and ends with its result ("model" is the name /chat takes). Asking again for
        the same conversion resumes it; /cancel with the status's task_id stops it. calibration: a file
        path or hf:<dataset>:<file>; empty for text the model writes itself. A public server takes only
        the demo, Hub ids and uploaded files."""
        try:
            source, calibration = chosen_source(source, None), (calibration or "").strip() or None
            services.access.check_source(source)
            services.access.check_calibration(calibration)
            conversion = conversion_request(source, bpw, head_bits, calibration, rows, length, measurement_rows,
                                            objective, library=services.library(request, profile),
                                            roots=services.access.roots, output_format=output_format)
            task = services.conversions.submit(conversion, owner_of(request))
        except Exception as error:  # noqa: BLE001
            raise gr.Error(readable(error), print_exception=False) from None
        while not task.finished:
            yield task_status(task, services.conversions.position(task))
            time.sleep(POLL_SECONDS)
        if task.state != DONE:
            raise gr.Error(f"the conversion {task.state}: {task.message}", print_exception=False)
        yield task_status(task, 0)

    def cancel(task_id: str, request: gr.Request = None) -> dict:
        """Stop a conversion this client started (task_id from /quantize's status); it stops after the
        current module, everything kept, and asking /quantize again resumes it."""
        task = services.conversions.get((task_id or "").strip())
        try:
            if task is None:
                raise ValueError(f"no conversion with id {task_id!r}")
            services.conversions.cancel(task, owner_of(request))
        except Exception as error:  # noqa: BLE001
            raise gr.Error(readable(error), print_exception=False) from None
        return task_status(task, services.conversions.position(task))

    gr.api(models, api_name="models")
    gr.api(chat, api_name="chat", concurrency_id=CHAT_CONCURRENCY, concurrency_limit=CHAT_CONCURRENCY_LIMIT)
    gr.api(quantize, api_name="quantize", concurrency_limit=None)
    gr.api(cancel, api_name="cancel", concurrency_limit=None)
