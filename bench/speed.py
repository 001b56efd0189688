"""GPU speed of the engine on Llama-2-7B- and Llama-3-8B-shaped models with random weights.

    python -m bench.speed [--models llama2-7b,llama3-8b] [--bpw 2.5,3.0,4.0,5.0,6.0,fp16]
                          [--layers N] [--decode-tokens 64] [--prefill 2048] [--no-hf] [--quick]
                          [--profile] [--matrix-only] [--matrix-batches 1,4,16] [--matrix-shapes 4096x11008,...]

EXL2 models are written directly in the stored layout (bench/exl2_random.py), so
no conversion runs. For each model and bpw: batch-1 decode (CUDA graph replay,
as the chat generator does), prefill of `--prefill` tokens, peak GPU memory, and
the ratio of decode speed to its roofline = copy bandwidth / bytes read per
token (every weight once, plus the KV cache so far). In the same run: the
device's copy bandwidth, HF transformers fp16 on the same shapes, and the
small-batch kernel's bandwidth on a 4096x11008 matrix (or --matrix-shapes) per width. Prints a
markdown table and writes bench/results/speed-<device>-<time>.json (or --out), with the command,
device, commit and date that bench/report.py puts in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import time
from pathlib import Path

import torch

from bench.exl2_random import MIXES, layout_for, llama_config, quantized_bits, random_exl2_tensors, random_model
from bench.provenance import write_run
from core.cache import KVCache
from core.formats.exl2 import kernel as exl2
from core.formats.exl2.layout import stored_bits
from core.generator import GenerationStats, Generator
from core.graph_decode import GraphDecoder
from core.kernels import reference
from core.kernels.build import kernels
from core.sampling import SamplingSettings


def device_name() -> str:
    return torch.cuda.get_device_name().replace("NVIDIA ", "").replace(" ", "-")


def timed(fn, repeats: int) -> float:
    """Median seconds of fn() over `repeats`, timed with device events after a warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Bytes read plus written per second by a 2 GiB device-to-device copy."""
    source = torch.randn(256 << 20, device="cuda")
    target = torch.empty_like(source)
    seconds = timed(lambda: target.copy_(source), 20)
    return 2 * source.numel() * 4 / seconds


# Matrices of several widths, as EXL2 conversions write them (highest first in act-order): a warp's
# quads then change width, which uniform matrices never make it do.
MIXED = {"mix-2.5": MIXES[2.5], "mix-4.1": [(6, 0.1), (5, 0.2), (4, 0.4), (3, 0.3)]}


def exl2_copies(shape: tuple[int, int], bits, copies: int) -> list[tuple[dict, exl2.Exl2Plan]]:
    """`copies` random EXL2 layers of one shape and width (or MIXED name) with their kernel plans:
    distinct bytes, so a timed round over them finds none in L2."""
    in_features, out_features = shape
    mix = MIXED[bits] if bits in MIXED else [(bits, 1.0)]
    layers = []
    for i in range(copies):
        tensors = random_exl2_tensors(in_features, out_features, layout_for(in_features, mix), "cuda", seed=i)
        layers.append((tensors, exl2.plan_layer(tensors, out_features)))
    return layers


def slotted_product_time(x: torch.Tensor, layers: list[tuple[dict, exl2.Exl2Plan]], copies: int) -> float:
    """Seconds per product of x by layers[i] (graph_time), the input in slot order as the decode
    step's norms, SwiGLU and attention write it."""
    x_slots = [[reference.slot_gather(x, plan.xperm)] for _, plan in layers]
    return graph_time(lambda i: exl2.gemm_group(x, [(*layers[i], None)], x_slots[i]), copies)


def kernel_bandwidth(bits_list, copies: int = 6, batch: int = 1, shape: tuple[int, int] = (4096, 11008)) -> list[dict]:
    """Small-batch product on one (in, out) shape at each width (or MIXED name), over several copies
    so L2 holds none, its inputs in slot order as the decode step's norms, SwiGLU and attention write them."""
    rows = []
    in_features, out_features = shape
    for bits in bits_list:
        layers = exl2_copies(shape, bits, copies)
        x = torch.randn(batch, in_features, device="cuda").half()
        exl2.reserve_scratch(x.device, batch, out_features)
        seconds = slotted_product_time(x, layers, copies)
        stored = stored_bits(layers[0][0]) / 8
        rows.append({"shape": f"{in_features}x{out_features}", "bits": bits, "batch": batch, "us": seconds * 1e6,
                     "bytes": stored, "gb_s": stored / seconds / 1e9})
        del layers
    return rows


