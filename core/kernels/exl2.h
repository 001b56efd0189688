// Launchers of the EXL2 kernels, free of torch headers so the .cu files compile
// quickly on their own (tests/test_kernel_build.py does that for every target).
#pragma once
#include <cuda_runtime.h>

// One quantized layer as the kernels see it (pointers to device memory).
struct Exl2Layer {
    const int* q_weight;        // int32 [packed_rows, n_pad]
    const int* q_scale;         // int32 [groups, n_pad / 8]
    const void* q_scale_max;    // fp16 [groups]
    const int* groups;          // int32 [groups, 4]: bits, first packed row, first act-order row, rows
    const int* slices;          // int32 [slices, 4]: first group, end group, first act-order row, rows
    const int* perm;            // int32 [k]: input index of each act-order row
    int packed_rows;
    int n_pad;
    int n;
};

// out fp16 [x_rows, n] = x fp16 [x_rows, k] @ layer (+ bias fp16 [n] or null).
// `partial` is fp32 scratch of x_rows * n + exl2_gemm_small_tiles() zeros; it is left zeroed.
int exl2_gemm_small_tiles(const Exl2Layer& layer, int threads);
void exl2_gemm_small_launch(const Exl2Layer& layer, const void* x, int x_rows, int k, int max_slice_rows, int slices,
                            int threads, float* partial, const void* bias, void* out, cudaStream_t stream);

// out fp16 [k, n] = the layer's weight with rows in act-order.
void exl2_dequant_launch(const Exl2Layer& layer, int groups, void* out, cudaStream_t stream);
