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

// What the product makes of its staged inputs, so that the kernel before it need not finish them
// (the step then has one kernel boundary less): x_slots as they are; with up_slots, SwiGLU's
// fp16(silu(x_slots)) * up_slots; with weight_slots, RMSNorm's weight_slots * fp16(x_slots *
// rsqrt(squares[row] / hidden + eps)), squares being the sum of squares of the row x_slots holds.
struct Exl2Input {
    const void* up_slots;      // fp16 [x_rows, quads * 128], or null
    const void* weight_slots;  // fp16 [quads * 128], the norm's weight in slot order, or null
    const float* squares;      // fp32 [x_rows], with weight_slots
    float eps;
    int hidden;
};

// Where the product's output goes: `out` (or nowhere, where null), and where `residual` is given
// first fp16(out + residual), written back into residual. Then also into up to three consumers'
// slot orders (column c of row m at slots_out[t][m * slots[t] + slot_of[t][c]]), with each row's
// sum of squares of what was written added to `squares` (fp32 [x_rows], or null).
constexpr int EXL2_ROUTES_MOST = 3;
struct Exl2Output {
    void* out;
    void* residual;
    float* squares;
    const int* slot_of[EXL2_ROUTES_MOST];
    void* slots_out[EXL2_ROUTES_MOST];
    int slots[EXL2_ROUTES_MOST];
    int routes;
};

// One product of a launch: fp16 [x_rows <= 16, layer.n] = input @ layer (+ bias fp16 [n] or
// null), its quads cut into `slices` runs of `quads_per_slice`.
struct Exl2Product {
    Exl2Layer layer;
    int slices;
    int quads_per_slice;
    const void* bias;
    const void* x_slots;  // fp16 [x_rows, quads * 128]: the input in the layer's slot order (core/formats/exl2/kernel.py, xperm)
    Exl2Input input;
    Exl2Output output;
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
