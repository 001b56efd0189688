"""Where the EXL2 batch-1 kernel spills, read from its SASS (no GPU needed).

Compiles core/kernels/exl2.cu for one target with nvcc, disassembles it with
cuobjdump (on PATH, or from the `nvidia-cuda-cuobjdump` and `nvidia-cuda-nvdisasm`
wheels, which it needs together: pip install both) and reports, for every loop of a width's walk (a loop with the
16-32 mma of a quad), its 16-byte weight loads, its spill loads, and how many
spill stores write a register an LDG loaded before the loop's first mma. Such a
store waits for the load's data, so the lookahead it belongs to is lost: each
quad then waits a memory round trip. That count should be 0 for every loop.

    python -m bench.walk_spills [--arch 90]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

KERNELS = Path(__file__).resolve().parent.parent / "core" / "kernels"
KERNEL = "exl2_gemv_kernelILi1"


def cuda_tool(name: str) -> str | None:
    """A CUDA tool on PATH, else the one NVIDIA's wheel installs (nvidia/cu*/bin)."""
    found = shutil.which(name)
    if found:
        return found
    for folder in sys.path:
        for candidate in sorted(Path(folder or ".").glob(f"nvidia/cu*/bin/{name}")):
            return str(candidate)
    return None


def sass_of(arch: str) -> list[tuple[int, str]]:
    disassembler, nvdisasm = cuda_tool("cuobjdump"), cuda_tool("nvdisasm")
    if shutil.which("nvcc") is None or disassembler is None or nvdisasm is None:
        raise SystemExit("needs nvcc on PATH, and cuobjdump and nvdisasm "
                         "(pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")
    # cuobjdump runs nvdisasm, which it looks for on PATH.
    env = {**os.environ, "PATH": f"{Path(nvdisasm).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder) / "exl2.cubin"
        subprocess.run(["nvcc", "-cubin", "-O3", "--expt-relaxed-constexpr", "-std=c++17", f"-arch=sm_{arch}",
                        str(KERNELS / "exl2.cu"), "-o", str(cubin)], check=True)
        text = subprocess.run([disassembler, "-sass", str(cubin)], check=True, capture_output=True, text=True,
                              env=env).stdout
    instructions, inside = [], False
    for line in text.splitlines():
        if "Function :" in line:
            inside = KERNEL in line
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", line) if inside else None
        if m:
            instructions.append((int(m.group(1), 16), m.group(2).strip()))
    return instructions


def opcode(instruction: str) -> str:
    words = instruction.split()
    return words[1] if words[0].startswith("@") else words[0]


def walk_loops(instructions: list[tuple[int, str]]) -> list[dict]:
    index = {address: i for i, (address, _) in enumerate(instructions)}
    loops = {}
    for i, (address, text) in enumerate(instructions):
        branch = re.search(r"BRA .*?0x([0-9a-f]+)", text)
        if not branch or int(branch.group(1), 16) >= address or int(branch.group(1), 16) not in index:
            continue
        start = index[int(branch.group(1), 16)]
        body = [t for _, t in instructions[start:i + 1]]
        if not 16 <= sum("HMMA" in t for t in body) <= 40:
            continue
        first_mma = next(k for k, t in enumerate(body) if "HMMA" in t)
        loaded, early = set(), 0
        for t in body[:first_mma]:
            load = re.search(r"LDG\.E\S* R(\d+)", t)
            if load:
                loaded.add(int(load.group(1)))
            store = re.search(r"STL\S* \[[^\]]*\], R(\d+)", t)
            if store and any(base <= int(store.group(1)) < base + 4 for base in loaded):
                early += 1
        loops[start] = {"start": start, "weight_loads": sum("LDG.E.128" in t for t in body),
                        "spill_loads": sum(opcode(t).startswith("LDL") for t in body),
                        "spill_stores": sum(opcode(t).startswith("STL") for t in body), "loaded_then_spilled": early}
    return sorted(loops.values(), key=lambda loop: loop["start"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="90")
    args = parser.parse_args()
    loops = walk_loops(sass_of(args.arch))
    print("| loop at | 16-byte weight loads | spill loads | spill stores | loaded words spilled before the mma |")
    print("|---|---|---|---|---|")
    for loop in loops:
        print(f"| {loop['start']} | {loop['weight_loads']} | {loop['spill_loads']} | {loop['spill_stores']} | "
              f"{loop['loaded_then_spilled']} |")
    print(f"\n{len(loops)} walk loops, {sum(loop['loaded_then_spilled'] > 0 for loop in loops)} spill loaded words")


if __name__ == "__main__":
    main()