def launch_sweep(shape: tuple[int, int], bits: int = 4, copies: int = 6) -> list[dict]:
    """The small-batch kernel at batch 1 on one shape under each block shape the launcher can take
    (warps per block, blocks per SM the K split aims for, quads per warp): which split is fastest."""
    in_features, out_features = shape
    layers = exl2_copies(shape, bits, copies)
    plan = layers[0][1]
    x = torch.randn(1, in_features, device="cuda").half()
    exl2.reserve_scratch(x.device, 1, out_features)
    saved = exl2.WARPS, exl2.BLOCKS_PER_SM, exl2.QUADS_PER_WARP
    rows = []
    try:
        for warps in (4, 8):
            for per_sm in (1, 2, 3, 4, 6):
                for per_warp in (1, 2, 3, 4):
                    exl2.WARPS, exl2.BLOCKS_PER_SM, exl2.QUADS_PER_WARP = warps, per_sm, per_warp
                    exl2.launch_shape.cache_clear()
                    split = exl2.launch_shape(plan.quads, plan.column_tiles, plan.multiprocessors, 1, per_sm, warps,
                                              per_warp)
                    seconds = slotted_product_time(x, layers, copies)
                    rows.append({"shape": f"{in_features}x{out_features}", "bits": bits, "warps": warps,
                                 "blocks_per_sm": per_sm, "quads_per_warp": per_warp, "slices": split[0],
                                 "quads_per_slice": split[1], "block_warps": split[2], "us": seconds * 1e6})
    finally:
        exl2.WARPS, exl2.BLOCKS_PER_SM, exl2.QUADS_PER_WARP = saved
        exl2.launch_shape.cache_clear()
    return rows


def graph_time(launch, copies: int = 6, repeats: int = 4) -> float:
    """Seconds per call of launch(i), i over `copies` copies of the bytes (so L2 holds none between
    calls), timed as one CUDA graph of `repeats` rounds: launch gaps are those of a decode step."""
    for i in range(copies):  # first calls (tables, handles, allocations) outside the capture
        launch(i)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            for i in range(copies):
                launch(i)
    return timed(graph.replay, 20) / (copies * repeats)


def model_bytes_per_token(model) -> int:
    """Bytes a decode step must read: every linear layer's stored tensors, norms, one embedding row."""
    total = 0
    for name, module in model.named_modules():
        if hasattr(module, "quantized_tensors"):
            total += stored_bits(module.quantized_tensors()) // 8
        elif hasattr(module, "weight") and module.weight is not None and "embed" not in name:
            total += module.weight.numel() * module.weight.element_size()
    return total


def kv_bytes(config, length: int) -> int:
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * length * 2


