// Launchers of the GPTQ 4-bit kernels (gptq4.cu), free of torch headers like
// exl2.h so tests/test_kernel_build.py can compile them without a GPU.
#pragma once
#include <cuda_runtime.h>

// One GPTQ layer as the kernels see it (device pointers). Rows are in group
// order (core/linear.py GPTQLinear.prepare sorts act-order layers at load).
struct Gptq4Layer {
    const int* qweight;    // int32 [k / 8, n]: input 8i + j is nibble j of row i
    const int* qzeros;     // int32 [groups, n / 8]: output 8c + j is nibble j of column c
    const void* scales;    // fp16 [groups, n]
    const int* perm;       // int32 [k]: input index of each stored row
    const int* row_group;  // int32 [k]: group of each stored row (dequant only)
    const int* segments;   // int32 [segments, 4]: group, first packed row, packed rows, 0
    const int* slices;     // int32 [slices, 4]: first segment, end segment, first packed row, packed rows
    int k;
    int n;
    int zero_offset;       // added to each stored zero nibble: 1 for checkpoint_format "gptq", 0 for "gptq_v2"
};

// out fp16 [x_rows, n] = x fp16 [x_rows, k] @ layer (+ bias fp16 [n] or null), reading
// qweight directly. `partial` is fp32 scratch of min(x_rows, 8) * n + gptq4_gemm_small_tiles()
// zeros; it is left zeroed. Needs every group to start on a packed row (a multiple of 8 inputs).
int gptq4_gemm_small_tiles(const Gptq4Layer& layer, int threads);
// `prefetch` asks L2 for a block's weights before it stages its inputs; `async_copy` instead
// copies them all into shared memory asynchronously (threads * max_slice_rows * 16 bytes more).
void gptq4_gemm_small_launch(const Gptq4Layer& layer, const void* x, int x_rows, int max_slice_rows, int slices,
                             int threads, bool prefetch, bool async_copy, float* partial, const void* bias, void* out,
                             cudaStream_t stream);

// out fp16 [k, n] = the layer's weight, rows in stored (group) order; any group boundaries.
void gptq4_dequant_launch(const Gptq4Layer& layer, void* out, cudaStream_t stream);
