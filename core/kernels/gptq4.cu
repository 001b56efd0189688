// GPTQ 4-bit kernels: a split-K product for a few input rows that reads qweight
// directly, and a dequantizer for large batches (cuBLAS multiplies its tile).
//
// Layout (core/formats/gptq/layout.py): qweight int32 [k/8, n], input 8i + j in
// nibble j of row i; qzeros int32 [groups, n/8], output 8c + j in nibble j of
// column c; scales fp16 [groups, n]. Rows arrive sorted by group, so a group
// is a run of packed rows; the act-order permutation is applied to the input
// once per block while it is staged in shared memory.
//
// Decoding: a nibble OR-ed under the fp16 exponent of 1024 (0x6400) is the
// half 1024 + q, so one LOP3 turns two nibbles of a word (bits 0-3 and 16-19)
// into a half2, and a nibble at bits 4-7 gives 1024 + 16q, fixed with one
// HFMA2 by 1/16. Adding -1024 - z (or -64 - z) leaves q - z exactly. Each
// packed row of a column is then four HFMA2 against half2 inputs paired the
// same way (x0 x4, x1 x5, x2 x6, x3 x7), summed in fp32 and scaled per group:
// about two instructions per weight against three for decoding one code at a
// time into fp32. That did not make it faster than the EXL2 kernel at 4 bits,
// and neither did having every weight in flight early (both measured by
// python3 -m bench.gptq4_speed --sweep; bench/RESULTS.md).
//
// fp16 holds the four-term partial sums: |q - z| <= 16, so an input above ~1000
// in magnitude could overflow one; ExLlamaV2's GPTQ kernel makes the same trade.

#include "gptq4.h"

#include <cuda_fp16.h>
#include <algorithm>
#include <cstdint>
#include <cstring>

namespace {

constexpr int COLS_PER_THREAD = 4;  // one 16-byte load covers four columns of a packed row
constexpr int ROWS_PER_WORD = 8;
constexpr int DEQUANT_PACKED_ROWS = 8;  // packed rows per thread of the dequantizer
constexpr int COPY_GROUP_ROWS = 4;  // packed rows per asynchronous copy group

__device__ __forceinline__ half2 bits_as_half2(uint32_t bits) {
    half2 h;
    memcpy(&h, &bits, sizeof(h));
    return h;
}

// The eight codes of one column's word minus the zero, as half2 pairs of rows (0,4), (1,5), (2,6), (3,7).
__device__ __forceinline__ void decode_word(uint32_t w, half2 zero_low, half2 zero_high, half2 sixteenth,
                                            half2 (&q)[4]) {
    const uint32_t a = (w & 0x000F000Fu) | 0x64006400u;
    const uint32_t b = (w & 0x00F000F0u) | 0x64006400u;
    w >>= 8;
    const uint32_t c = (w & 0x000F000Fu) | 0x64006400u;
    const uint32_t d = (w & 0x00F000F0u) | 0x64006400u;
    q[0] = __hadd2(bits_as_half2(a), zero_low);
    q[1] = __hfma2(bits_as_half2(b), sixteenth, zero_high);
    q[2] = __hadd2(bits_as_half2(c), zero_low);
    q[3] = __hfma2(bits_as_half2(d), sixteenth, zero_high);
}

// The stored scales and zeros of four columns of group g, loaded; decoded by group_terms.
struct RawTerms {
    uint2 scales;    // four fp16 scales
    uint32_t zeros;  // their four zero nibbles in the low 16 bits
};

__device__ __forceinline__ RawTerms load_terms(const uint32_t* qzeros, const __half* scales, int g, int n, int col) {
    RawTerms raw;
    raw.scales = __ldg(reinterpret_cast<const uint2*>(scales + (size_t)g * n + col));
    // col is a multiple of 4, so its four zeros are one half of a qzeros word.
    raw.zeros = __ldg(qzeros + (size_t)g * (n / 8) + col / 8) >> (4 * (col & 7));
    return raw;
}

__device__ __forceinline__ void group_terms(const RawTerms& raw, int zero_offset, float (&scale)[COLS_PER_THREAD],
                                            half2 (&zero_low)[COLS_PER_THREAD], half2 (&zero_high)[COLS_PER_THREAD]) {
    const uint32_t halves[2] = {raw.scales.x, raw.scales.y};
#pragma unroll
    for (int c = 0; c < COLS_PER_THREAD; ++c) {
        const float2 pair = __half22float2(bits_as_half2(halves[c / 2]));
        scale[c] = (c & 1) ? pair.y : pair.x;
        const float z = float((raw.zeros >> (4 * c)) & 15u) + float(zero_offset);
        zero_low[c] = __float2half2_rn(-1024.f - z);
        zero_high[c] = __float2half2_rn(-64.f - z);
    }
}

// One packed row (eight inputs) of four columns, into acc.
template <int M>
__device__ __forceinline__ void row_dot(const uint4& w, const uint4* xrow, int x_stride,
                                        const float (&scale)[COLS_PER_THREAD], const half2 (&zero_low)[COLS_PER_THREAD],
                                        const half2 (&zero_high)[COLS_PER_THREAD], half2 sixteenth,
                                        float (&acc)[M][COLS_PER_THREAD]) {
    uint4 xv[M];
#pragma unroll
    for (int m = 0; m < M; ++m) xv[m] = xrow[m * x_stride];
    const uint32_t words[COLS_PER_THREAD] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int c = 0; c < COLS_PER_THREAD; ++c) {
        half2 codes[4];
        decode_word(words[c], zero_low[c], zero_high[c], sixteenth, codes);
#pragma unroll
        for (int m = 0; m < M; ++m) {
            half2 t = __hmul2(codes[0], bits_as_half2(xv[m].x));
            t = __hfma2(codes[1], bits_as_half2(xv[m].y), t);
            t = __hfma2(codes[2], bits_as_half2(xv[m].z), t);
            t = __hfma2(codes[3], bits_as_half2(xv[m].w), t);
            const float2 f = __half22float2(t);
            acc[m][c] = fmaf(f.x + f.y, scale[c], acc[m][c]);
        }
    }
}

