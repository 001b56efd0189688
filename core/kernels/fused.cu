// Fused pieces of a decode step: each replaces a run of small torch kernels
// (RMSNorm is seven of them, rope and the cache append a dozen), which matters
// when a step is a few hundred launches replayed from a CUDA graph. Each rounds
// to fp16 where the torch reference (core/kernels/reference.py) rounds.

#include "fused.h"
#include "launch.h"
#include "rounding.h"

#include <cuda_fp16.h>
#include <algorithm>

namespace {

__device__ __forceinline__ float block_sum(float v, float* shared) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    const int warps = (blockDim.x + 31) >> 5;
    v = lane < warps ? shared[lane] : 0.f;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// One block per row, any width: two passes over the row, the second reading back what the
// thread itself wrote in the first (the rows a decode step norms take the 16-byte kernel below).
__global__ void rms_norm_kernel(const __half* x, const __half* __restrict__ residual, __half* sum_out,
                                const __half* __restrict__ weight, __half* __restrict__ out, int hidden, float eps) {
    __shared__ float shared[32];
    allow_dependents();
    wait_for_producer();
    const size_t base = (size_t)blockIdx.x * hidden;
    float squares = 0.f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        float v = __half2float(x[base + i]);
        if (residual) {
            const __half sum = half_sum(v, __half2float(residual[base + i]));
            sum_out[base + i] = sum;
            v = __half2float(sum);
        }
        squares += v * v;
    }
    const float inverse_rms = inverse_rms_of(block_sum(squares, shared), hidden, eps);
    const __half* row = residual ? sum_out : x;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        out[base + i] = rms_normed(__half2float(row[base + i]), inverse_rms, __half2float(weight[i]));
    }
}

// The same for rows of a multiple of 8 values, 16-byte accesses: every load of the row (x,
// residual, weight) is issued before the first store, so the kernel waits for memory once
// rather than once per element (a decode step runs this twice per layer on one row).
constexpr int VEC_CHUNKS = 4;  // 8-value chunks per thread

__device__ __forceinline__ void unpack8(const uint4& v, float (&out)[8]) {
    const __half2* h = reinterpret_cast<const __half2*>(&v);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        const float2 f = __half22float2(h[e]);
        out[2 * e] = f.x;
        out[2 * e + 1] = f.y;
    }
}

// Which slot-table chunk of 8 slots flat chunk e is: the table and the chunk within it.
// Tables are indexed by constants only: a dynamic index into a kernel's parameters copies
// them to local memory.
__device__ __forceinline__ int2 slot_chunk(const SlotTables& tables, int e) {
#pragma unroll
    for (int t = 0; t < SLOT_TABLES_MOST; ++t) {
        const int chunks = t < tables.count ? tables.slots[t] / 8 : 0;
        if (e < chunks) return make_int2(t, e);
        e -= chunks;
    }
    return make_int2(-1, 0);
}

template <typename T>
__device__ __forceinline__ T table_entry(const T (&entries)[SLOT_TABLES_MOST], int t) {
    static_assert(SLOT_TABLES_MOST == 3, "one select per table");
    return t == 0 ? entries[0] : t == 1 ? entries[1] : entries[2];
}

// Input index e of 8 packed in 16 bytes (by shifts: a byte view would put them on the stack).
__device__ __forceinline__ uint32_t slot_input(const uint4& packed, int e) {
    const uint32_t word = e < 2 ? packed.x : e < 4 ? packed.y : e < 6 ? packed.z : packed.w;
    return (word >> (16 * (e & 1))) & 0xFFFFu;
}

// 8 slots of one table: each the row's value at its input index, or 0 where the slot has none.
__device__ __forceinline__ void write_slot_chunk(const SlotTables& tables, int2 chunk, uint4 index,
                                                 const __half* row, size_t out_row) {
    __half v[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) {
        const uint32_t i = slot_input(index, e);
        v[e] = i == NO_SLOT_INPUT ? __float2half(0.f) : row[i];
    }
    *reinterpret_cast<uint4*>(static_cast<__half*>(table_entry(tables.out, chunk.x)) +
                              out_row * table_entry(tables.slots, chunk.x) + 8 * chunk.y) =
        *reinterpret_cast<const uint4*>(v);
}

