// Launchers of the EXL3 kernels, free of torch headers so the .cu files compile quickly on
// their own (tests/test_kernel_build.py). Format facts: ../shared/EXL3.md sections 2-4 and 7.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cuda_runtime.h>

// Codebook ids as ExLlamaV3 numbers them (exllamav3_ext/quant/codebook.cuh).
constexpr int EXL3_CB_3INST = 0;
constexpr int EXL3_CB_MCG = 1;
constexpr int EXL3_CB_MUL1 = 2;

// out fp16 [tiles_k * 16, tiles_n * 16] (the rotated weight W_r, matrix order) from trellis int16
// [tiles_k, tiles_n, words], words = 16 K (K = 1..8, or 1.5, 2.5, 3.5: 24, 40, 56 words).
void exl3_decode_launch(const int16_t* trellis, int tiles_k, int tiles_n, int words, int codebook, void* out,
                        cudaStream_t stream);

// out fp16 [rows, dim] = fp16(fp16(had128(fp16(x * pre_scale))) * post_scale), one 128-wide Hadamard
// (Sylvester order, 1/sqrt(128)) per contiguous block of each row, butterflies in fp32. x is fp16, or
// fp32 (x_fp32; then no pre_scale). pre_scale and post_scale are fp16 [dim] or null (no multiply).
// out may be x where x is fp16.
void exl3_hadamard_launch(const void* x, bool x_fp32, int rows, int dim, const void* pre_scale, const void* post_scale,
                          void* out, cudaStream_t stream);

// Viterbi search of each tile's tail-biting trellis: values fp32 [tiles, 256] (position order) -> states
// int32 [tiles, 256], the 16-bit state of each position, minimising sum (codebook(state) - value)^2 in fp32.
// `scratch` holds exl3_viterbi_scratch_bytes(tiles) bytes of device memory (back-pointers, and the
// costs where they do not fit a block's shared memory).
size_t exl3_viterbi_scratch_bytes(int tiles);
void exl3_viterbi_launch(const float* values, int tiles, int bits_x2, int codebook, int32_t* states, void* scratch,
                         cudaStream_t stream);

// out fp32 [rows, tiles_n * 16] += x fp16 [rows, tiles_k * 16] @ W_r, decoding the trellis on the fly; rows
// <= EXL3_GEMV_ROWS_MOST. k is cut into splits of tiles_per_split tile rows (at most
// EXL3_GEMV_SPLIT_TILES_MOST), whose sums are added into out (zeroed by the caller) by atomics.
constexpr int EXL3_GEMV_ROWS_MOST = 8;
constexpr int EXL3_GEMV_SPLIT_TILES_MOST = 64;
void exl3_gemv_launch(const void* x, int rows, const int16_t* trellis, int tiles_k, int tiles_n, int words,
                      int codebook, int tiles_per_split, float* out, cudaStream_t stream);
