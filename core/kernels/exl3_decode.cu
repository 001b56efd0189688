// EXL3 trellis -> fp16 rotated weight W_r in matrix order (reference: core/formats/exl3/reference.py,
// decode_tiles). A block takes 8 tiles side by side along n, one warp each; lane t decodes positions
// 8t..8t+7 into shared memory, and the block writes its 16 rows of 128 columns with 16-byte stores.
#include "exl3.h"
#include "exl3_trellis.cuh"

namespace {

constexpr int TILES_PER_BLOCK = 8;
constexpr int MOST_WORDS32 = 64;          // 16 K int16 words at K = 8
constexpr int ROW_HALVES = TILES_PER_BLOCK * 16 + 8;  // padded: the tile writes spread over the banks

template <int CODEBOOK>
__global__ void __launch_bounds__(256) exl3_decode_kernel(const uint32_t* __restrict__ trellis, int tiles_n,
                                                          int words32, int bits_x2, __half* __restrict__ out) {
    __shared__ uint32_t rings[TILES_PER_BLOCK][MOST_WORDS32];
    __shared__ __align__(16) __half tile_rows[16][ROW_HALVES];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int tile_k = blockIdx.y;
    const int tile_n = blockIdx.x * TILES_PER_BLOCK + warp;
    if (tile_n < tiles_n) {
        const uint32_t* ring = trellis + ((size_t)tile_k * tiles_n + tile_n) * words32;
        for (int w = lane; w < words32; w += 32) rings[warp][w] = ring[w];
        __syncwarp();
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            const int p = lane * 8 + e;
            const uint32_t state = exl3_ring_window(rings[warp], words32, exl3_window_end(p, bits_x2));
            tile_rows[exl3_position_row(p)][warp * 16 + exl3_position_col(p)] = exl3_value<CODEBOOK>(state);
        }
    }
    __syncthreads();
    // 256 threads = 16 rows x 16 pieces of 8 columns; a piece lies within one tile.
    const int row = threadIdx.x >> 4, piece = threadIdx.x & 15;
    if (blockIdx.x * TILES_PER_BLOCK + (piece >> 1) < tiles_n) {
        const size_t n = (size_t)tiles_n * 16;
        const size_t at = ((size_t)tile_k * 16 + row) * n + (size_t)blockIdx.x * TILES_PER_BLOCK * 16 + piece * 8;
        *reinterpret_cast<uint4*>(out + at) = *reinterpret_cast<const uint4*>(&tile_rows[row][piece * 8]);
    }
}

}  // namespace

void exl3_decode_launch(const int16_t* trellis, int tiles_k, int tiles_n, int words, int codebook, void* out,
                        cudaStream_t stream) {
    if (tiles_k == 0 || tiles_n == 0) return;
    const dim3 grid((tiles_n + TILES_PER_BLOCK - 1) / TILES_PER_BLOCK, tiles_k);
    const uint32_t* ring = reinterpret_cast<const uint32_t*>(trellis);
    __half* o = static_cast<__half*>(out);
    const int words32 = words / 2, bits_x2 = words / 8;
    if (codebook == EXL3_CB_3INST)
        exl3_decode_kernel<EXL3_CB_3INST><<<grid, 256, 0, stream>>>(ring, tiles_n, words32, bits_x2, o);
    else if (codebook == EXL3_CB_MCG)
        exl3_decode_kernel<EXL3_CB_MCG><<<grid, 256, 0, stream>>>(ring, tiles_n, words32, bits_x2, o);
    else
        exl3_decode_kernel<EXL3_CB_MUL1><<<grid, 256, 0, stream>>>(ring, tiles_n, words32, bits_x2, o);
}
