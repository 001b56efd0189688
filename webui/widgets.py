"""Controls more than one tab shows the same way."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr


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
