"""The CUDA sources compile for every GPU a Space offers, checked without a GPU.

CI has nvcc but no GPU and a CPU-only torch, so the kernels never build there
for real; compiling each .cu file alone (their headers are free of torch) and
syntax-checking the torch glue catches a broken build before the device does.
"""

import re
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from core.kernels.build import COMPILED

KERNELS = Path(__file__).resolve().parents[1] / "core" / "kernels"
# T4, A100, A10G, L4, H100.
ARCHITECTURES = ("75", "80", "86", "89", "90")
# Every CUDA unit the extension builds, and the torch glue of each kernel family.
CUDA_SOURCES = tuple(name for name in COMPILED if name.endswith(".cu"))
BINDINGS = tuple(name for name in COMPILED if name.endswith(".cpp"))


def _nvcc() -> str:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed")
    return nvcc


def _cuda_includes(nvcc: str) -> list[str]:
    # nvcc may be a wrapper script far from the toolkit; its dry run names the real include folders.
    done = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", "/dev/null", "-o", "/dev/null"],
                          capture_output=True, text=True, timeout=60)
    return list(dict.fromkeys(re.findall(r'(?:-I|"-isystem" )"?([^" ]+)"?', done.stderr + done.stdout)))


def _run(command: list[str]) -> tuple[list[str], subprocess.CompletedProcess]:
    return command, subprocess.run(command, capture_output=True, text=True, timeout=600)


def test_cuda_sources_compile_for_every_space_gpu(tmp_path):
    nvcc = _nvcc()
    commands = [
        [nvcc, "-c", "-O3", "--expt-relaxed-constexpr", "-std=c++17", f"-gencode=arch=compute_{arch},code=sm_{arch}",
         str(KERNELS / source), "-o", str(tmp_path / f"{source}.sm{arch}.o")]
        for source in CUDA_SOURCES for arch in ARCHITECTURES
    ]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(_run, commands))
    failures = [f"{' '.join(cmd[-4:-2])}:\n{done.stderr[-2000:]}" for cmd, done in results if done.returncode]
    assert not failures, "\n\n".join(failures)


def test_torch_bindings_pass_a_syntax_check(tmp_path):
    nvcc = _nvcc()
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("g++ is not installed")
    from torch.utils.cpp_extension import include_paths

    # The CPU-only torch wheel leaves out this generated header that c10/cuda includes.
    stub = tmp_path / "include" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    includes = [tmp_path / "include", *include_paths(), *_cuda_includes(nvcc), sysconfig.get_paths()["include"]]
    commands = [[compiler, "-std=c++20", "-fsyntax-only", "-DTORCH_EXTENSION_NAME=quantlab_kernels",
                 *(f"-I{path}" for path in includes), str(KERNELS / source)] for source in BINDINGS]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(_run, commands))
    failures = [f"{cmd[-1]}:\n{done.stderr[-4000:]}" for cmd, done in results if done.returncode]
    assert not failures, "\n\n".join(failures)


def test_no_exl2_walk_spills_the_words_it_loads_ahead():
    # Each width's walk loads the next quad's words before decoding the current one; a spill
    # store of those words right after the load waits for their bytes, so the lookahead is lost
    # and every quad waits a memory round trip. ptxas did this to the walks after a change of
    # width while they ran inside a loop (bench/history/KERNEL_NOTES.md, v5, item 7).
    from bench import walk_spills

    _nvcc()
    if walk_spills.cuda_tool("cuobjdump") is None or walk_spills.cuda_tool("nvdisasm") is None:
        pytest.skip("cuobjdump and nvdisasm are not installed (requirements-test.txt)")
    loops = walk_spills.walk_loops(walk_spills.sass_of("90"))
    # Up to 4 walks of each of the 6 widths (a warp takes at most 4 quads).
    assert len(loops) >= 6
    spilling = [loop for loop in loops if loop["loaded_then_spilled"]]
    assert not spilling, f"walk loops that spill the words they just loaded: {spilling}"