__device__ __forceinline__ uint4 slot_index(const SlotTables& tables, int2 chunk) {
    return chunk.x < 0 ? make_uint4(0, 0, 0, 0)
                       : __ldg(reinterpret_cast<const uint4*>(table_entry(tables.index, chunk.x)) + chunk.y);
}

// At most this many threads a block: the kernel needs more than the 64 registers a thread that
// 1024 threads leave.
constexpr int VEC_THREADS_MOST = 512;

__global__ void __launch_bounds__(VEC_THREADS_MOST) rms_norm_vec_kernel(const __half* x, const __half* __restrict__ residual,
                                    __half* sum_out, const __half* __restrict__ weight, __half* __restrict__ out,
                                    int hidden, float eps, const SlotTables tables) {
    __shared__ float shared[32];
    extern __shared__ __align__(16) __half normed_row[];  // the output row, where slot tables gather from it
    const size_t base = (size_t)blockIdx.x * hidden;
    // Block y of a row writes its slot chunks y * threads + threadIdx.x; block 0 also the row itself.
    const bool writes_row = blockIdx.y == 0;
    const int slot_chunk_index = blockIdx.y * blockDim.x + threadIdx.x;
    uint4 xv[VEC_CHUNKS], rv[VEC_CHUNKS], wv[VEC_CHUNKS];
    allow_dependents();
    // The norm's weight and the slot tables are the layer's own; x and the residual are the
    // previous kernels' outputs.
#pragma unroll
    for (int c = 0; c < VEC_CHUNKS; ++c) {
        const int i = (threadIdx.x + c * blockDim.x) * 8;
        wv[c] = i < hidden ? *reinterpret_cast<const uint4*>(weight + i) : make_uint4(0, 0, 0, 0);
    }
    const int2 chunk = slot_chunk(tables, slot_chunk_index);
    const uint4 index = slot_index(tables, chunk);
    wait_for_producer();
#pragma unroll
    for (int c = 0; c < VEC_CHUNKS; ++c) {
        const int i = (threadIdx.x + c * blockDim.x) * 8;
        xv[c] = rv[c] = make_uint4(0, 0, 0, 0);
        if (i < hidden) {
            xv[c] = *reinterpret_cast<const uint4*>(x + base + i);
            if (residual) rv[c] = *reinterpret_cast<const uint4*>(residual + base + i);
        }
    }
    float values[VEC_CHUNKS][8];
    float squares = 0.f;
#pragma unroll
    for (int c = 0; c < VEC_CHUNKS; ++c) {
        const int i = (threadIdx.x + c * blockDim.x) * 8;
        unpack8(xv[c], values[c]);
        if (residual && i < hidden) {
            float r[8];
            unpack8(rv[c], r);
            __half2 sums[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                sums[e] = __floats2half2_rn(values[c][2 * e] + r[2 * e], values[c][2 * e + 1] + r[2 * e + 1]);
                const float2 f = __half22float2(sums[e]);
                values[c][2 * e] = f.x;
                values[c][2 * e + 1] = f.y;
            }
            if (writes_row) *reinterpret_cast<uint4*>(sum_out + base + i) = *reinterpret_cast<const uint4*>(sums);
        }
#pragma unroll
        for (int e = 0; e < 8; ++e) squares += values[c][e] * values[c][e];
    }
    const float inverse_rms = inverse_rms_of(block_sum(squares, shared), hidden, eps);
#pragma unroll
    for (int c = 0; c < VEC_CHUNKS; ++c) {
        const int i = (threadIdx.x + c * blockDim.x) * 8;
        if (i >= hidden) continue;
        float w[8];
        unpack8(wv[c], w);
        __half2 result[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            result[e] = __halves2half2(rms_normed(values[c][2 * e], inverse_rms, w[2 * e]),
                                       rms_normed(values[c][2 * e + 1], inverse_rms, w[2 * e + 1]));
        }
        if (writes_row) *reinterpret_cast<uint4*>(out + base + i) = *reinterpret_cast<const uint4*>(result);
        if (tables.count) *reinterpret_cast<uint4*>(normed_row + i) = *reinterpret_cast<const uint4*>(result);
    }
    if (!tables.count) return;
    // This block's share of the consumers' slot orders, gathered from the row in shared memory.
    __syncthreads();
    if (chunk.x >= 0) write_slot_chunk(tables, chunk, index, normed_row, blockIdx.x);
}