@torch.inference_mode()
def run_ours(config, bpw, prefill: int, decode_tokens: int, bandwidth: float, profile: bool = False) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = random_model(config, bpw, "cuda", torch.float16)
    cache = KVCache(config, prefill + decode_tokens + 8, device="cuda", dtype=torch.float16)
    prompt = torch.randint(0, config.vocab_size, (1, prefill), device="cuda")
    # Prefill: the whole prompt in one forward, as a long chat turn would be.
    prefill_s = timed(lambda: model(prompt, cache, 0, last_only=True), 3)
    decoder = GraphDecoder(model, cache)
    start_position = 128  # a short chat turn: decode right after a 128-token prompt
    model(prompt[:, :start_position], cache, 0, last_only=True)
    decoder.step(1, start_position)  # capture
    torch.cuda.synchronize()
    # Graph replay with the host waiting for each token before it launches the next: the loop
    # the chat generator ran before it queued a step ahead; kept to show what the overlap gains.
    start = time.perf_counter()
    token = 1
    for i in range(decode_tokens):
        token = int(decoder.step(token, start_position + i).argmax())
    graph_sync_s = (time.perf_counter() - start) / decode_tokens
    if profile:
        from torch.profiler import ProfilerActivity

        with torch.profiler.profile(activities=[ProfilerActivity.CUDA]) as profiler:
            for i in range(5):
                decoder.step(token, start_position + i)
            torch.cuda.synchronize()
        print(profiler.key_averages().table(sort_by="cuda_time_total", row_limit=25), flush=True)
    # Plain launches, no graph: what the step costs from Python on this host.
    ids = torch.tensor([[token]], device="cuda")
    eager_s = timed(lambda: model(ids, cache, start_position), 5)
    del decoder, cache
    gc.collect()
    # The chat generator's own token loop (greedy, sampled on the device, the next step queued
    # before the host reads the token), timed from its first new token to its last.
    generator = Generator(model, tokenizer=None, max_seq_len=start_position + decode_tokens + 8)
    prompt_ids = prompt[0, :start_position].tolist()
    for _ in range(2):  # the first run captures the graphs
        stats = GenerationStats()
        for _ in generator.token_stream(prompt_ids, SamplingSettings.greedy(), decode_tokens, stats=stats):
            pass
    assert stats.new_tokens == decode_tokens, stats
    decode_s = 1 / stats.generation_tok_s
    weight_bytes = model_bytes_per_token(model)
    bytes_per_token = weight_bytes + kv_bytes(config, start_position + decode_tokens // 2)
    floor_s = bytes_per_token / bandwidth
    bits, weights = quantized_bits(model)
    record = {
        "bpw": bpw if bpw is not None else 16.0,
        "real_bpw": bits / weights if weights else 16.0,
        "engine": "quantlab",
        "decode_tok_s": 1 / decode_s,
        "decode_graph_sync_tok_s": 1 / graph_sync_s,
        "decode_eager_tok_s": 1 / eager_s,
        "prefill_tok_s": prefill / prefill_s,
        "roofline_tok_s": 1 / floor_s,
        "roofline_ratio": floor_s / decode_s,
        "weight_gb": weight_bytes / 1e9,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
    }
    del model, generator
    gc.collect()
    return record


@torch.inference_mode()
def run_transformers(config, prefill: int, decode_tokens: int, bandwidth: float) -> dict:
    import transformers

    torch.cuda.empty_cache()
    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, rope_theta=config.rope_theta, max_position_embeddings=4096)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device("cuda"):
            model = transformers.LlamaForCausalLM(hf_config).eval()
    finally:
        torch.set_default_dtype(default)
    torch.cuda.reset_peak_memory_stats()
    prompt = torch.randint(0, config.vocab_size, (1, prefill), device="cuda")
    prefill_s = timed(lambda: model(prompt, use_cache=True, logits_to_keep=1), 3)
    out = model(prompt[:, :128], use_cache=True, logits_to_keep=1)
    past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(decode_tokens):
        out = model(token, past_key_values=past, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        int(token)
    decode_s = (time.perf_counter() - start) / decode_tokens
    weight_bytes = sum(p.numel() * 2 for n, p in model.named_parameters() if "embed" not in n)
    floor_s = (weight_bytes + kv_bytes(config, 128 + decode_tokens // 2)) / bandwidth
    record = {
        "bpw": 16.0, "real_bpw": 16.0, "engine": "transformers",
        "decode_tok_s": 1 / decode_s, "prefill_tok_s": prefill / prefill_s,
        "roofline_tok_s": 1 / floor_s, "roofline_ratio": floor_s / decode_s, "weight_gb": weight_bytes / 1e9,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
    }
    del model, past, out
    gc.collect()
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="llama2-7b,llama3-8b")
    parser.add_argument("--bpw", default="2.5,3.0,4.0,5.0,6.0,fp16")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers than the real model, for a short run")
    parser.add_argument("--prefill", type=int, default=2048)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--no-hf", action="store_true", help="skip HF transformers")
    parser.add_argument("--quick", action="store_true", help="llama2-7b, 4 layers, 4.0 bpw and fp16")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--warps", type=int, default=exl2.WARPS, help="warps per block of the small-batch kernel")
    parser.add_argument("--blocks-per-sm", type=int, default=exl2.BLOCKS_PER_SM)
    parser.add_argument("--matrix-only", action="store_true", help="only the 4096x11008 kernel table")
    parser.add_argument("--matrix-batches", default="1", help="batch sizes of the kernel table, e.g. 1,4,16")
    parser.add_argument("--matrix-shapes", default="4096x11008",
                        help="in x out shapes of the kernel table, e.g. 4096x11008,4096x4096,11008x4096")
    parser.add_argument("--profile", action="store_true", help="kernel times of five graph-replayed decode steps")
    parser.add_argument("--sweep", action="store_true",
                        help="first time the 4-bit batch-1 kernel under each block shape, on each --matrix-shapes")
    args = parser.parse_args()
    if args.quick:
        args.models, args.bpw, args.layers = "llama2-7b", "4.0,fp16", args.layers or 4
    assert kernels() is not None, "the CUDA kernels did not build"
    exl2.WARPS, exl2.BLOCKS_PER_SM = args.warps, args.blocks_per_sm
    device = device_name()
    bandwidth = copy_bandwidth()
    print(f"device {device}, copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    if args.sweep:
        for shape in args.matrix_shapes.split(","):
            for row in launch_sweep(tuple(int(v) for v in shape.split("x"))):
                print(f"sweep {row['shape']} warps {row['warps']} blocks/SM {row['blocks_per_sm']} quads/warp "
                      f"{row['quads_per_warp']} -> {row['slices']} slices of {row['quads_per_slice']} quads, "
                      f"{row['block_warps']} warps: {row['us']:.1f} us", flush=True)
    matrix = []
    for shape in args.matrix_shapes.split(","):
        in_features, out_features = (int(v) for v in shape.split("x"))
        for batch in (int(b) for b in args.matrix_batches.split(",")):
            matrix += kernel_bandwidth((2, 3, 4, 5, 6, 8, *MIXED), batch=batch, shape=(in_features, out_features))
    for row in matrix:
        print(f"{row['shape']} {row['bits']}-bit batch {row['batch']}: {row['us']:.1f} us, {row['gb_s']:.0f} GB/s "
              f"({row['gb_s'] * 1e9 / bandwidth:.0%} of copy)", flush=True)
    if args.matrix_only:
        return
    records = []
    for name in args.models.split(","):
        config = llama_config(name, layers=args.layers)
        for spec in args.bpw.split(","):
            bpw = None if spec == "fp16" else float(spec)
            record = {"model": name, "layers": config.num_layers, "batch": 1, "device": device,
                      **run_ours(config, bpw, args.prefill, args.decode_tokens, bandwidth,
                                args.profile and spec in ("4.0", "fp16"))}
            records.append(record)
            print(json.dumps(record), flush=True)
        if not args.no_hf:
            record = {"model": name, "layers": config.num_layers, "batch": 1, "device": device,
                      **run_transformers(config, args.prefill, args.decode_tokens, bandwidth)}
            records.append(record)
            print(json.dumps(record), flush=True)
    # "matrix_4096x11008" holds every --matrix-shapes row; the name stays so old and new files read alike.
    write_run("speed", "bench.speed", torch.cuda.get_device_name(),
              {"device_short": device, "copy_bandwidth_gb_s": bandwidth / 1e9, "matrix_4096x11008": matrix,
               "rows": records}, args.out)
    print(f"\n{device}, copy {bandwidth / 1e12:.2f} TB/s, prefill {args.prefill} tokens, batch-1 decode after 128\n")
    print("| model | layers | engine | bpw (real) | decode tok/s | graph, host-synced tok/s | eager tok/s | "
          "roofline tok/s | ratio | prefill tok/s | peak GiB |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for r in records:
        print(f"| {r['model']} | {r['layers']} | {r['engine']} | {r['bpw']:g} ({r['real_bpw']:.2f}) | "
              f"{r['decode_tok_s']:.0f} | {r.get('decode_graph_sync_tok_s', float('nan')):.0f} | "
              f"{r.get('decode_eager_tok_s', float('nan')):.0f} | {r['roofline_tok_s']:.0f} | "
              f"{r['roofline_ratio']:.0%} | {r['prefill_tok_s']:.0f} | {r['peak_mem_gib']:.1f} |")
    print("\n| shape | bits | batch | us | GB/s | of copy |\n|---|---|---|---|---|---|")
    for row in matrix:
        print(f"| {row['shape']} | {row['bits']} | {row['batch']} | {row['us']:.1f} | {row['gb_s']:.0f} | "
              f"{row['gb_s'] * 1e9 / bandwidth:.0%} |")


if __name__ == "__main__":
    main()
