// Attention of one new token (batch 1) over the key/value cache, for the decode step, with the
// token's rotary embedding and its cache append in the same launch.
//
// The step is replayed from a CUDA graph, so the number of keys read is fixed at
// capture (`length`, the bucket) while the token's position lives on the device:
// keys past the position, or before a sliding window, are skipped. Split over
// keys ("flash decoding"): a block takes one query head and up to 256 keys and keeps
// a running max, sum and weighted values; the last block of a head to finish
// merges its head's chunks. Scores, softmax and sums in fp32; one fp16 rounding
// at the end.
//
// The cache's earlier positions were written by earlier steps, which have
// completed before this step's first kernel starts (graph replays are stream
// ordered), so a block reads them before waiting for the previous kernel: only
// the new token's q, k and v come from it. The new key is rotated here, used
// from shared memory, and written to the cache for the steps after.

#include "attention.h"
#include "launch.h"
#include "rounding.h"

#include <cuda_fp16.h>
#include <math_constants.h>
#include <cstring>

namespace {

// A lane scores its key through a chain of multiply-adds, so a block's keys are its latency.
// While the bucket fits 256 keys, one block per head needs no merge; longer buckets take blocks
// of 128 keys, twice as many to share them. Heads of up to 128 dims split each key over two
// lanes in twice the warps: half the chain, more warps to hide it. The 7B step with each choice
// built (python3 -m bench.step_ablation; bench/history/KERNEL_NOTES.md v6): at 160 keys 256-key
// blocks beat 128-key ones and two lanes a key beat both; at 1500 keys 128-key blocks win.
constexpr int MOST_WARPS = 8;          // a block at one lane a key: 256 keys
constexpr int LONG_WARPS = 4;          // past one such block: 128 keys
constexpr int SHORTEST_CHUNK = LONG_WARPS * 32;
constexpr int MAX_DIM = 256;           // head dims up to this, multiples of 8
constexpr int ROW_LOADS = 16;          // 16-byte loads of a key row held at once: 128 dims

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

// Element d of a head's row x after the rotary embedding at the row (c, s) of the tables, as the
// reference rounds it: fp16(x * cos) + fp16(rotate_half(x) * sin), rounded again.
__device__ __forceinline__ __half rotated(const __half* x, const __half* c, const __half* s, int d, int dim) {
    const int half_dim = dim / 2;
    const float partner = d < half_dim ? -__half2float(x[d + half_dim]) : __half2float(x[d - half_dim]);
    return __float2half(rope_element(__half2float(x[d]), __half2float(c[d]), partner, __half2float(s[d])));
}

// The block's max (MAX) or sum of one value per thread; every thread gets it.
template <int WARPS, bool MAX>
__device__ __forceinline__ float block_reduce(float v, float* scratch) {
    v = MAX ? warp_max(v) : warp_sum(v);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
    __syncthreads();
    float all = scratch[0];
    for (int w = 1; w < WARPS; ++w) all = MAX ? fmaxf(all, scratch[w]) : all + scratch[w];
    return all;
}

// grid (heads, chunks of the bucket); scratch: partial [heads, chunks, dim + 2] (weighted value
// sums, then max and sum), then one arrival count per head, zero between launches.
// Block c of a head takes the visible keys first + c * CHUNK ... (so a head needs as many blocks
// as its visible keys fill, whatever the position). Lane l of warp w scores part l % LANES of key
// first + c * CHUNK + w * 32 / LANES + l / LANES, then the warp sums p * v with lanes over the
// value dims (PAIRS half2 each: dims 2 * lane + 64 * i).
template <int PAIRS, int WARPS, int LANES>
__global__ void __launch_bounds__(WARPS * 32)
decode_attention_kernel(const __half* __restrict__ q, const __half* __restrict__ k_new,
                        const __half* __restrict__ v_new, const __half* __restrict__ cos_table,
                        const __half* __restrict__ sin_table, __half* keys, __half* values,
                        const int64_t* __restrict__ position, int window, int heads, int kv_heads, int dim,
                        int max_seq, float scale, float* __restrict__ partial, int* __restrict__ arrived,
                        __half* __restrict__ out, const int* __restrict__ slot_of, __half* __restrict__ slots_out) {
    __shared__ __align__(16) float q_s[MAX_DIM];
    __shared__ __align__(16) __half k_s[MAX_DIM];  // the new token's rotated key and its value
    __shared__ __align__(16) __half v_s[MAX_DIM];
    __shared__ float acc_s[WARPS][MAX_DIM];
    __shared__ float max_s[WARPS], sum_s[WARPS], reduce_s[WARPS];
    __shared__ bool merges;
    // LANES lanes share a key, each scoring a 1/LANES part of its row: shorter chains, more warps.
    constexpr int WARP_KEYS = 32 / LANES, CHUNK = WARPS * WARP_KEYS, LOADS = ROW_LOADS / LANES;
    allow_dependents();
    const int head = blockIdx.x, chunk = blockIdx.y, chunks = gridDim.y;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int pos = (int)*position;  // written before the step's graph started
    const int first = window > 0 && pos - window + 1 > 0 ? pos - window + 1 : 0, last = pos;
    const int active = (last - first) / CHUNK + 1;  // blocks of this head with visible keys
    if (chunk >= active) return;
    const bool has_new = chunk == active - 1;
    const int group = heads / kv_heads, kv_head = head / group;
    __half* k_head = keys + (size_t)kv_head * max_seq * dim;
    __half* v_head = values + (size_t)kv_head * max_seq * dim;

    // Earlier keys and values, before the wait. A key that is hidden or new reads nothing here;
    // a hidden value row is read from the last position instead (it weighs 0, and must be finite).
    const int warp_first = first + chunk * CHUNK + warp * WARP_KEYS;
    const int key = warp_first + lane / LANES;
    const bool visible = key <= last;
    const bool is_new = key == pos;
    const int part_loads = dim / 8 / LANES, part = (lane % LANES) * part_loads;  // this lane's 16-byte pieces
    const uint4* k_row = reinterpret_cast<const uint4*>(k_head + (size_t)(visible && !is_new ? key : first) * dim) + part;
    uint4 packed[LOADS];
#pragma unroll
    for (int c = 0; c < LOADS; ++c)
        packed[c] = visible && !is_new && c < part_loads ? __ldg(k_row + c) : make_uint4(0, 0, 0, 0);
    uint32_t v_pairs[WARP_KEYS][PAIRS];
#pragma unroll
    for (int j = 0; j < WARP_KEYS; ++j) {
        const int row = min(warp_first + j, last);
        const unsigned int* v_row = reinterpret_cast<const unsigned int*>(v_head + (size_t)row * dim) + lane;
#pragma unroll
        for (int i = 0; i < PAIRS; ++i)
            v_pairs[j][i] = 2 * lane + 64 * i < dim && row != pos ? __ldg(v_row + 32 * i) : 0u;
    }

    // Where the output goes in the next product's slot order (slot_of is the layer's own table):
    // a thread writes dims threadIdx.x and threadIdx.x + blockDim.x at most.
    static_assert(MAX_DIM <= 2 * 32 * WARPS, "two output dims a thread at most");
    int out_slot[2] = {0, 0};
    if (slots_out) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const int d = threadIdx.x + j * blockDim.x;
            if (d < dim) out_slot[j] = __ldg(slot_of + head * dim + d);
        }
    }

    // q, k and v of the new token are the previous kernel's output.
    wait_for_producer();
    const __half* cos_row = cos_table + (size_t)pos * dim;
    const __half* sin_row = sin_table + (size_t)pos * dim;
    const __half* q_head = q + (size_t)head * dim;
    const __half* k_in = k_new + (size_t)kv_head * dim;
    const __half* v_in = v_new + (size_t)kv_head * dim;
    // One block of the kv head's group writes the cache; the blocks holding the new key use it from shared memory.
    const bool writes = has_new && head % group == 0;
    for (int d = threadIdx.x; d < dim; d += blockDim.x) {
        q_s[d] = __half2float(rotated(q_head, cos_row, sin_row, d, dim)) * scale;
        if (has_new) {
            const __half kd = rotated(k_in, cos_row, sin_row, d, dim), vd = v_in[d];
            k_s[d] = kd;
            v_s[d] = vd;
            if (writes) {
                k_head[(size_t)pos * dim + d] = kd;
                v_head[(size_t)pos * dim + d] = vd;
            }
        }
    }
    __syncthreads();
    const uint4* k_new_row = reinterpret_cast<const uint4*>(k_s) + part;
    if (is_new) {
#pragma unroll
        for (int c = 0; c < LOADS; ++c)
            if (c < part_loads) packed[c] = k_new_row[c];
    }
    if (has_new) {
        const uint32_t* v_new_pairs = reinterpret_cast<const uint32_t*>(v_s);
#pragma unroll
        for (int j = 0; j < WARP_KEYS; ++j) {
            if (min(warp_first + j, last) != pos) continue;
#pragma unroll
            for (int i = 0; i < PAIRS; ++i)
                if (2 * lane + 64 * i < dim) v_pairs[j][i] = v_new_pairs[lane + 32 * i];
        }
    }

    float score = -CUDART_INF_F;
    if (visible) {
        // Eight independent sums: one chain would wait on every multiply-add before the next.
        float dots[8] = {};
        const float4* q4 = reinterpret_cast<const float4*>(q_s);
        for (int c0 = 0; c0 < part_loads; c0 += LOADS) {
            if (c0 > 0) {
#pragma unroll
                for (int c = 0; c < LOADS; ++c)
                    packed[c] = c0 + c >= part_loads ? make_uint4(0, 0, 0, 0)
                                : is_new             ? k_new_row[c0 + c]
                                                     : __ldg(k_row + c0 + c);
            }
#pragma unroll
            for (int c = 0; c < LOADS; ++c) {
                if (c0 + c >= part_loads) break;
                const __half2* h = reinterpret_cast<const __half2*>(&packed[c]);
                const float4 qa = q4[2 * (part + c0 + c)], qb = q4[2 * (part + c0 + c) + 1];
                const float2 f0 = __half22float2(h[0]), f1 = __half22float2(h[1]);
                const float2 f2 = __half22float2(h[2]), f3 = __half22float2(h[3]);
                dots[0] = fmaf(qa.x, f0.x, dots[0]);
                dots[1] = fmaf(qa.y, f0.y, dots[1]);
                dots[2] = fmaf(qa.z, f1.x, dots[2]);
                dots[3] = fmaf(qa.w, f1.y, dots[3]);
                dots[4] = fmaf(qb.x, f2.x, dots[4]);
                dots[5] = fmaf(qb.y, f2.y, dots[5]);
                dots[6] = fmaf(qb.z, f3.x, dots[6]);
                dots[7] = fmaf(qb.w, f3.y, dots[7]);
            }
        }
        score = ((dots[0] + dots[1]) + (dots[2] + dots[3])) + ((dots[4] + dots[5]) + (dots[6] + dots[7]));
    }
