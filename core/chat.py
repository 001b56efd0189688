"""python -m core.chat -m demo: chat with a model in the terminal.

Ctrl-C stops the answer being written; Ctrl-C (or Ctrl-D) at the prompt quits.
With -p the model answers one prompt and exits, so the tool can be scripted.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from .cli_common import add_model_arguments, fail, load_from_args
from .generator import Generator
from .loader import LoadedModel
from .sampling import SamplingSettings


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m core.chat", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("-p", "--prompt", help="answer this one prompt and exit")
    parser.add_argument("-s", "--system", default=None, help="system prompt")
    parser.add_argument("--template", default=None, help="chat template: the model's own (default), raw, llama or chatml")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--ctx", type=int, default=None, help="context length (default: the model's, at most 4096)")
    parser.add_argument("--greedy", action="store_true", help="always pick the most likely token")
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--min-p", type=float, default=None)
    parser.add_argument("--repetition-penalty", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    return parser.parse_args(argv)


def sampling_from_args(args: argparse.Namespace, loaded: LoadedModel) -> SamplingSettings:
    if args.greedy:
        return SamplingSettings.greedy()
    # The model's generation_config.json sets the defaults, as transformers does; flags override.
    values = dict(loaded.sampling_defaults)
    for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    try:
        return SamplingSettings(**values)
    except (TypeError, ValueError) as error:
        fail(f"bad sampling settings: {error}")


def answer(generator: Generator, loaded: LoadedModel, messages: list[dict], args, settings) -> str:
    """Stream one answer to stdout; Ctrl-C stops it between tokens."""
    cancel = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: cancel.set())
    try:
        prompt_ids = fit_to_context(loaded, generator, messages, args)
        parts = []
        for chunk in generator.stream(prompt_ids, settings, args.max_new_tokens, loaded.stop_token_ids, args.stop, cancel):
            print(chunk.text, end="", flush=True)
            parts.append(chunk.text)
            stats = chunk.stats
    finally:
        signal.signal(signal.SIGINT, previous)
    print()
    note = " [stopped]" if stats.stop_reason == "cancelled" else ""
    print(f"-- {stats.summary()}{note}", file=sys.stderr, flush=True)
    return "".join(parts)


def fit_to_context(loaded: LoadedModel, generator: Generator, messages: list[dict], args) -> list[int]:
    """Encode the conversation, dropping its oldest turns while it leaves no room to answer."""
    room = min(args.max_new_tokens, generator.max_seq_len // 2)
    while True:
        ids = loaded.tokenizer.encode_chat(messages, add_generation_prompt=True, template=args.template)
        first_turn = 1 if messages[0]["role"] == "system" else 0
        if len(ids) + room <= generator.max_seq_len or len(messages) - first_turn <= 1:
            return ids
        del messages[first_turn : first_turn + 2]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    loaded = load_from_args(args)
    settings = sampling_from_args(args, loaded)
    generator = Generator(loaded.model, loaded.tokenizer, max_seq_len=args.ctx)
    print(f"{loaded.name} on {loaded.device} ({loaded.model.dtype}), context {generator.max_seq_len}", file=sys.stderr)
    system = [{"role": "system", "content": args.system}] if args.system else []
    try:
        if args.prompt is not None:
            answer(generator, loaded, system + [{"role": "user", "content": args.prompt}], args, settings)
            return 0
        messages = list(system)
        while True:
            try:
                user = input("\nUser: ")
            except (EOFError, KeyboardInterrupt):
                print()
                return 0
            if not user.strip():
                continue
            messages.append({"role": "user", "content": user})
            print("Assistant: ", end="", flush=True)
            reply = answer(generator, loaded, messages, args, settings)
            messages.append({"role": "assistant", "content": reply})
    except ValueError as error:
        fail(str(error))


if __name__ == "__main__":
    sys.exit(main())