// One block per head (query heads first, then key/value heads) and token, one thread per
// element. Token t sits at position *position + t (or first_position + t where position is
// null: a prompt's start is known on the host); row r of the cos and sin tables holds
// position table_first + r.
__global__ void rope_cache_kernel(__half* __restrict__ q, const __half* __restrict__ k, const __half* __restrict__ v,
                                  const __half* __restrict__ cos_table, const __half* __restrict__ sin_table,
                                  const int64_t* __restrict__ position, int64_t first_position, int64_t table_first,
                                  __half* __restrict__ key_cache, __half* __restrict__ value_cache, int heads,
                                  int kv_heads, int dim, int max_seq) {
    const int d = threadIdx.x, half_dim = dim / 2, token = blockIdx.y;
    allow_dependents();
    wait_for_producer();
    const int64_t pos = (position ? *position : first_position) + token;
    const int64_t row = pos - table_first;
    const float c = __half2float(cos_table[row * dim + d]);
    const float s = __half2float(sin_table[row * dim + d]);
    const bool is_query = blockIdx.x < heads;
    const int head = is_query ? blockIdx.x : blockIdx.x - heads;
    const __half* src = is_query ? q + ((size_t)token * heads + head) * dim : k + ((size_t)token * kv_heads + head) * dim;
    const float own = __half2float(src[d]);
    const float partner = d < half_dim ? -__half2float(src[d + half_dim]) : __half2float(src[d - half_dim]);
    const float rotated = rope_element(own, c, partner, s);
    if (is_query) {
        __syncthreads();  // every partner read before any write of this head
        q[((size_t)token * heads + head) * dim + d] = __float2half(rotated);
    } else {
        const size_t slot = ((size_t)head * max_seq + pos) * dim + d;
        key_cache[slot] = __float2half(rotated);
        value_cache[slot] = v[((size_t)token * kv_heads + head) * dim + d];
    }
}