#pragma unroll
    for (int offset = 1; offset < LANES; offset <<= 1) score += __shfl_xor_sync(0xffffffffu, score, offset);
    const float top = warp_max(score);
    const float p = visible ? __expf(score - top) : 0.f;
    const float total = warp_sum(lane % LANES == 0 ? p : 0.f);  // each key once

    float2 acc[PAIRS];
#pragma unroll
    for (int i = 0; i < PAIRS; ++i) acc[i] = make_float2(0.f, 0.f);
#pragma unroll
    for (int j = 0; j < WARP_KEYS; ++j) {
        const float pj = __shfl_sync(0xffffffffu, p, j * LANES);
#pragma unroll
        for (int i = 0; i < PAIRS; ++i) {
            __half2 h;
            memcpy(&h, &v_pairs[j][i], 4);
            const float2 v = __half22float2(h);
            acc[i].x = fmaf(pj, v.x, acc[i].x);
            acc[i].y = fmaf(pj, v.y, acc[i].y);
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
    float chunk_max = -CUDART_INF_F;
    for (int w = 0; w < WARPS; ++w) chunk_max = fmaxf(chunk_max, max_s[w]);
    float chunk_sum = 0.f;
    for (int w = 0; w < WARPS; ++w)
        if (sum_s[w] > 0.f) chunk_sum += sum_s[w] * __expf(max_s[w] - chunk_max);
    auto chunk_values = [&](int d) {
        float v = 0.f;
        for (int w = 0; w < WARPS; ++w)
            if (sum_s[w] > 0.f) v += acc_s[w][d] * __expf(max_s[w] - chunk_max);
        return v;
    };
    __half* out_head = out + (size_t)head * dim;
    auto put = [&](int j, float value) {
        const __half h = __float2half(value);
        out_head[threadIdx.x + j * blockDim.x] = h;
        if (slots_out) slots_out[j == 0 ? out_slot[0] : out_slot[1]] = h;
    };
    if (active == 1) {  // the head's only block: no merge
#pragma unroll
        for (int j = 0; j < 2; ++j)
            if (threadIdx.x + j * blockDim.x < dim) put(j, chunk_values(threadIdx.x + j * blockDim.x) / chunk_sum);
        return;
    }
    float* rows = partial + (size_t)head * chunks * (dim + 2);
    float* mine = rows + (size_t)chunk * (dim + 2);
    for (int d = threadIdx.x; d < dim; d += blockDim.x) mine[d] = chunk_values(d);
    if (threadIdx.x == 0) {
        mine[dim] = chunk_max;
        mine[dim + 1] = chunk_sum;
    }
    // One thread counts the block: its fence after the barrier is cumulative, so it makes the
    // block's sums visible before the count; in the last block its fence after the count orders
    // the reads behind the next barrier after every other block's sums (as in exl2.cu's split-K).
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        merges = atomicAdd(arrived + head, 1) == active - 1;
        if (merges) __threadfence();
    }
    __syncthreads();
    if (!merges) return;
    // The chunks' maxima and sums in one round of loads, then every chunk's value row in another.
    float my_max = -CUDART_INF_F, my_sum = 0.f;
    for (int c = threadIdx.x; c < active; c += blockDim.x) {
        const float m = __ldcg(rows + (size_t)c * (dim + 2) + dim), s = __ldcg(rows + (size_t)c * (dim + 2) + dim + 1);
        my_sum = my_max > m ? my_sum + s * __expf(m - my_max) : s + my_sum * __expf(my_max - m);
        my_max = fmaxf(my_max, m);
    }
    const float head_max = block_reduce<WARPS, true>(my_max, reduce_s);
    const float head_sum = block_reduce<WARPS, false>(my_max > -CUDART_INF_F ? my_sum * __expf(my_max - head_max) : 0.f, reduce_s);
#pragma unroll
    for (int j = 0; j < 2; ++j) {
        const int d = threadIdx.x + j * blockDim.x;
        if (d >= dim) break;
        float v = 0.f;
#pragma unroll 4
        for (int c = 0; c < active; ++c)
            v += __ldcg(rows + (size_t)c * (dim + 2) + d) * __expf(__ldcg(rows + (size_t)c * (dim + 2) + dim) - head_max);
        put(j, v / head_sum);
    }
    if (threadIdx.x == 0) arrived[head] = 0;
}

}  // namespace

