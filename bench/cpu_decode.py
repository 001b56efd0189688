"""CPU decode speed of the demo model: our engine against HF transformers, in the same run.

    python -m bench.cpu_decode [--tokens 128] [--repeats 3]

Both run the same weights in float32 with greedy decoding from the same chat
prompt; runs alternate between the two so machine load hits both alike. Prints a
markdown table (median of the repeats) and writes bench/results/cpu_decode-cpu-<time>.json
with the command, commit and date that bench/report.py puts in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.provenance import write_run
from core.generator import Generator
from core.loader import load
from core.sampling import SamplingSettings


def ours(loaded, prompt: list[int], tokens: int) -> tuple[float, float]:
    generator = Generator(loaded.model, loaded.tokenizer)
    _, stats = generator.generate(prompt, settings=SamplingSettings.greedy(), max_new_tokens=tokens)
    return stats.prompt_tok_s, stats.generation_tok_s


@torch.inference_mode()
def transformers_run(model, prompt: list[int], tokens: int) -> tuple[float, float]:
    ids = torch.tensor([prompt])
    start = time.perf_counter()
    out = model(ids, use_cache=True)
    prefill = time.perf_counter() - start
    past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(tokens - 1):
        out = model(token, past_key_values=past, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return len(prompt) / prefill, (tokens - 1) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    loaded = load("demo", device="cpu")
    reference = AutoModelForCausalLM.from_pretrained(loaded.folder, dtype=torch.float32).eval()
    prompt = loaded.tokenizer.encode_chat([{"role": "user", "content": "Write a long story about a dragon who learns to bake bread."}])
    ours(loaded, prompt, 8), transformers_run(reference, prompt, 8)  # warm-up
    results = {"quantlab": [], "transformers": []}
    for _ in range(args.repeats):
        results["quantlab"].append(ours(loaded, prompt, args.tokens))
        results["transformers"].append(transformers_run(reference, prompt, args.tokens))
    print(f"demo model (SmolLM2-135M), float32, CPU threads {torch.get_num_threads()}, "
          f"prompt {len(prompt)} tokens, {args.tokens} new tokens, median of {args.repeats}\n")
    print("| engine | prefill tok/s | decode tok/s |\n|---|---|---|")
    rows = []
    for engine, runs in results.items():
        prefill = statistics.median(r[0] for r in runs)
        decode = statistics.median(r[1] for r in runs)
        rows.append({"engine": engine, "prefill_tok_s": prefill, "decode_tok_s": decode})
        print(f"| {engine} | {prefill:.0f} | {decode:.1f} |")
    import transformers  # already loaded above; only its version is wanted here

    write_run("cpu_decode", "bench.cpu_decode", "cpu",
              {"threads": torch.get_num_threads(), "prompt_tokens": len(prompt), "new_tokens": args.tokens,
               "repeats": args.repeats, "transformers": transformers.__version__, "rows": rows})


if __name__ == "__main__":
    main()