// The same, for dims of a multiple of 4: a thread takes elements 2i, 2i + 1 and their rotation
// partners dim/2 + 2i, dim/2 + 2i + 1 with half2 accesses, reading all four before it writes
// them, so no barrier; a block takes several heads of one token.
__global__ void rope_cache_pairs_kernel(__half* __restrict__ q, const __half* __restrict__ k,
                                        const __half* __restrict__ v, const __half* __restrict__ cos_table,
                                        const __half* __restrict__ sin_table, const int64_t* __restrict__ position,
                                        int64_t first_position, int64_t table_first, __half* __restrict__ key_cache,
                                        __half* __restrict__ value_cache, int heads, int kv_heads, int dim,
                                        int max_seq) {
    const int half_dim = dim / 2, lo = 2 * threadIdx.x, hi = lo + half_dim, token = blockIdx.y;
    const int index = blockIdx.x * blockDim.y + threadIdx.y;  // query heads, then key/value heads
    allow_dependents();
    wait_for_producer();
    if (index >= heads + kv_heads) return;
    const int64_t pos = (position ? *position : first_position) + token;
    const __half* cos_row = cos_table + (pos - table_first) * dim;
    const __half* sin_row = sin_table + (pos - table_first) * dim;
    const float2 c_lo = __half22float2(*reinterpret_cast<const __half2*>(cos_row + lo));
    const float2 c_hi = __half22float2(*reinterpret_cast<const __half2*>(cos_row + hi));
    const float2 s_lo = __half22float2(*reinterpret_cast<const __half2*>(sin_row + lo));
    const float2 s_hi = __half22float2(*reinterpret_cast<const __half2*>(sin_row + hi));
    const bool is_query = index < heads;
    const int head = is_query ? index : index - heads;
    __half* src = is_query ? q + ((size_t)token * heads + head) * dim
                           : const_cast<__half*>(k) + ((size_t)token * kv_heads + head) * dim;
    const float2 x_lo = __half22float2(*reinterpret_cast<const __half2*>(src + lo));
    const float2 x_hi = __half22float2(*reinterpret_cast<const __half2*>(src + hi));
    const __half2 out_lo = __floats2half2_rn(rope_element(x_lo.x, c_lo.x, -x_hi.x, s_lo.x),
                                             rope_element(x_lo.y, c_lo.y, -x_hi.y, s_lo.y));
    const __half2 out_hi = __floats2half2_rn(rope_element(x_hi.x, c_hi.x, x_lo.x, s_hi.x),
                                             rope_element(x_hi.y, c_hi.y, x_lo.y, s_hi.y));
    if (is_query) {
        *reinterpret_cast<__half2*>(src + lo) = out_lo;
        *reinterpret_cast<__half2*>(src + hi) = out_hi;
    } else {
        const size_t slot = ((size_t)head * max_seq + pos) * dim;
        *reinterpret_cast<__half2*>(key_cache + slot + lo) = out_lo;
        *reinterpret_cast<__half2*>(key_cache + slot + hi) = out_hi;
        const __half* v_row = v + ((size_t)token * kv_heads + head) * dim;
        *reinterpret_cast<__half2*>(value_cache + slot + lo) = *reinterpret_cast<const __half2*>(v_row + lo);
        *reinterpret_cast<__half2*>(value_cache + slot + hi) = *reinterpret_cast<const __half2*>(v_row + hi);
    }
}

__global__ void silu_mul_kernel(const __half2* __restrict__ gate, const __half2* __restrict__ up,
                                __half2* __restrict__ out, int64_t pairs) {
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    allow_dependents();
    wait_for_producer();
    if (i >= pairs) return;
    out[i] = silu_times2(gate[i], up[i]);
}

// The same, written in the consumer's slot order: a thread takes 2 slots of one row (the
// gathers are scattered 2-byte loads, so many threads over many multiprocessors), its input
// indices requested before the wait (they are the layer's own).
__global__ void silu_mul_slots_kernel(const __half* __restrict__ gate, const __half* __restrict__ up,
                                      const uint32_t* __restrict__ index, __half2* __restrict__ out, int n, int slots) {
    const int pair = blockIdx.x * blockDim.x + threadIdx.x, row = blockIdx.y;
    allow_dependents();
    const bool mine = pair < slots / 2;
    const uint32_t packed = mine ? __ldg(index + pair) : 0u;
    wait_for_producer();
    if (!mine) return;
    const __half* g = gate + (size_t)row * n;
    const __half* u = up + (size_t)row * n;
    __half v[2];
#pragma unroll
    for (int e = 0; e < 2; ++e) {
        const uint32_t i = (packed >> (16 * e)) & 0xFFFFu;
        v[e] = i == NO_SLOT_INPUT ? __float2half(0.f) : silu_times(__half2float(g[i]), __half2float(u[i]));
    }
    out[(size_t)row * (slots / 2) + pair] = __halves2half2(v[0], v[1]);
}

}  // namespace

bool rms_norm_takes_slots(int hidden) { return hidden % 8 == 0 && hidden / 8 <= VEC_CHUNKS * VEC_THREADS_MOST; }