// Asynchronous 16-byte copies global -> shared (sm_80+; a plain copy on older GPUs).
__device__ __forceinline__ void copy_async16(uint4* shared, const uint4* global) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(shared));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(address), "l"(global) : "memory");
#else
    *shared = __ldg(global);
#endif
}

__device__ __forceinline__ void copy_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Wait until at most `pending` of this thread's committed copy groups are outstanding
// (the count must be an immediate; more than 7 waits as for 7, which is only stricter).
__device__ __forceinline__ void copy_async_wait(int pending) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    switch (pending) {
        case 0: asm volatile("cp.async.wait_group 0;\n" ::: "memory"); break;
        case 1: asm volatile("cp.async.wait_group 1;\n" ::: "memory"); break;
        case 2: asm volatile("cp.async.wait_group 2;\n" ::: "memory"); break;
        case 3: asm volatile("cp.async.wait_group 3;\n" ::: "memory"); break;
        case 4: asm volatile("cp.async.wait_group 4;\n" ::: "memory"); break;
        case 5: asm volatile("cp.async.wait_group 5;\n" ::: "memory"); break;
        case 6: asm volatile("cp.async.wait_group 6;\n" ::: "memory"); break;
        default: asm volatile("cp.async.wait_group 7;\n" ::: "memory"); break;
    }
#endif
}

// One run of packed rows of one group for four columns, into acc.
// BATCH rows' loads are issued before any is used: a slice is a chain of load latencies otherwise.
template <int M, int BATCH>
__device__ __forceinline__ void segment_dot(const uint4* q, int stride4, int row, int rows, const uint4* xrow,
                                            int x_stride, const float (&scale)[COLS_PER_THREAD],
                                            const half2 (&zero_low)[COLS_PER_THREAD],
                                            const half2 (&zero_high)[COLS_PER_THREAD],
                                            float (&acc)[M][COLS_PER_THREAD]) {
    const half2 sixteenth = __float2half2_rn(0.0625f);
    for (int r = 0; r < rows; r += BATCH) {
        uint4 w[BATCH];
#pragma unroll
        for (int b = 0; b < BATCH; ++b)
            w[b] = r + b < rows ? __ldg(q + (size_t)(row + r + b) * stride4) : make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
        for (int b = 0; b < BATCH; ++b) {
            if (r + b >= rows) break;
            row_dot<M>(w[b], xrow + r + b, x_stride, scale, zero_low, zero_high, sixteenth, acc);
        }
    }
}

