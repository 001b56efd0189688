"""The quantlab web app: Quantize, Chat and Compare tabs over core and core.convert.

    from webui import build_app
    build_app().launch()          # in a script, or inline in Jupyter

The page only drives the engine through its public APIs; every model decision is
made in core.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from . import api, chat_tab, compare_tab, quantize_tab
from .access import Access
from .library import DEMO, newest_quantized
from .services import Services

ASSETS = Path(__file__).resolve().parent.parent / "assets"
TITLE = "quantlab: quantize an LLM, then chat with it"
CACHE_CLEANUP = (3600, 24 * 3600)  # gradio's delete_cache: look every hour, delete what is a day old


def theme() -> gr.themes.Base:
    # One accent, neutral greys: Gradio derives the dark variant from the same hues.
    return gr.themes.Soft(primary_hue="orange", secondary_hue="slate", neutral_hue="slate",
                          font=[gr.themes.GoogleFont("Inter"), "ui-sans-serif", "system-ui", "sans-serif"])


class QuantlabApp(gr.Blocks):
    """Blocks whose launch() brings the app's theme and CSS along, so `build_app().launch()`
    looks the same from app.py, a Space or a notebook (Gradio 6 takes both at launch), and
    the public mode's upload cap with it."""

    def __init__(self, access: Access | None = None, **kwargs):
        super().__init__(**kwargs)
        self.access = access or Access()

    def launch(self, *args, **kwargs):
        kwargs.setdefault("theme", theme())
        kwargs.setdefault("css_paths", [ASSETS / "style.css"])
        kwargs.setdefault("favicon_path", str(ASSETS / "favicon.png"))
        kwargs.setdefault("footer_links", ["api", "gradio"])
        for name, value in self.access.launch_options().items():
            kwargs.setdefault(name, value)
        return super().launch(*args, **kwargs)


def header() -> str:
    logo = (ASSETS / "logo.svg").read_text(encoding="utf-8")
    return (f'<div class="ql-header">{logo}<div><h1>quantlab</h1>'
            "<p>Quantize a model to EXL3 or EXL2 at any size from 2 to 8 bits per weight, watch each layer's error, "
            "then chat with the result and see its speed.</p></div></div>")


def build_app(services: Services | None = None, public: bool = False) -> gr.Blocks:
    """The app; `public` (or SPACE_ID in the environment) limits it as access.py describes."""
    services = services or Services.create(access=Access.for_environment(public))
    # Uploads and the copies of files handed to browsers (zips) leave gradio's cache after a day.
    with QuantlabApp(services.access, title=TITLE, analytics_enabled=False, delete_cache=CACHE_CLEANUP) as app:
        gr.HTML(header())
        with gr.Tabs(elem_id="ql-tabs") as tabs:
            with gr.Tab("Quantize", id="quantize", elem_id="ql-tab-quantize"):
                quantize = quantize_tab.build(services)
            with gr.Tab("Chat", id="chat", elem_id="ql-tab-chat") as chat_item:
                chat = chat_tab.build(services)
            with gr.Tab("Compare", id="compare", elem_id="ql-tab-compare") as compare_item:
                compare_a, compare_b = compare_tab.build(services)
        api.register(services)

        # Lists are refreshed when a tab opens, so a model made a minute ago is there.
        def refresh(current: str, request: gr.Request, profile: gr.OAuthProfile | None = None):
            names = services.model_names(services.library(request, profile))
            return gr.Dropdown(choices=names, value=current if current in names else names[0])

        def refresh_second(current: str, request: gr.Request, profile: gr.OAuthProfile | None = None):
            # Side B starts on the newest quantized model, so Compare's first press is the useful one.
            library = services.library(request, profile)
            names = services.model_names(library)
            if current in names and current != DEMO:
                return gr.Dropdown(choices=names, value=current)
            return gr.Dropdown(choices=names, value=newest_quantized(library) or names[0])

        chat_item.select(refresh, chat.model, chat.model, api_visibility="private", queue=False)
        compare_item.select(refresh, compare_a, compare_a, api_visibility="private", queue=False)
        compare_item.select(refresh_second, compare_b, compare_b, api_visibility="private", queue=False)

        def chat_with(model_name: str, request: gr.Request, profile: gr.OAuthProfile | None = None):
            names = services.model_names(services.library(request, profile))
            return gr.Tabs(selected="chat"), gr.Dropdown(choices=names, value=model_name)

        quantize.chat_button.click(chat_with, quantize.result_model, [tabs, chat.model], api_visibility="private",
                                   queue=False)
    return app