int64_t decode_attention_scratch_floats(int heads, int dim, int max_seq) {
    return (int64_t)heads * ((max_seq + SHORTEST_CHUNK - 1) / SHORTEST_CHUNK) * (dim + 2) + heads;
}

template <int PAIRS, int WARPS, int LANES>
void launch_with(const void* q, const void* k, const void* v, const void* cos_table, const void* sin_table, void* keys,
                 void* values, const int64_t* position, int window, int heads, int kv_heads, int dim, int max_seq,
                 int length, float scale, float* scratch, void* out, const int* slot_of, void* slots_out,
                 cudaStream_t stream) {
    constexpr int chunk = WARPS * 32 / LANES;
    const int chunks = (length + chunk - 1) / chunk;
    // The counts sit after the partial rows of the longest bucket, so they stay put across buckets.
    int* arrived = reinterpret_cast<int*>(scratch + decode_attention_scratch_floats(heads, dim, max_seq) - heads);
    launch_chained(decode_attention_kernel<PAIRS, WARPS, LANES>, dim3(heads, chunks), dim3(WARPS * 32), 0, stream,
                   static_cast<const __half*>(q), static_cast<const __half*>(k), static_cast<const __half*>(v),
                   static_cast<const __half*>(cos_table), static_cast<const __half*>(sin_table),
                   static_cast<__half*>(keys), static_cast<__half*>(values), position, window, heads, kv_heads, dim,
                   max_seq, scale, scratch, arrived, static_cast<__half*>(out), slot_of,
                   static_cast<__half*>(slots_out));
}