// grid (column tiles, K slices); block: threads over columns, four each.
// Every slice adds its partial sums into `partial` (fp32, zero on entry) by
// atomics; the last block of a column tile to finish (counted in `done`) turns
// the sums into fp16 with the bias, and leaves `partial` and `done` zeroed.
//
// With ASYNC every weight a block needs is requested at once into shared memory
// (its own 16 bytes per row for each thread, so no barrier is needed), in groups
// of COPY_GROUP_ROWS rows that the row loop waits for one by one: DRAM streams
// while the inputs are staged and while earlier rows are multiplied. Without
// it, registers hold BATCH rows' loads at a time.
template <int M, bool ASYNC>
__global__ void gptq4_gemv_kernel(const __half* __restrict__ x, int x_rows, int k, const int* __restrict__ perm,
                                  const uint4* __restrict__ qweight, int n, const uint32_t* __restrict__ qzeros,
                                  const __half* __restrict__ scales, int zero_offset,
                                  const int4* __restrict__ segments, const int4* __restrict__ slices,
                                  float* __restrict__ partial, int* __restrict__ done,
                                  const __half* __restrict__ bias, __half* __restrict__ out, int max_slice_rows,
                                  int prefetch) {
    // [M][slice packed rows]: each packed row's eight inputs as halves x0 x4 x1 x5 x2 x6 x3 x7;
    // then, with ASYNC, [slice packed rows][threads] of weights.
    extern __shared__ uint4 xs[];
    uint4* ws = xs + M * max_slice_rows;
    __shared__ bool last;
    const int4 slice = slices[blockIdx.y];  // first segment, end segment, first packed row, packed rows
    const int row0 = slice.z, slice_rows = slice.w;
    const int col = (blockIdx.x * blockDim.x + threadIdx.x) * COLS_PER_THREAD;
    // n is a multiple of 8, so a thread's four columns are all in or all out.
    // Threads past the last column still take part in the barriers below.
    const bool active = col < n;
    const int stride4 = n / COLS_PER_THREAD;
    const uint4* q = qweight + col / COLS_PER_THREAD;

    // Staging the inputs is a chain of dependent reads (perm, then x); asking for
    // the slice's weights first lets DRAM work meanwhile, and the loads below hit L2.
    if (prefetch && active && !ASYNC)
        for (int p = 0; p < slice_rows; ++p)
            asm volatile("prefetch.global.L2 [%0];" ::"l"(q + (size_t)(row0 + p) * stride4));
    const int copy_groups = (slice_rows + COPY_GROUP_ROWS - 1) / COPY_GROUP_ROWS;
    RawTerms raw{};
    int4 seg = make_int4(0, 0, 0, 0);
    if constexpr (ASYNC) {
        if (active) {
            for (int p = 0; p < slice_rows; ++p) {
                copy_async16(ws + p * blockDim.x + threadIdx.x, q + (size_t)(row0 + p) * stride4);
                if (p % COPY_GROUP_ROWS == COPY_GROUP_ROWS - 1 || p == slice_rows - 1) copy_async_commit();
            }
            // The first group's scales and zeros, also in flight while the inputs are staged.
            seg = segments[slice.x];
            raw = load_terms(qzeros, scales, seg.x, n, col);
        }
    }

    __half* xh = reinterpret_cast<__half*>(xs);
    const int per_m = slice_rows * ROWS_PER_WORD;
    for (int i = threadIdx.x; i < M * per_m; i += blockDim.x) {
        const int m = i / per_m, r = i - m * per_m, j = r & 7;
        __half v = __float2half(0.f);
        if (m < x_rows) v = x[(size_t)m * k + perm[row0 * ROWS_PER_WORD + r]];
        xh[(size_t)(m * slice_rows + (r >> 3)) * ROWS_PER_WORD + 2 * (j & 3) + (j >> 2)] = v;
    }
    __syncthreads();

    float acc[M][COLS_PER_THREAD];
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
        for (int c = 0; c < COLS_PER_THREAD; ++c) acc[m][c] = 0.f;

    constexpr int BATCH = M <= 2 ? 8 : 4;
    const half2 sixteenth = __float2half2_rn(0.0625f);
    for (int s = slice.x; active && s < slice.y; ++s) {
        float scale[COLS_PER_THREAD];
        half2 zero_low[COLS_PER_THREAD], zero_high[COLS_PER_THREAD];
        if constexpr (ASYNC) {
            const int4 current = seg;  // group, first packed row, packed rows
            group_terms(raw, zero_offset, scale, zero_low, zero_high);
            // The next group's terms load while this one's rows are multiplied.
            if (s + 1 < slice.y) {
                seg = segments[s + 1];
                raw = load_terms(qzeros, scales, seg.x, n, col);
            }
            for (int r = current.y - row0; r < current.y - row0 + current.z; ++r) {
                if (r % COPY_GROUP_ROWS == 0) copy_async_wait(copy_groups - 1 - r / COPY_GROUP_ROWS);
                row_dot<M>(ws[r * blockDim.x + threadIdx.x], xs + r, slice_rows, scale, zero_low, zero_high, sixteenth,
                           acc);
            }
        } else {
            const int4 current = segments[s];
            group_terms(load_terms(qzeros, scales, current.x, n, col), zero_offset, scale, zero_low, zero_high);
            segment_dot<M, BATCH>(q, stride4, current.y, current.z, xs + (current.y - row0), slice_rows, scale,
                                  zero_low, zero_high, acc);
        }
    }

    if (active) {
#pragma unroll
        for (int m = 0; m < M; ++m) {
            if (m >= x_rows) break;
#pragma unroll
            for (int c = 0; c < COLS_PER_THREAD; ++c) atomicAdd(partial + (size_t)m * n + col + c, acc[m][c]);
        }
    }

    // Each thread's fence makes its sums visible before the block is counted; the
    // last block's fence after the count orders its reads after every other block's sums.
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(done + blockIdx.x, 1) == (int)gridDim.y - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    if (active) {
        for (int m = 0; m < x_rows && m < M; ++m) {
            __half vals[COLS_PER_THREAD];
#pragma unroll
            for (int c = 0; c < COLS_PER_THREAD; ++c) {
                float* p = partial + (size_t)m * n + col + c;
                float v = __ldcg(p);
                *p = 0.f;
                if (bias) v += __half2float(bias[col + c]);
                vals[c] = __float2half(v);
            }
            uint2 packed;
            memcpy(&packed, vals, sizeof(packed));
            *reinterpret_cast<uint2*>(out + (size_t)m * n + col) = packed;
        }
    }
    if (threadIdx.x == 0) done[blockIdx.x] = 0;
}