void rms_norm_launch(void* x, const void* residual, void* sum_out, const void* weight, void* out, int rows, int hidden,
                     float eps, cudaStream_t stream, const SlotTables& tables) {
    const int chunks = hidden / 8;
    if (hidden % 8 == 0 && chunks <= VEC_CHUNKS * VEC_THREADS_MOST) {
        const int threads = std::max(32, (chunks + VEC_CHUNKS * 32 - 1) / (VEC_CHUNKS * 32) * 32);
        int parts = 1;
        size_t row_bytes = 0;
        if (tables.count) {
            // Every block of a row norms the whole row (a few KiB read again from L2) and writes
            // one chunk of 8 slots a thread: the gather spreads over many multiprocessors.
            int slot_chunks = 0;
            for (int t = 0; t < tables.count; ++t) slot_chunks += tables.slots[t] / 8;
            parts = (slot_chunks + threads - 1) / threads;
            row_bytes = sizeof(__half) * hidden;
            if (row_bytes > 48 * 1024)
                cudaFuncSetAttribute(rms_norm_vec_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)row_bytes);
        }
        launch_chained(rms_norm_vec_kernel, dim3(rows, parts), dim3(threads), row_bytes, stream,
                       static_cast<const __half*>(x), static_cast<const __half*>(residual), static_cast<__half*>(sum_out),
                       static_cast<const __half*>(weight), static_cast<__half*>(out), hidden, eps, tables);
        return;
    }
    // Up to 16 values a thread before a block takes more threads (at most 1024, then more values).
    int threads = 1024;
    while (threads > 128 && (threads / 2) * 16 >= hidden) threads /= 2;
    launch_chained(rms_norm_kernel, dim3(rows), dim3(threads), 0, stream, static_cast<const __half*>(x),
                   static_cast<const __half*>(residual), static_cast<__half*>(sum_out), static_cast<const __half*>(weight),
                   static_cast<__half*>(out), hidden, eps);
}

void rope_cache_launch(void* q, const void* k, const void* v, const void* cos_table, const void* sin_table,
                       const int64_t* position, int64_t first_position, int64_t table_first, int tokens,
                       void* key_cache, void* value_cache, int heads, int kv_heads, int dim, int max_seq,
                       cudaStream_t stream) {
    if (dim % 4 == 0) {
        // About 128 threads a block: dim / 4 per head.
        const int per_head = dim / 4, heads_per_block = std::max(1, 128 / per_head);
        launch_chained(rope_cache_pairs_kernel, dim3((heads + kv_heads + heads_per_block - 1) / heads_per_block, tokens),
                       dim3(per_head, heads_per_block), 0, stream, static_cast<__half*>(q), static_cast<const __half*>(k),
                       static_cast<const __half*>(v), static_cast<const __half*>(cos_table),
                       static_cast<const __half*>(sin_table), position, first_position, table_first,
                       static_cast<__half*>(key_cache), static_cast<__half*>(value_cache), heads, kv_heads, dim, max_seq);
        return;
    }
    launch_chained(rope_cache_kernel, dim3(heads + kv_heads, tokens), dim3(dim), 0, stream, static_cast<__half*>(q),
                   static_cast<const __half*>(k), static_cast<const __half*>(v), static_cast<const __half*>(cos_table),
                   static_cast<const __half*>(sin_table), position, first_position, table_first,
                   static_cast<__half*>(key_cache), static_cast<__half*>(value_cache), heads, kv_heads, dim, max_seq);
}

void silu_mul_slots_launch(const void* gate, const void* up, const uint16_t* index, void* out, int rows, int n,
                           int slots, cudaStream_t stream) {
    const int threads = 64;
    launch_chained(silu_mul_slots_kernel, dim3((slots / 2 + threads - 1) / threads, rows), dim3(threads), 0, stream,
                   static_cast<const __half*>(gate), static_cast<const __half*>(up),
                   reinterpret_cast<const uint32_t*>(index), static_cast<__half2*>(out), n, slots);
}

void silu_mul_launch(const void* gate, const void* up, void* out, int64_t n, cudaStream_t stream) {
    const int64_t pairs = n / 2;
    const int threads = 256;
    launch_chained(silu_mul_kernel, dim3((pairs + threads - 1) / threads), dim3(threads), 0, stream,
        static_cast<const __half2*>(gate), static_cast<const __half2*>(up), static_cast<__half2*>(out), pairs);
}
