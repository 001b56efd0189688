"""Plotly figures from the converter's progress events and finished results.

Pure functions: the same events always give the same figure, so the quantize tab
can redraw from a job's event log at any time (a page reload, a resumed job).
Backgrounds are transparent and text mid-grey, which reads on both the light and
the dark theme.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import plotly.graph_objects as go

from core.convert.progress import ProgressEvent

GRID = "rgba(128,128,128,0.25)"
TEXT = "#8a8f98"
ACCENT = "#e4572e"  # chosen candidates, targets: one warm colour against the cool bpw scale
GROUP_OFFSET = {"self_attn": -0.17, "mlp": 0.17}
GROUP_LABEL = {"self_attn": "attention", "mlp": "MLP"}
GROUP_SYMBOL = {"self_attn": "circle", "mlp": "diamond"}


def _layout(figure: go.Figure, title: str, x_title: str, y_title: str, log_y: bool = False) -> go.Figure:
    figure.update_layout(
        title={"text": title, "x": 0.01, "font": {"size": 14}},
        paper_bgcolor="rgba(0,0,0,0)",
        plot_bgcolor="rgba(0,0,0,0)",
        font={"color": TEXT},
        margin={"l": 60, "r": 20, "t": 40, "b": 45},
        legend={"orientation": "h", "y": -0.22, "x": 0},
        height=360,
    )
    figure.update_xaxes(title=x_title, gridcolor=GRID, zeroline=False)
    figure.update_yaxes(title=y_title, gridcolor=GRID, zeroline=False, type="log" if log_y else "linear")
    return figure


def empty_figure(message: str) -> go.Figure:
    figure = _layout(go.Figure(), "", "", "")
    figure.update_xaxes(visible=False)
    figure.update_yaxes(visible=False)
    figure.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
                          font={"size": 14, "color": TEXT})
    return figure


def parse_module(module: str) -> tuple[int, str]:
    """("model.layers.12.mlp") -> (12, "mlp")."""
    parts = module.split(".")
    return int(parts[-2]), parts[-1]


def measured_modules(events: Iterable[ProgressEvent]) -> dict[str, list[dict]]:
    """module -> its candidates' {"bpw", "error"}, from the measure stage's events (the last one wins)."""
    return {e.module: list(e.candidates) for e in events if e.stage == "measure" and e.module and e.candidates}


def layer_errors(events: Iterable[ProgressEvent]) -> dict[int, float]:
    """layer -> relative output error of the quantized layer, from the quantize stage."""
    return {e.layer: e.error for e in events if e.stage == "quantize" and e.layer is not None and e.error is not None}


def layer_count(events: Iterable[ProgressEvent]) -> int | None:
    return next((e.layers for e in reversed(list(events)) if e.layers), None)


def measurement_figure(events: Sequence[ProgressEvent], chosen: dict[str, int] | None = None) -> go.Figure:
    """Each module's error for every candidate bpw, layer by layer, plus the chosen candidate
    once the allocation is known and each quantized layer's output error."""
    modules = measured_modules(events)
    quantized = layer_errors(events)
    chosen = dict(chosen or {})
    chosen.update({e.module: e.chosen for e in events if e.module and e.chosen is not None})
    if not modules and not quantized:
        return empty_figure("the per-layer error chart fills in as layers are measured")
    figure = go.Figure()
    all_bpw = [c["bpw"] for candidates in modules.values() for c in candidates]
    low, high = (min(all_bpw), max(all_bpw)) if all_bpw else (2.0, 8.0)
    for group in ("self_attn", "mlp"):
        xs, ys, colours, hover = [], [], [], []
        for module, candidates in sorted(modules.items(), key=lambda item: parse_module(item[0])):
            layer, module_group = parse_module(module)
            if module_group != group:
                continue
            for index, candidate in enumerate(candidates):
                xs.append(layer + GROUP_OFFSET[group])
                ys.append(max(candidate["error"], 1e-8))
                colours.append(candidate["bpw"])
                hover.append(f"{module}<br>candidate {index}: {candidate['bpw']:.2f} bpw<br>error {candidate['error']:.2e}")
        if not xs:
            continue
        figure.add_trace(go.Scatter(
            x=xs, y=ys, mode="markers", name=f"{GROUP_LABEL[group]} candidates",
            marker={"symbol": GROUP_SYMBOL[group], "size": 6, "color": colours, "colorscale": "Viridis",
                    "cmin": low, "cmax": high, "opacity": 0.8,
                    "colorbar": {"title": {"text": "bpw"}, "thickness": 12, "len": 0.8} if group == "self_attn" else None,
                    "showscale": group == "self_attn"},
            hovertext=hover, hoverinfo="text",
        ))
    picked = [(m, modules[m][i]) for m, i in chosen.items() if m in modules and 0 <= i < len(modules[m])]
    if picked:
        picked.sort(key=lambda item: parse_module(item[0]))
        figure.add_trace(go.Scatter(
            x=[parse_module(m)[0] + GROUP_OFFSET[parse_module(m)[1]] for m, _ in picked],
            y=[max(c["error"], 1e-8) for _, c in picked],
            mode="markers", name="chosen",
            marker={"symbol": "circle-open", "size": 13, "color": ACCENT, "line": {"width": 2.5}},
            hovertext=[f"{m}<br>chosen: {c['bpw']:.2f} bpw, error {c['error']:.2e}" for m, c in picked],
            hoverinfo="text",
        ))
    if quantized:
        layers = sorted(quantized)
        figure.add_trace(go.Scatter(
            x=layers, y=[max(quantized[i], 1e-8) for i in layers], mode="lines+markers",
            name="quantized layer output error", line={"color": ACCENT, "width": 2, "dash": "dot"},
            marker={"size": 5},
        ))
    _layout(figure, "Measured error per module and candidate", "decoder layer", "relative output error", log_y=True)
    total = layer_count(events)
    if total:
        # A fixed range makes the chart visibly fill from left to right as layers finish.
        figure.update_xaxes(range=[-0.6, total - 0.4])
    return figure


