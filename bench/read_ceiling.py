"""What a kernel that only reads can reach on the matrix sizes of a decode step.

Issue 5 asks for the 4-bit 4096x11008 product at 85% of copy bandwidth. This
measures the ceiling for any such kernel under the same timing as bench/speed.py
(a CUDA graph of 24 launches over 6 copies of the bytes, so L2 holds none): a
kernel that reads the bytes with 16-byte loads, `loads` of them in flight per
thread, and does nothing else. It also times an empty kernel, the cost of a
graph node by itself. Writes bench/results/read_ceiling-<device>-<time>.json for
bench/report.py.

    python3 -m bench.read_ceiling
"""

from __future__ import annotations

import torch
from torch.utils.cpp_extension import load_inline

from bench.provenance import write_run
from bench.speed import copy_bandwidth, graph_time

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>

// Each thread issues all of its `loads` reads before using any: `loads` x 16 bytes in flight.
template <int LOADS>
__global__ void read_words(const uint4* __restrict__ src, long n4, unsigned* __restrict__ sink) {
    const long base = (long)blockIdx.x * blockDim.x * LOADS + threadIdx.x;
    uint4 v[LOADS];
#pragma unroll
    for (int i = 0; i < LOADS; ++i) {
        const long at = base + (long)i * blockDim.x;
        v[i] = at < n4 ? __ldg(src + at) : make_uint4(0, 0, 0, 0);
    }
    unsigned s = 0;
#pragma unroll
    for (int i = 0; i < LOADS; ++i) s ^= v[i].x ^ v[i].y ^ v[i].z ^ v[i].w;
    if (s == 0x9E3779B9u) sink[0] = s;  // keeps the loads; practically never taken
}

__global__ void empty_kernel() {}

void read_launch(torch::Tensor src, torch::Tensor sink, int64_t loads, int64_t threads) {
    const long n4 = src.numel() / 4;
    auto stream = at::cuda::getCurrentCUDAStream();
    const uint4* p = reinterpret_cast<const uint4*>(src.data_ptr<int>());
    unsigned* s = reinterpret_cast<unsigned*>(sink.data_ptr<int>());
    const long per_block = threads * loads;
    const int blocks = (int)((n4 + per_block - 1) / per_block);
    switch (loads) {
        case 1: read_words<1><<<blocks, threads, 0, stream>>>(p, n4, s); break;
        case 2: read_words<2><<<blocks, threads, 0, stream>>>(p, n4, s); break;
        case 4: read_words<4><<<blocks, threads, 0, stream>>>(p, n4, s); break;
        case 8: read_words<8><<<blocks, threads, 0, stream>>>(p, n4, s); break;
        default: read_words<16><<<blocks, threads, 0, stream>>>(p, n4, s); break;
    }
}

void empty_launch() { empty_kernel<<<1, 32, 0, at::cuda::getCurrentCUDAStream()>>>(); }
"""

CPP = "void read_launch(torch::Tensor src, torch::Tensor sink, int64_t loads, int64_t threads);\nvoid empty_launch();"

# Bytes of the products of a 7B decode step (codes and scales), and the matrix at 2, 4 and 8 bits.
SIZES = {
    "4096x11008 4-bit": 4096 * 11008 // 2 + 128 * 11008 // 2,
    "4096x11008 2-bit": 4096 * 11008 // 4 + 32 * 11008 // 2,
    "4096x11008 8-bit": 4096 * 11008 + 32 * 11008 // 2,
    "4096x4096 4-bit": 4096 * 4096 // 2 + 32 * 4096 // 2,
    "4096x12288 4-bit (q/k/v)": 4096 * 12288 // 2 + 32 * 12288 // 2,
    "4096x22016 4-bit (gate/up)": 4096 * 22016 // 2 + 32 * 22016 // 2,
}


def main() -> None:
    module = load_inline("quantlab_read_ceiling", CPP, cuda_sources=SOURCE, functions=["read_launch", "empty_launch"],
                         extra_cuda_cflags=["-O3"], verbose=False)
    bandwidth = copy_bandwidth()
    print(f"device {torch.cuda.get_device_name()}, copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    empty_us = graph_time(lambda i: module.empty_launch()) * 1e6
    print(f"empty kernel, per graph node: {empty_us:.2f} us")
    rows = []
    sink = torch.zeros(4, dtype=torch.int32, device="cuda")
    print("| bytes | loads/thread | threads | us | GB/s | of copy |")
    print("|---|---|---|---|---|---|")
    for name, size in SIZES.items():
        buffers = [torch.randint(-2**31, 2**31 - 1, (size // 4 // 4 * 4,), dtype=torch.int32, device="cuda")
                   for _ in range(6)]
        for loads in (1, 2, 4, 8, 16):
            for threads in (128, 256, 512):
                seconds = graph_time(lambda i: module.read_launch(buffers[i], sink, loads, threads))
                rate = size / seconds
                print(f"| {name} | {loads} | {threads} | {seconds * 1e6:.2f} | {rate / 1e9:.0f} | "
                      f"{rate / bandwidth:.0%} |", flush=True)
                rows.append({"bytes": name, "loads": loads, "threads": threads, "us": seconds * 1e6,
                             "gb_s": rate / 1e9, "of_copy": rate / bandwidth})
        del buffers
    write_run("read_ceiling", "bench.read_ceiling", torch.cuda.get_device_name(),
              {"copy_bandwidth_gb_s": bandwidth / 1e9, "empty_kernel_us": empty_us, "rows": rows})


if __name__ == "__main__":
    main()
