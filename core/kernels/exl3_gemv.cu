// A first small-batch EXL3 product: out fp32 [rows <= 8, n] += x [rows, k] @ W_r, decoding the trellis
// on the fly (reference: reference.matmul's middle step, rotated @ decode_tiles). A block's 8 warps take
// 8 tile columns side by side over one run of tile rows (a split of k), whose inputs the block stages in
// shared memory; lane t decodes positions 8t..8t+7 of each tile (4 rows x 2 columns of it) and keeps
// fp32 sums; the 4 lanes of a column add theirs with shuffles, and the split's sums go to `out` by atomics.
#include "exl3.h"
#include "exl3_trellis.cuh"

namespace {

constexpr int WARPS = 8;
constexpr int MOST_WORDS32 = 64;

template <int CODEBOOK>
__global__ void __launch_bounds__(WARPS * 32) exl3_gemv_kernel(const __half* __restrict__ x, int rows, int k,
                                                              const uint32_t* __restrict__ trellis, int tiles_k,
                                                              int tiles_n, int words32, int bits_x2,
                                                              int tiles_per_split, float* __restrict__ out) {
    __shared__ uint32_t rings[WARPS][MOST_WORDS32];
    __shared__ __half x_staged[EXL3_GEMV_ROWS_MOST][EXL3_GEMV_SPLIT_TILES_MOST * 16];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int first_tile = blockIdx.y * tiles_per_split;
    const int last_tile = min(first_tile + tiles_per_split, tiles_k);
    const int staged = (last_tile - first_tile) * 16;
    for (int at = threadIdx.x; at < rows * staged; at += WARPS * 32) {
        const int m = at / staged, c = at % staged;
        x_staged[m][c] = x[(size_t)m * k + first_tile * 16 + c];
    }
    __syncthreads();
    const int tile_n = blockIdx.x * WARPS + warp;
    if (tile_n >= tiles_n) return;
    float sums[EXL3_GEMV_ROWS_MOST][2] = {};
    for (int tile_k = first_tile; tile_k < last_tile; ++tile_k) {
        const uint32_t* ring = trellis + ((size_t)tile_k * tiles_n + tile_n) * words32;
        for (int w = lane; w < words32; w += 32) rings[warp][w] = ring[w];
        __syncwarp();
        const int base = (tile_k - first_tile) * 16;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            const int p = lane * 8 + e;
            const float v = __half2float(
                exl3_value<CODEBOOK>(exl3_ring_window(rings[warp], words32, exl3_window_end(p, bits_x2))));
            const int row = base + exl3_position_row(p);
#pragma unroll
            for (int m = 0; m < EXL3_GEMV_ROWS_MOST; ++m)
                if (m < rows) sums[m][e >> 2] += __half2float(x_staged[m][row]) * v;
        }
        __syncwarp();  // the ring is read before the next tile's words replace it
    }
    // Lanes 4c..4c+3 hold columns c and c + 8 of the tile.
#pragma unroll
    for (int m = 0; m < EXL3_GEMV_ROWS_MOST; ++m) {
        if (m >= rows) break;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float s = sums[m][h];
            s += __shfl_xor_sync(0xFFFFFFFFu, s, 1);
            s += __shfl_xor_sync(0xFFFFFFFFu, s, 2);
            if ((lane & 3) == 0) atomicAdd(out + (size_t)m * tiles_n * 16 + tile_n * 16 + (lane >> 2) + 8 * h, s);
        }
    }
}

}  // namespace

void exl3_gemv_launch(const void* x, int rows, const int16_t* trellis, int tiles_k, int tiles_n, int words,
                      int codebook, int tiles_per_split, float* out, cudaStream_t stream) {
    if (rows == 0 || tiles_k == 0 || tiles_n == 0) return;
    const dim3 grid((tiles_n + WARPS - 1) / WARPS, (tiles_k + tiles_per_split - 1) / tiles_per_split);
    const __half* xh = static_cast<const __half*>(x);
    const uint32_t* ring = reinterpret_cast<const uint32_t*>(trellis);
    const int k = tiles_k * 16, words32 = words / 2, bits_x2 = words / 8;
    if (codebook == EXL3_CB_3INST)
        exl3_gemv_kernel<EXL3_CB_3INST><<<grid, WARPS * 32, 0, stream>>>(xh, rows, k, ring, tiles_k, tiles_n, words32,
                                                                         bits_x2, tiles_per_split, out);
    else if (codebook == EXL3_CB_MCG)
        exl3_gemv_kernel<EXL3_CB_MCG><<<grid, WARPS * 32, 0, stream>>>(xh, rows, k, ring, tiles_k, tiles_n, words32,
                                                                       bits_x2, tiles_per_split, out);
    else
        exl3_gemv_kernel<EXL3_CB_MUL1><<<grid, WARPS * 32, 0, stream>>>(xh, rows, k, ring, tiles_k, tiles_n, words32,
                                                                        bits_x2, tiles_per_split, out);
}