// grid (column tiles, runs of DEQUANT_PACKED_ROWS packed rows): each thread writes four columns.
// (code - zero) * scale is exact in fp32, so one rounding to fp16 matches the torch reference bit for bit.
__global__ void gptq4_dequant_kernel(const uint4* __restrict__ qweight, int k, int n, const uint32_t* __restrict__ qzeros,
                                     const __half* __restrict__ scales, const int* __restrict__ row_group,
                                     int zero_offset, __half* __restrict__ out) {
    const int col = (blockIdx.x * blockDim.x + threadIdx.x) * COLS_PER_THREAD;
    if (col >= n) return;
    const int stride4 = n / COLS_PER_THREAD;
    const int first = blockIdx.y * DEQUANT_PACKED_ROWS;
    const int end = min(k / ROWS_PER_WORD, first + DEQUANT_PACKED_ROWS);
    for (int p = first; p < end; ++p) {
        const uint4 w = __ldg(qweight + (size_t)p * stride4 + col / COLS_PER_THREAD);
        const uint32_t words[COLS_PER_THREAD] = {w.x, w.y, w.z, w.w};
#pragma unroll
        for (int j = 0; j < ROWS_PER_WORD; ++j) {
            const int row = p * ROWS_PER_WORD + j;
            // Groups may change at any row here (the small-batch kernel needs them word-aligned; this does not).
            const int g = __ldg(row_group + row);
            const uint2 packed = __ldg(reinterpret_cast<const uint2*>(scales + (size_t)g * n + col));
            const uint32_t halves[2] = {packed.x, packed.y};
            const uint32_t zeros = __ldg(qzeros + (size_t)g * (n / 8) + col / 8) >> (4 * (col & 7));
            __half vals[COLS_PER_THREAD];
#pragma unroll
            for (int c = 0; c < COLS_PER_THREAD; ++c) {
                const float2 pair = __half22float2(bits_as_half2(halves[c / 2]));
                const float scale = (c & 1) ? pair.y : pair.x;
                const float code = float((words[c] >> (4 * j)) & 15u);
                const float zero = float((zeros >> (4 * c)) & 15u) + float(zero_offset);
                vals[c] = __float2half((code - zero) * scale);
            }
            uint2 stored;
            memcpy(&stored, vals, sizeof(stored));
            *reinterpret_cast<uint2*>(out + (size_t)row * n + col) = stored;
        }
    }
}