void decode_attention_launch(const void* q, const void* k, const void* v, const void* cos_table, const void* sin_table,
                             void* keys, void* values, const int64_t* position, int window, int heads, int kv_heads,
                             int dim, int max_seq, int length, float scale, float* scratch, void* out,
                             const int* slot_of, void* slots_out, cudaStream_t stream) {
    // Value dims per lane in half2 (PAIRS): as few as the head needs, they are all held in registers.
    // Heads of up to 128 dims (in 16-byte halves) split each key over two lanes in twice the warps.
    using Launch = void (*)(const void*, const void*, const void*, const void*, const void*, void*, void*,
                            const int64_t*, int, int, int, int, int, int, float, float*, void*, const int*, void*,
                            cudaStream_t);
    const bool short_bucket = length <= MOST_WARPS * 32;
    Launch launch;
    if (dim % 16 == 0 && dim <= 64) {
        launch = short_bucket ? launch_with<1, 2 * MOST_WARPS, 2> : launch_with<1, 2 * LONG_WARPS, 2>;
    } else if (dim % 16 == 0 && dim <= 128) {
        launch = short_bucket ? launch_with<2, 2 * MOST_WARPS, 2> : launch_with<2, 2 * LONG_WARPS, 2>;
    } else if (dim <= 64) {
        launch = short_bucket ? launch_with<1, MOST_WARPS, 1> : launch_with<1, LONG_WARPS, 1>;
    } else if (dim <= 128) {
        launch = short_bucket ? launch_with<2, MOST_WARPS, 1> : launch_with<2, LONG_WARPS, 1>;
    } else {
        launch = short_bucket ? launch_with<4, MOST_WARPS, 1> : launch_with<4, LONG_WARPS, 1>;
    }
    launch(q, k, v, cos_table, sin_table, keys, values, position, window, heads, kv_heads, dim, max_seq, length, scale,
           scratch, out, slot_of, slots_out, stream);
}
