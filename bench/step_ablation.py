"""Where a graph-replayed decode step spends its time, by leaving kernels out.

    python -m bench.step_ablation [--model llama2-7b] [--bpw 4.0] [--layers N]

Under programmatic dependent launch a kernel's profiled time includes its wait
for the one before, so per-kernel sums overstate the step (bench/history/KERNEL_NOTES.md v5).
This captures the same decode step with groups of the small kernels replaced by
nothing (norms, attention with its rope and cache append, SwiGLU), or with the
inputs of the EXL2 products (or o_proj's alone) gathered by torch instead of
written in slot order by the kernel before (no "slot order"), or with the norms
and SwiGLU as kernels of their own instead of handed from product to product
(no "handoff"), and times each
graph's replay alone: the difference to the full step is what those kernels
cost in context. The outputs of an ablated step are meaningless; only its time
is read. Writes bench/results/step_ablation-<device>-<time>.json (or --out) for bench/report.py.
"""

from __future__ import annotations

import argparse
import types
from pathlib import Path

import torch

from bench.exl2_random import llama_config, random_model
from bench.provenance import write_run
from bench.speed import device_name
from core.cache import KVCache
from core.graph_decode import GraphDecoder


def skipping(ops, leave_out: set[str]):
    """ops with the named kernels replaced by the cheapest thing of the right shape."""
    replaced = types.SimpleNamespace(**{name: getattr(ops, name, None) for name in
                                        ("rms_norm", "rms_norm_slots", "rope_cache", "decode_attention", "silu_mul",
                                         "silu_mul_slots")})

    def unwritten_slots(x, tables):  # buffers of the right shape; allocating one launches nothing
        rows = x.numel() // x.shape[-1]
        return [x.new_empty(rows, table.numel()) for table in tables]

    if "norm" in leave_out:
        replaced.rms_norm = lambda x, weight, eps, residual=None: x
        replaced.rms_norm_slots = lambda x, weight, eps, residual, tables: [x, x, *unwritten_slots(x, tables)]
    if "attention" in leave_out:  # the decode attention kernel rotates and appends the token's key too
        replaced.decode_attention = lambda q, *args: q
        replaced.rope_cache = lambda *args: None
    if "silu" in leave_out:
        replaced.silu_mul = lambda gate, up: gate
        replaced.silu_mul_slots = lambda gate, up, table: unwritten_slots(gate, [table])[0]
    return replaced


def replay_time(decoder: GraphDecoder, position: int, repeats: int = 50) -> float:
    """Seconds per replay of the step's graph, replays queued back to back."""
    decoder._replay(position)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        for _ in range(repeats):
            decoder._replay(position)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000 / repeats)
    return sorted(times)[len(times) // 2]


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama2-7b")
    parser.add_argument("--bpw", type=float, default=4.0)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--position", type=int, default=160)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    config = llama_config(args.model, args.layers)
    model = random_model(config, args.bpw, "cuda", torch.float16)
    cache = KVCache(config, max(512, args.position + 64), device="cuda", dtype=torch.float16)
    decoder = GraphDecoder(model, cache)
    full_ops, slots, o_slots, handoffs = decoder.ops, decoder.slots, decoder.o_slots, decoder.handoffs
    # "slot order": the norms, SwiGLU and attention write plain rows and torch gathers every EXL2
    # product's inputs; "o slot order": only o_proj's.
    # "handoff": the norms and SwiGLU run as kernels of their own instead of inside the products.
    variants = [set(), {"handoff"}, {"slot order"}, {"o slot order"}, {"norm"}, {"attention"}, {"silu"},
                {"norm", "attention", "silu"}]
    print(f"{device_name()}, {args.model} {args.bpw} bpw, {config.num_layers} layers, position {args.position}")
    full = None
    rows = []
    for leave_out in variants:
        decoder.ops = skipping(full_ops, leave_out)
        decoder.slots = None if "slot order" in leave_out else slots
        decoder.o_slots = None if leave_out & {"slot order", "o slot order"} else o_slots
        # Leaving out the norm or SwiGLU kernels measures them where they are kernels.
        decoder.handoffs = None if leave_out & {"handoff", "slot order", "norm", "silu"} else handoffs
        decoder.graphs.clear()
        seconds = replay_time(decoder, args.position)
        full = full if full is not None else seconds
        label = "+".join(sorted(leave_out)) or "full step"
        print(f"{label:32s} {seconds * 1e3:.3f} ms ({1 / seconds:.0f} tok/s), "
              f"{(full - seconds) * 1e6 / config.num_layers:+.1f} us a layer less", flush=True)
        rows.append({"left_out": label, "step_ms": seconds * 1e3, "tok_s": 1 / seconds,
                     "us_a_layer_less": (full - seconds) * 1e6 / config.num_layers})
    write_run("step_ablation", "bench.step_ablation", torch.cuda.get_device_name(),
              {"model": args.model, "bpw": args.bpw, "layers": config.num_layers, "position": args.position,
               "rows": rows}, args.out)


if __name__ == "__main__":
    main()
