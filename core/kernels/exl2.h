// Launchers of the EXL2 kernels, free of torch headers so the .cu files compile
// quickly on their own (tests/test_kernel_build.py does that for every target).
#pragma once
#include <cstddef>
#include <cstdint>
#include <cuda_runtime.h>

// One quantized layer as the kernels see it (pointers to device memory).
struct Exl2Layer {
    const int* q_weight;        // int32 [packed_rows, n_pad]
    const int* q_scale;         // int32 [groups, n_pad / 8]
    const void* q_scale_max;    // fp16 [groups]
    const int* groups;          // int32 [groups, 4]: bits, first packed row, first act-order row, rows (dequantizer)
    const int* units;           // int32 [quads * 4, 4]: bits, first packed row (-1: padding), group, quad in one group
    int quads;
    int packed_rows;
    int n_pad;
    int n;
};

// One product of a launch: out fp16 [x_rows <= 16, layer.n] = x @ layer (+ bias fp16 [n] or
// null), its quads cut into `slices` runs of `quads_per_slice`.
struct Exl2Product {
    Exl2Layer layer;
    int slices;
    int quads_per_slice;
    const void* bias;
    void* out;
    const void* x_slots;  // fp16 [x_rows, quads * 128]: the input in the layer's slot order (exl2.py, xperm)
};

// Up to exl2_gemm_group_max() products of one input of x_rows rows (each product's x_slots) in
// one launch, `warps` warps per block (at most exl2_gemm_warps_max()), each taking at most
// exl2_gemm_warp_quads_max() quads of a slice. `partial` is fp32 scratch of exl2_gemm_scratch()
// zeros, left zeroed.
int exl2_gemm_group_max();
int exl2_gemm_warps_max();
int exl2_gemm_warp_quads_max();
size_t exl2_gemm_scratch(const Exl2Product* products, int count, int x_rows);
void exl2_gemm_group_launch(const Exl2Product* products, int count, int x_rows, int warps, float* partial,
                            cudaStream_t stream);

// out fp16 [k, n] = the layer's weight, act-order row r at row row_of[r] (null: at r).
void exl2_dequant_launch(const Exl2Layer& layer, int groups, const int* row_of, void* out, cudaStream_t stream);