def bits_per_layer_figure(layer_bits: Sequence[float], target_bpw: float, real_bpw: float | None = None) -> go.Figure:
    if not layer_bits:
        return empty_figure("bits per layer appear when the conversion finishes")
    figure = go.Figure(go.Bar(
        x=list(range(len(layer_bits))), y=list(layer_bits), name="bpw per layer",
        marker={"color": list(layer_bits), "colorscale": "Viridis"},
        hovertemplate="layer %{x}: %{y:.3f} bpw<extra></extra>",
    ))
    figure.add_hline(y=target_bpw, line={"color": ACCENT, "dash": "dash"},
                     annotation_text=f"target {target_bpw:g}", annotation_font_color=ACCENT)
    if real_bpw is not None:
        figure.add_hline(y=real_bpw, line={"color": TEXT, "dash": "dot"}, annotation_text=f"average {real_bpw:.3f}",
                         annotation_position="bottom right", annotation_font_color=TEXT)
    _layout(figure, "Bits per weight of each decoder layer", "decoder layer", "bits per weight")
    figure.update_yaxes(range=[0, max(max(layer_bits), target_bpw) * 1.15])
    return figure


def perplexity_figure(points: Sequence[dict], title: str = "Perplexity vs bits per weight") -> go.Figure:
    """points: {"label", "bpw", "perplexity", "reference": bool}; the reference (the unquantized
    model) is drawn as a line, the quantized sizes as a curve."""
    quantized = sorted((p for p in points if not p.get("reference") and _finite(p.get("perplexity"))),
                       key=lambda p: p["bpw"])
    references = [p for p in points if p.get("reference") and _finite(p.get("perplexity"))]
    if not quantized and not references:
        return empty_figure("measure quality to compare the sizes of one model")
    figure = go.Figure()
    if quantized:
        figure.add_trace(go.Scatter(
            x=[p["bpw"] for p in quantized], y=[p["perplexity"] for p in quantized], mode="lines+markers+text",
            name="quantized", text=[f"{p['perplexity']:.1f}" for p in quantized], textposition="top center",
            hovertext=[f"{p['label']}<br>{p['bpw']:.3f} bpw, perplexity {p['perplexity']:.2f}" for p in quantized],
            hoverinfo="text", marker={"size": 9},
        ))
    for reference in references:
        figure.add_hline(y=reference["perplexity"], line={"color": ACCENT, "dash": "dash"},
                         annotation_text=f"{reference['label']}: {reference['perplexity']:.2f}",
                         annotation_font_color=ACCENT)
    _layout(figure, title, "bits per weight", "perplexity (lower is better)", log_y=True)
    return figure


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
