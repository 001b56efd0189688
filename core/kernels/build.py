"""Just-in-time build of the CUDA kernels in this folder, once per GPU architecture.

`kernels()` returns the compiled extension, or None when it cannot exist here
(no CUDA GPU, CPU-only torch, no nvcc or ninja, a GPU older than sm_75, a failed
build); the first None on a machine with a GPU comes with one warning, and every
caller then takes the torch reference path in reference.py.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import warnings
from pathlib import Path

import torch

from ..paths import cache_dir

HERE = Path(__file__).resolve().parent
SOURCES = ("bindings.cpp", "bindings.h", "bindings_attention.cpp", "bindings_exl2.cpp", "bindings_exl3.cpp",
           "bindings_fused.cpp", "bindings_gptq.cpp", "attention.cu", "attention.h", "exl2.cu", "exl2.h", "exl3.h",
           "exl3_decode.cu", "exl3_gemv.cu", "exl3_hadamard.cu", "exl3_trellis.cuh", "exl3_viterbi.cu", "fused.cu",
           "fused.h", "launch.h", "rounding.h", "gptq.cu", "gptq.h", "gptq4.cu", "gptq4.h")
# Compiled units (headers are hashed for the cache key only).
COMPILED = ("bindings.cpp", "bindings_attention.cpp", "bindings_exl2.cpp", "bindings_exl3.cpp", "bindings_fused.cpp",
            "bindings_gptq.cpp", "attention.cu", "exl2.cu", "exl3_decode.cu", "exl3_gemv.cu", "exl3_hadamard.cu",
            "exl3_viterbi.cu", "fused.cu", "gptq.cu", "gptq4.cu")
# Turing (T4) is the oldest GPU a Space offers; the kernels use nothing newer than sm_75 has.
MIN_CAPABILITY = (7, 5)
# QUANTLAB_KERNELS=0 forces the torch reference path, for comparisons and for bisecting a wrong answer.
ENV_SWITCH = "QUANTLAB_KERNELS"


def build_dir(arch: str) -> Path:
    root = cache_dir()
    # Sources, torch and target in the name: any change builds afresh next to the old build.
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update((HERE / name).read_bytes())
    digest.update(torch.__version__.encode())
    return root / "kernels" / f"sm{arch}-{digest.hexdigest()[:12]}"


def _why_unavailable() -> str | None:
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return ""  # asked for: no warning
    if not torch.cuda.is_available() or torch.version.cuda is None:
        return "this torch build or machine has no CUDA"
    capability = torch.cuda.get_device_capability()
    if capability < MIN_CAPABILITY:
        return f"the GPU is sm_{capability[0]}{capability[1]}; the kernels need sm_75 or newer"
    # Imported only where a GPU could build: torch's extension builder takes seconds to import.
    from torch.utils.cpp_extension import CUDA_HOME, is_ninja_available

    if CUDA_HOME is None:
        return "no CUDA compiler (nvcc) was found; install the CUDA toolkit or set CUDA_HOME"
    if not is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    return None


@functools.lru_cache(maxsize=None)
def kernels():
    reason = _why_unavailable()
    if reason is not None:
        if reason:
            _warn(reason)
        return None
    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}{minor}"
    folder = build_dir(arch)
    folder.mkdir(parents=True, exist_ok=True)
    name = "quantlab_kernels"
    if not any(folder.glob(f"{name}*.so")):
        print("building kernels (first run only)", file=sys.stderr, flush=True)
    from torch.utils.cpp_extension import load  # late, as in _why_unavailable

    # torch derives -gencode flags from this variable; naming only the device's
    # architecture keeps the build to one target (about a minute instead of five).
    previous = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    try:
        return load(
            name=name,
            sources=[str(HERE / s) for s in COMPILED],
            build_directory=str(folder),
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3", "--expt-relaxed-constexpr"],
            verbose=False,
        )
    except Exception as error:  # a failed build must leave a working (slower) model
        _warn(f"building them failed ({type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''})")
        return None
    finally:
        if previous is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = previous


def _warn(reason: str) -> None:
    warnings.warn(f"CUDA kernels unavailable, using the slower torch reference path: {reason}", RuntimeWarning, stacklevel=3)


def available() -> bool:
    return kernels() is not None
