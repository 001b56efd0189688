"""Arguments and error reporting shared by the command-line tools."""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

import torch

from .loader import LoadedModel, load

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-m", "--model", default="demo", help="demo, a model folder, a .gguf file or a Hub id (default: demo)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="weight dtype (default: float32 on CPU, float16 on GPU)")


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def load_from_args(args: argparse.Namespace) -> LoadedModel:
    print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    try:
        return load(args.model, device=args.device, dtype=DTYPES.get(args.dtype), token=os.environ.get("HF_TOKEN"))
    except (ValueError, OSError) as error:
        # Our loaders raise ValueError subclasses whose text is meant for the user.
        fail(str(error))
