// Attention of one new token (batch 1) over the key/value cache, for the decode step.
//
// The step is replayed from a CUDA graph, so the number of keys read is fixed at
// capture (`length`, the bucket) while the token's position lives on the device:
// keys past the position, or before a sliding window, are skipped. Split over
// keys ("flash decoding"): a block takes one query head and CHUNK keys and writes
// its running max, sum and weighted values; a second kernel merges the chunks of
// each head. Scores, softmax and sums in fp32; one fp16 rounding at the end.

#include "attention.h"
#include "launch.h"

#include <cuda_fp16.h>
#include <math_constants.h>
#include <cstring>

namespace {

constexpr int WARPS = 4;               // per block
constexpr int CHUNK = WARPS * 32;      // keys per block: one per lane
constexpr int MAX_DIM = 256;           // head dims up to this, multiples of 8

struct KeyRange {
    int64_t first, last;  // inclusive
};

__device__ __forceinline__ KeyRange visible_keys(const int64_t* position, int window) {
    const int64_t pos = *position;
    return {window > 0 && pos - window + 1 > 0 ? pos - window + 1 : 0, pos};
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// grid (heads, chunks); partial [heads, chunks, dim + 2]: weighted value sums, then max and sum.
// Lane l of warp w scores key chunk * CHUNK + 32 w + l (a whole row each), then the warp sums
// p * v with lanes over the value dims (PAIRS half2 each: dims 2 * lane + 64 * i). Every load
// (the keys' rows and the values the lane will weigh) is issued before the first wait on memory,
// so the block pays one round trip.
template <int PAIRS>
__global__ void __launch_bounds__(WARPS * 32)
decode_attention_chunks(const __half* __restrict__ q, const __half* __restrict__ keys, const __half* __restrict__ values,
                        const int64_t* __restrict__ position, int window, int heads, int kv_heads, int dim, int max_seq,
                        float scale, float* __restrict__ partial) {
    __shared__ __align__(16) float q_s[MAX_DIM];
    __shared__ float acc_s[WARPS][MAX_DIM];
    __shared__ float max_s[WARPS], sum_s[WARPS];
    allow_dependents();
    wait_for_producer();
    const int head = blockIdx.x, chunk = blockIdx.y, chunks = gridDim.y;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const KeyRange range = visible_keys(position, window);
    if ((int64_t)chunk * CHUNK > range.last || (int64_t)(chunk + 1) * CHUNK - 1 < range.first) return;
    const int kv_head = head / (heads / kv_heads);
    const __half* k_head = keys + (size_t)kv_head * max_seq * dim;
    const __half* v_head = values + (size_t)kv_head * max_seq * dim;

    const int64_t warp_first = (int64_t)chunk * CHUNK + warp * 32;
    const int64_t key = warp_first + lane;
    const bool visible = key >= range.first && key <= range.last;
    // A row of up to 128 dims in one round of loads (longer rows take a second round).
    constexpr int ROW_LOADS = 16;
    const uint4* k_row = reinterpret_cast<const uint4*>(k_head + (visible ? key : range.last) * dim);
    uint4 packed[ROW_LOADS];
#pragma unroll
    for (int c = 0; c < ROW_LOADS; ++c) packed[c] = c < dim / 8 ? __ldg(k_row + c) : make_uint4(0, 0, 0, 0);
    // An invisible key weighs 0; its values are read from a visible position instead of a branch.
    uint32_t v_pairs[32][PAIRS];
#pragma unroll
    for (int j = 0; j < 32; ++j) {
        const __half* v_row = v_head + min(warp_first + j, range.last) * dim;
#pragma unroll
        for (int i = 0; i < PAIRS; ++i) {
            const int d = 2 * lane + 64 * i;
            v_pairs[j][i] = d < dim ? __ldg(reinterpret_cast<const unsigned int*>(v_row + d)) : 0u;
        }
    }
    for (int d = threadIdx.x; d < dim; d += blockDim.x) q_s[d] = __half2float(q[(size_t)head * dim + d]) * scale;
    __syncthreads();

    float score = -CUDART_INF_F;
    if (visible) {
        float dot = 0.f;
        for (int c0 = 0; c0 < dim / 8; c0 += ROW_LOADS) {
            if (c0 > 0) {
#pragma unroll
                for (int c = 0; c < ROW_LOADS; ++c)
                    packed[c] = c0 + c < dim / 8 ? __ldg(k_row + c0 + c) : make_uint4(0, 0, 0, 0);
            }
#pragma unroll
            for (int c = 0; c < ROW_LOADS; ++c) {
                if (c0 + c >= dim / 8) break;
                const __half2* h = reinterpret_cast<const __half2*>(&packed[c]);
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const float2 f = __half22float2(h[e]);
                    dot += q_s[8 * (c0 + c) + 2 * e] * f.x + q_s[8 * (c0 + c) + 2 * e + 1] * f.y;
                }
            }
        }
        score = dot;
    }
    const float top = warp_max(score);
    const float p = visible ? __expf(score - top) : 0.f;
    const float total = warp_sum(p);

    float2 acc[PAIRS];
#pragma unroll
    for (int i = 0; i < PAIRS; ++i) acc[i] = make_float2(0.f, 0.f);
#pragma unroll
    for (int j = 0; j < 32; ++j) {
        const float pj = __shfl_sync(0xffffffffu, p, j);
#pragma unroll
        for (int i = 0; i < PAIRS; ++i) {
            __half2 h;
            memcpy(&h, &v_pairs[j][i], 4);
            const float2 v = __half22float2(h);
            acc[i].x += pj * v.x;
            acc[i].y += pj * v.y;
        }
    }
#pragma unroll
    for (int i = 0; i < PAIRS; ++i) {
        const int d = 2 * lane + 64 * i;
        if (d < dim) {
            acc_s[warp][d] = acc[i].x;
            acc_s[warp][d + 1] = acc[i].y;
        }
    }
    if (lane == 0) {
        max_s[warp] = top;
        sum_s[warp] = total;
    }
    __syncthreads();
    float block_max = -CUDART_INF_F;
    for (int w = 0; w < WARPS; ++w) block_max = fmaxf(block_max, max_s[w]);
    float* out = partial + ((size_t)head * chunks + chunk) * (dim + 2);
    for (int d = threadIdx.x; d < dim; d += blockDim.x) {
        float v = 0.f;
        for (int w = 0; w < WARPS; ++w)
            if (sum_s[w] > 0.f) v += acc_s[w][d] * __expf(max_s[w] - block_max);
        out[d] = v;
    }
    if (threadIdx.x == 0) {
        float weight = 0.f;
        for (int w = 0; w < WARPS; ++w)
            if (sum_s[w] > 0.f) weight += sum_s[w] * __expf(max_s[w] - block_max);
        out[dim] = block_max;
        out[dim + 1] = weight;
    }
}

// grid (heads); out [heads * dim] fp16: the chunks holding visible keys, merged.
__global__ void decode_attention_merge(const float* __restrict__ partial, const int64_t* __restrict__ position,
                                       int window, int dim, int chunks, __half* __restrict__ out) {
    allow_dependents();
    wait_for_producer();
    const int head = blockIdx.x;
    const KeyRange range = visible_keys(position, window);
    const int first = (int)(range.first / CHUNK), last = (int)(range.last / CHUNK);
    const float* rows = partial + (size_t)head * chunks * (dim + 2);
    float top = -CUDART_INF_F;
    for (int c = first; c <= last; ++c) top = fmaxf(top, rows[(size_t)c * (dim + 2) + dim]);
    float total = 0.f;
    for (int c = first; c <= last; ++c)
        total += rows[(size_t)c * (dim + 2) + dim + 1] * __expf(rows[(size_t)c * (dim + 2) + dim] - top);
    for (int d = threadIdx.x; d < dim; d += blockDim.x) {
        float v = 0.f;
        for (int c = first; c <= last; ++c)
            v += rows[(size_t)c * (dim + 2) + d] * __expf(rows[(size_t)c * (dim + 2) + dim] - top);
        out[(size_t)head * dim + d] = __float2half(v / total);
    }
}

}  // namespace

int decode_attention_chunks_for(int length) { return (length + CHUNK - 1) / CHUNK; }

void decode_attention_launch(const void* q, const void* keys, const void* values, const int64_t* position, int window,
                             int heads, int kv_heads, int dim, int max_seq, int length, float scale, float* partial,
                             void* out, cudaStream_t stream) {
    const int chunks = decode_attention_chunks_for(length);
    // Value dims per lane in half2: as few as the head needs, they are all held in registers.
    auto kernel = dim <= 64 ? decode_attention_chunks<1> : dim <= 128 ? decode_attention_chunks<2> : decode_attention_chunks<4>;
    launch_chained(kernel, dim3(heads, chunks), dim3(WARPS * 32), 0, stream, static_cast<const __half*>(q),
                   static_cast<const __half*>(keys), static_cast<const __half*>(values), position, window, heads,
                   kv_heads, dim, max_seq, scale, partial);
    launch_chained(decode_attention_merge, dim3(heads), dim3(dim < 128 ? 64 : 128), 0, stream,
                   static_cast<const float*>(partial), position, window, dim, chunks, static_cast<__half*>(out));
}
