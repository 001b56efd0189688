"""GPTQ 4-bit matrix-vector speed against the device's copy bandwidth.

    python -m bench.gptq4_speed [--batches 1,2,4,8,16] [--sweep] [--json FILE]

One 4096x11008 layer (Llama-2-7B's MLP up/gate shape), group size 128, with
and without act-order, random codes written straight into the AutoGPTQ layout
(any int32 word is a valid run of eight codes, so no quantization is needed).
Writes bench/results/gptq4-<device>-<time>.json. Each figure is the median of 20 replays of a CUDA graph of 24 calls over 6
copies of the layer, so the L2 cache holds none of the weights. Bandwidth is
the bytes of qweight, qzeros and scales over the time; the same run measures
a 2 GiB device-to-device copy, the fp16 cuBLAS product of the same shape, and
the EXL2 4-bit kernel on it, for comparison. --sweep also tries block shapes.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from bench.provenance import write_run
from core.formats.gptq import kernel as gptq4
from core.formats.gptq.layout import default_g_idx, sort_rows_by_group
from core.kernels import dispatch

SHAPE = (4096, 11008)
GROUP_SIZE = 128


def random_gptq_tensors(in_features: int, out_features: int, group_size: int = GROUP_SIZE, act_order: bool = False,
                        device="cuda", seed: int = 0) -> dict[str, torch.Tensor]:
    """qweight, qzeros, scales, g_idx of one random layer, as a checkpoint stores them (rows not yet sorted).

    Scales are chosen so the layer roughly keeps its input's size: codes minus
    zeros have an RMS of about 6.5 (uniform codes against uniform zeros)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    size = in_features if group_size == -1 else group_size
    groups = math.ceil(in_features / size)

    def words(*shape):
        values = torch.randint(0, 1 << 32, shape, dtype=torch.int64, generator=generator, device=device)
        return torch.where(values >= 1 << 31, values - (1 << 32), values).to(torch.int32)

    unit = 1 / (6.5 * math.sqrt(in_features))
    scales = (unit * (0.5 + torch.rand(groups, out_features, generator=generator, device=device))).half()
    g_idx = default_g_idx(in_features, group_size, device)
    if act_order:
        order = torch.randperm(in_features, generator=generator, device=device)
        g_idx = torch.empty_like(g_idx).index_copy_(0, order, g_idx)
    return {"qweight": words(in_features // 8, out_features), "qzeros": words(groups, out_features // 8),
            "scales": scales, "g_idx": g_idx}


def sorted_layer(tensors: dict[str, torch.Tensor], zero_offset: int = 1):
    """(sorted qweight, plan): what GPTQLinear holds once loaded on the GPU."""
    qweight, g_idx, perm = sort_rows_by_group(tensors["qweight"], tensors["g_idx"])
    plan = gptq4.plan_layer(qweight, tensors["qzeros"], tensors["scales"], g_idx, perm, zero_offset)
    return qweight, plan


def stored_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(tensors[name].numel() * tensors[name].element_size() for name in ("qweight", "qzeros", "scales"))


def gptq_rows(batches, act_order: bool, copies: int = 6) -> list[dict]:
    from bench.speed import graph_time  # bench.speed loads the engine; tests import this file for its layers

    layers = [random_gptq_tensors(*SHAPE, act_order=act_order, seed=i) for i in range(copies)]
    prepared = [sorted_layer(t) for t in layers]
    rows = []
    for batch in batches:
        x = torch.randn(batch, SHAPE[0], device="cuda").half()
        gptq4.reserve_scratch(x.device, batch, SHAPE[1])
        seconds = graph_time(lambda i: gptq4.gemm_small(x, *prepared[i]), copies)
        stored = stored_bytes(layers[0])
        rows.append({"kernel": "gptq4", "act_order": act_order, "batch": batch, "threads": gptq4.THREADS,
                     "blocks_per_sm": gptq4.BLOCKS_PER_SM, "prefetch": gptq4.PREFETCH, "async_copy": gptq4.ASYNC_COPY, "us": seconds * 1e6, "bytes": stored,
                     "gb_s": stored / seconds / 1e9})
    return rows


def fp16_row(copies: int = 6) -> dict:
    from bench.speed import graph_time

    weights = [torch.randn(SHAPE, device="cuda").half() for _ in range(copies)]
    x = torch.randn(1, SHAPE[0], device="cuda").half()
    seconds = graph_time(lambda i: x @ weights[i], copies)
    stored = weights[0].numel() * 2
    return {"kernel": "fp16 cuBLAS", "batch": 1, "us": seconds * 1e6, "bytes": stored, "gb_s": stored / seconds / 1e9}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gptq4_speed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,2,4,8,16")
    parser.add_argument("--sweep", action="store_true",
                        help="also try threads 64/128/256 x 2/4/8 blocks per SM with each way of loading weights early")
    parser.add_argument("--json", default=None, help="write every row here (default: bench/results/gptq4-<device>-<time>.json)")
    args = parser.parse_args(argv)
    from bench.speed import copy_bandwidth, device_name, kernel_bandwidth

    assert dispatch.enabled(torch.device("cuda")), "the kernels must build here"
    batches = [int(b) for b in args.batches.split(",")]
    bandwidth = copy_bandwidth()
    rows = gptq_rows(batches, act_order=False) + gptq_rows([1], act_order=True)
    if args.sweep:
        defaults = gptq4.THREADS, gptq4.BLOCKS_PER_SM, gptq4.PREFETCH, gptq4.ASYNC_COPY
        for weights_early in ("async copy", "none", "L2 prefetch"):
            for threads in (64, 128, 256):
                for per_sm in (2, 4, 8):
                    gptq4.THREADS, gptq4.BLOCKS_PER_SM = threads, per_sm
                    gptq4.ASYNC_COPY, gptq4.PREFETCH = weights_early == "async copy", weights_early == "L2 prefetch"
                    rows += gptq_rows([1, 4] if weights_early != "L2 prefetch" else [1], act_order=False)
        gptq4.THREADS, gptq4.BLOCKS_PER_SM, gptq4.PREFETCH, gptq4.ASYNC_COPY = defaults
    rows.append(fp16_row())
    exl2 = kernel_bandwidth([4])[0]
    rows.append({"kernel": "exl2 4-bit", "batch": 1, "us": exl2["us"], "bytes": exl2["bytes"], "gb_s": exl2["gb_s"]})
    device = torch.cuda.get_device_name()
    print(f"\n{device}, copy bandwidth {bandwidth / 1e12:.2f} TB/s (2 GiB device-to-device, read + write)")
    print(f"{SHAPE[0]}x{SHAPE[1]}, group size {GROUP_SIZE}\n")
    print("| kernel | act-order | batch | threads x blocks/SM | weights early | µs | GB/s | of copy |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        shape = f"{row['threads']} x {row['blocks_per_sm']}" if "threads" in row else "–"
        order = ("yes" if row["act_order"] else "no") if "act_order" in row else "–"
        early = "–"
        if "prefetch" in row:
            early = "async copy" if row["async_copy"] else "L2 prefetch" if row["prefetch"] else "none"
        print(f"| {row['kernel']} | {order} | {row['batch']} | {shape} | {early} | {row['us']:.1f} | "
              f"{row['gb_s']:.0f} | {row['gb_s'] * 1e9 / bandwidth:.0%} |")
    write_run("gptq4", "bench.gptq4_speed", device, {"device_short": device_name(), "copy_bandwidth": bandwidth,
                                                      "torch": torch.__version__, "rows": rows},
              Path(args.json) if args.json else None, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
