"""How long a conversion takes, stage by stage, and how much accelerator memory it holds.

    python -m bench.convert_speed                      # the demo model, 4.0 bpw, from scratch
    python -m bench.convert_speed --shape llama2-7b    # a Llama-2-7B-shaped model, random weights

Each run starts from an empty work dir, so calibration (for the demo: text the
model writes itself) and measurement are counted. A random-weight model gets a
tokenizer trained here and a made-up calibration text (its own writing would
be noise). Prints a markdown row and appends a record (with the command,
device, commit and date that bench/report.py reads) to
bench/results/convert-<device>.json.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from bench.provenance import provenance
from core.convert.job import ConversionJob, ConversionSettings
from core.convert.progress import ProgressEvent

RESULTS = Path(__file__).parent / "results"

SHAPES = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, rope_theta=10000.0, max_position_embeddings=4096),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192),
}


def write_random_model(shape: str, folder: Path, layers: int | None, device: str) -> None:
    """A Llama checkpoint of the real shape with random fp16 weights, one shard per layer.

    Weights are scaled like a trained model's (std 0.02), so activations stay finite
    through the layers, which is all a timing run needs of them.
    """
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.tiny_models import save_tiny_tokenizer

    config = dict(SHAPES[shape], architectures=["LlamaForCausalLM"], model_type="llama", rms_norm_eps=1e-5,
                  hidden_act="silu", tie_word_embeddings=False, torch_dtype="float16", bos_token_id=1, eos_token_id=2)
    if layers:
        config["num_hidden_layers"] = layers
    folder.mkdir(parents=True, exist_ok=True)
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = hidden // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    generator = torch.Generator(device=device).manual_seed(0)

    def random(*shape):
        return (torch.randn(*shape, generator=generator, device=device, dtype=torch.float16) * 0.02).cpu()

    weight_map = {}

    def shard(name: str, tensors: dict) -> None:
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in tensors})

    shard("embed.safetensors", {"model.embed_tokens.weight": random(vocab, hidden),
                                "lm_head.weight": random(vocab, hidden),
                                "model.norm.weight": torch.ones(hidden, dtype=torch.float16)})
    for index in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{index}."
        shard(f"layer{index:03d}.safetensors", {
            prefix + "self_attn.q_proj.weight": random(hidden, hidden),
            prefix + "self_attn.k_proj.weight": random(kv, hidden),
            prefix + "self_attn.v_proj.weight": random(kv, hidden),
            prefix + "self_attn.o_proj.weight": random(hidden, hidden),
            prefix + "mlp.gate_proj.weight": random(inter, hidden),
            prefix + "mlp.up_proj.weight": random(inter, hidden),
            prefix + "mlp.down_proj.weight": random(hidden, inter),
            prefix + "input_layernorm.weight": torch.ones(hidden, dtype=torch.float16),
            prefix + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.float16),
        })
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    save_tiny_tokenizer(folder, 320)


def calibration_file(path: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.tiny_models import sample_text

    path.write_text(sample_text(20000, seed=3))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="demo", choices=["demo", *SHAPES])
    parser.add_argument("--layers", type=int, default=None, help="cut a random model to this many layers")
    parser.add_argument("--bpw", type=float, default=4.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--work", type=Path, default=Path("/tmp/quantlab-convert-speed"))
    parser.add_argument("--rows", type=int, default=ConversionSettings.rows)
    parser.add_argument("--length", type=int, default=ConversionSettings.length)
    parser.add_argument("--profile", action="store_true", help="print where the time goes (cProfile, top functions)")
    args = parser.parse_args()

    shutil.rmtree(args.work / "work", ignore_errors=True)
    shutil.rmtree(args.work / "output", ignore_errors=True)
    calibration = None
    if args.shape == "demo":
        source = "demo"
    else:
        source = args.work / f"{args.shape}-{args.layers or 'all'}"
        if not (source / "config.json").is_file():
            start = time.perf_counter()
            write_random_model(args.shape, source, args.layers, args.device)
            print(f"wrote the random model in {time.perf_counter() - start:.0f} s", flush=True)
        calibration = str(calibration_file(args.work / "calibration.txt"))

    stage_start: dict[str, float] = {}
    last_stage = [None]

    def on_event(event: ProgressEvent) -> None:
        if event.stage != last_stage[0]:
            stage_start[event.stage] = time.perf_counter()
            last_stage[0] = event.stage
            print(f"  {event.stage} at {stage_start[event.stage] - begin:.1f} s", flush=True)

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    measurement_rows = min(args.rows, ConversionSettings.measurement_rows)
    settings = ConversionSettings(bpw=args.bpw, rows=args.rows, length=args.length, calibration=calibration,
                                  measurement_rows=measurement_rows,
                                  measurement_eval_rows=min(measurement_rows, ConversionSettings.measurement_eval_rows))
    build_seconds = None
    if device.type == "cuda":
        # The one-time kernel build is not conversion time: do it first, report it apart.
        from core.kernels.build import kernels

        start = time.perf_counter()
        kernels()
        build_seconds = round(time.perf_counter() - start, 1)
        print(f"kernels ready in {build_seconds} s", flush=True)
    job = ConversionJob(str(source), args.work / "work", args.work / "output", settings, device=str(device),
                        on_event=on_event)
    profiler = cProfile.Profile() if args.profile else None
    begin = time.perf_counter()
    result = profiler.runcall(job.run) if profiler else job.run()
    seconds = time.perf_counter() - begin
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(40)
    stages = sorted(stage_start.items(), key=lambda item: item[1]) + [("end", begin + seconds)]
    durations = {name: round(stages[i + 1][1] - at, 2) for i, (name, at) in enumerate(stages[:-1])}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    record = {
        **provenance("convert", "bench.convert_speed", name),
        "model": args.shape if not args.layers else f"{args.shape} ({args.layers} layers)",
        "target_bpw": args.bpw, "bpw": round(result.bpw, 4), "seconds": round(seconds, 1), "stages": durations,
        "rows": args.rows, "length": args.length,
        "peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
        "size_gb": round(result.size_bytes / 1e9, 3), "kernel_build_s": build_seconds,
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"convert-{name.replace(' ', '_')}.json"
    records = json.loads(path.read_text()) if path.is_file() else []
    path.write_text(json.dumps(records + [record], indent=1))
    print("| model | device | target bpw | real bpw | total s | stages s | peak GPU GiB | size GB |")
    print("|---|---|---|---|---|---|---|---|")
    stage_text = ", ".join(f"{k} {v:.1f}" for k, v in durations.items())
    print(f"| {record['model']} | {name} | {args.bpw} | {result.bpw:.3f} | {seconds:.1f} | {stage_text} | "
          f"{record['peak_mem_gib']} | {record['size_gb']} |")


if __name__ == "__main__":
    main()
