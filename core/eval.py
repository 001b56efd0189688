"""python -m core.eval -m <model> --data <file.txt> [--ctx 2048]: perplexity of a model on a text."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .cli_common import add_model_arguments, fail, load_from_args
from .perplexity import perplexity


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core.eval", description=__doc__)
    add_model_arguments(parser)
    parser.add_argument("--data", required=True, type=Path, help="UTF-8 text file to score")
    parser.add_argument("--ctx", type=int, default=2048, help="window length in tokens (default 2048)")
    parser.add_argument("--max-windows", type=int, default=0, help="score only the first N windows (0 = all)")
    args = parser.parse_args(argv)
    if args.ctx < 2:
        fail("--ctx must be at least 2")
    try:
        text = args.data.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        fail(f"cannot read {args.data}: {error}")
    loaded = load_from_args(args)
    token_ids = loaded.tokenizer.encode(text, add_special_tokens=False)
    if args.max_windows:
        token_ids = token_ids[: args.max_windows * args.ctx]
    start = time.perf_counter()

    def report(done: int, total: int, running: float) -> None:
        print(f"window {done}/{total}  running ppl {running:.4f}", file=sys.stderr, flush=True)

    try:
        value = perplexity(loaded.model, token_ids, args.ctx, report)
    except ValueError as error:
        fail(str(error))
    scored = len(token_ids) // args.ctx * args.ctx
    print(f"scored {scored} tokens in {time.perf_counter() - start:.1f} s (ctx {args.ctx})")
    print(f"ppl {value:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