template <int M, bool ASYNC>
void launch_gemv_as(const Gptq4Layer& layer, const __half* x, int x_rows, int max_slice_rows, int slices, int threads,
                    float* partial, int* done, const __half* bias, __half* out, bool prefetch, cudaStream_t stream) {
    const dim3 grid(gptq4_gemm_small_tiles(layer, threads), slices);
    const size_t smem = sizeof(uint4) * max_slice_rows * (M + (ASYNC ? threads : 0));
    auto kernel = gptq4_gemv_kernel<M, ASYNC>;
    if (smem > 48 * 1024) cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    kernel<<<grid, threads, smem, stream>>>(
        x, x_rows, layer.k, layer.perm, reinterpret_cast<const uint4*>(layer.qweight), layer.n,
        reinterpret_cast<const uint32_t*>(layer.qzeros), static_cast<const __half*>(layer.scales), layer.zero_offset,
        reinterpret_cast<const int4*>(layer.segments), reinterpret_cast<const int4*>(layer.slices), partial, done, bias,
        out, max_slice_rows, prefetch ? 1 : 0);
}

template <int M>
void launch_gemv(const Gptq4Layer& layer, const __half* x, int x_rows, int max_slice_rows, int slices, int threads,
                 float* partial, int* done, const __half* bias, __half* out, bool prefetch, bool async_copy,
                 cudaStream_t stream) {
    if (async_copy)
        launch_gemv_as<M, true>(layer, x, x_rows, max_slice_rows, slices, threads, partial, done, bias, out, prefetch, stream);
    else
        launch_gemv_as<M, false>(layer, x, x_rows, max_slice_rows, slices, threads, partial, done, bias, out, prefetch, stream);
}

}  // namespace

int gptq4_gemm_small_tiles(const Gptq4Layer& layer, int threads) {
    return (layer.n / COLS_PER_THREAD + threads - 1) / threads;
}

void gptq4_gemm_small_launch(const Gptq4Layer& layer, const void* x, int x_rows, int max_slice_rows, int slices,
                             int threads, bool prefetch, bool async_copy, float* partial, const void* bias,
                             void* out, cudaStream_t stream) {
    const __half* xh = static_cast<const __half*>(x);
    const __half* bh = static_cast<const __half*>(bias);
    // The column tiles' completion counts sit right after the sums of one pass, zero like them between launches.
    int* done = reinterpret_cast<int*>(partial + (size_t)std::min(x_rows, 8) * layer.n);
    // Up to 8 rows per pass keeps the accumulators in registers; each pass reuses the same zeroed sums.
    for (int m0 = 0; m0 < x_rows; m0 += 8) {
        const int rows = std::min(8, x_rows - m0);
        const __half* xm = xh + (size_t)m0 * layer.k;
        __half* om = static_cast<__half*>(out) + (size_t)m0 * layer.n;
        switch (rows) {
            case 1: launch_gemv<1>(layer, xm, rows, max_slice_rows, slices, threads, partial, done, bh, om, prefetch, async_copy, stream); break;
            case 2: launch_gemv<2>(layer, xm, rows, max_slice_rows, slices, threads, partial, done, bh, om, prefetch, async_copy, stream); break;
            case 3: case 4: launch_gemv<4>(layer, xm, rows, max_slice_rows, slices, threads, partial, done, bh, om, prefetch, async_copy, stream); break;
            default: launch_gemv<8>(layer, xm, rows, max_slice_rows, slices, threads, partial, done, bh, om, prefetch, async_copy, stream); break;
        }
    }
}

void gptq4_dequant_launch(const Gptq4Layer& layer, void* out, cudaStream_t stream) {
    const int threads = 128;
    const int packed_rows = layer.k / ROWS_PER_WORD;
    const dim3 grid((layer.n / COLS_PER_THREAD + threads - 1) / threads,
                    (packed_rows + DEQUANT_PACKED_ROWS - 1) / DEQUANT_PACKED_ROWS);
    gptq4_dequant_kernel<<<grid, threads, 0, stream>>>(
        reinterpret_cast<const uint4*>(layer.qweight), layer.k, layer.n, reinterpret_cast<const uint32_t*>(layer.qzeros),
        static_cast<const __half*>(layer.scales), layer.row_group, layer.zero_offset, static_cast<__half*>(out));
}
