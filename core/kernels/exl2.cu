// EXL2 kernels: a split-K matrix-vector / small-batch product that reads the
// packed mixed-bit weights directly, and a dequantizer for large batches.
//
// Layout (see core/exl2_format.py): q_weight is int32 [packed_rows, n_pad];
// each column is one little-endian bit stream per group, so a run of 32 rows of
// a b-bit group is exactly b words of that column, and codes of 3, 5 and 6 bits
// straddle words. Rows are in act-order; the input is gathered through `perm`
// once per block while it is staged in shared memory.
//
// The host hands over a group table (bits, first packed row, first act-order
// row, rows) and a slice table (first and end group, first row, rows of each K
// slice; one read tells a block where its inputs are): slices are whole
// groups of roughly equal bytes, chosen once per layer in Python.

#include "exl2.h"

#include <cuda_fp16.h>
#include <algorithm>
#include <cstdint>

namespace {

constexpr int COLS_PER_THREAD = 4;  // one 16-byte load covers four columns of a packed row
// Rows past a slice's end read zeros from shared memory, so a last group that
// ends mid-word can be processed in whole units without a bounds check per row.
constexpr int X_PAD_ROWS = 32;

// A code `bits` wide at bit `pos` of the words w[], placed in the top mantissa
// bits of 1.0f: the float is 1 + code / 2^bits, built with a shift and a LOP3
// instead of a slow int-to-float conversion. All arguments fold to constants
// once the caller's loops are unrolled.
template <int BITS>
__device__ __forceinline__ float code_as_unit_float(const uint32_t* w, int pos) {
    const int word = pos >> 5, sh = pos & 31;
    constexpr int target = 23 - BITS;
    uint32_t v;
    if (sh + BITS <= 32) {
        v = sh >= target ? (w[word] >> (sh - target)) : (w[word] << (target - sh));
    } else {
        v = __funnelshift_r(w[word], w[word + 1], sh - target);
    }
    constexpr uint32_t mask = ((1u << BITS) - 1u) << target;
    return __uint_as_float((v & mask) | 0x3F800000u);
}

// Words per unit (the smallest run of rows that ends on a word boundary) and rows per unit.
template <int BITS> struct Unit {
    static constexpr int words = (BITS == 3 || BITS == 5) ? BITS : (BITS == 6 ? 3 : 1);
    static constexpr int rows = words * 32 / BITS;
};

__device__ __forceinline__ void load_quad(uint32_t (&dst)[COLS_PER_THREAD], const int4* src, bool valid) {
    int4 v = valid ? __ldg(src) : make_int4(0, 0, 0, 0);
    dst[0] = v.x; dst[1] = v.y; dst[2] = v.z; dst[3] = v.w;
}

// Accumulate sum_r f(code) * x[m][r] for `ROWS` rows whose WORDS words per column are in w.
template <int BITS, int M, int WORDS, int ROWS>
__device__ __forceinline__ void dot_rows(const uint32_t (&w)[WORDS][COLS_PER_THREAD], const float* xs, int x_stride,
                                         float (&acc)[M][COLS_PER_THREAD], float (&xsum)[M]) {
#pragma unroll
    for (int r = 0; r < ROWS; r += 4) {
        float4 xv[M];
#pragma unroll
        for (int m = 0; m < M; ++m) {
            xv[m] = *reinterpret_cast<const float4*>(xs + m * x_stride + r);
            xsum[m] += (xv[m].x + xv[m].y) + (xv[m].z + xv[m].w);
        }
#pragma unroll
        for (int c = 0; c < COLS_PER_THREAD; ++c) {
            uint32_t col[WORDS];
#pragma unroll
            for (int i = 0; i < WORDS; ++i) col[i] = w[i][c];
            const float f0 = code_as_unit_float<BITS>(col, (r + 0) * BITS);
            const float f1 = code_as_unit_float<BITS>(col, (r + 1) * BITS);
            const float f2 = code_as_unit_float<BITS>(col, (r + 2) * BITS);
            const float f3 = code_as_unit_float<BITS>(col, (r + 3) * BITS);
#pragma unroll
            for (int m = 0; m < M; ++m) {
                acc[m][c] = fmaf(f0, xv[m].x, acc[m][c]);
                acc[m][c] = fmaf(f1, xv[m].y, acc[m][c]);
                acc[m][c] = fmaf(f2, xv[m].z, acc[m][c]);
                acc[m][c] = fmaf(f3, xv[m].w, acc[m][c]);
            }
        }
    }
}

// One group for four columns: sum over its rows of (code - 2^(bits-1)) * x, unscaled.
// With f = 1 + code/2^b, sum (code - 2^(b-1)) x = 2^b * (sum f x - 1.5 sum x).
template <int BITS, int M>
__device__ __forceinline__ void group_dot(const int4* q, int stride4, int qrow, int qrow_end, int rows,
                                          const float* xs, int x_stride, float (&out)[M][COLS_PER_THREAD]) {
    float acc[M][COLS_PER_THREAD];
    float xsum[M];
#pragma unroll
    for (int m = 0; m < M; ++m) {
        xsum[m] = 0.f;
#pragma unroll
        for (int c = 0; c < COLS_PER_THREAD; ++c) acc[m][c] = 0.f;
    }
    int r = 0;
    if constexpr (M <= 2) {
        // Few accumulators leave registers for 64 rows of loads in flight at once:
        // a block's run through its slice is a chain of load latencies, and this halves it.
        for (; r + 64 <= rows; r += 64, qrow += 2 * BITS) {
            uint32_t wa[BITS][COLS_PER_THREAD], wb[BITS][COLS_PER_THREAD];
#pragma unroll
            for (int i = 0; i < BITS; ++i) load_quad(wa[i], q + (size_t)(qrow + i) * stride4, true);
#pragma unroll
            for (int i = 0; i < BITS; ++i) load_quad(wb[i], q + (size_t)(qrow + BITS + i) * stride4, true);
            dot_rows<BITS, M, BITS, 32>(wa, xs + r, x_stride, acc, xsum);
            dot_rows<BITS, M, BITS, 32>(wb, xs + r + 32, x_stride, acc, xsum);
        }
    }
    // 32 rows of any width are exactly BITS words: issue all loads, then decode.
    for (; r + 32 <= rows; r += 32, qrow += BITS) {
        uint32_t w[BITS][COLS_PER_THREAD];
#pragma unroll
        for (int i = 0; i < BITS; ++i) load_quad(w[i], q + (size_t)(qrow + i) * stride4, true);
        dot_rows<BITS, M, BITS, 32>(w, xs + r, x_stride, acc, xsum);
    }
    using U = Unit<BITS>;
    for (; r < rows; r += U::rows, qrow += U::words) {
        uint32_t w[U::words][COLS_PER_THREAD];
#pragma unroll
        for (int i = 0; i < U::words; ++i) load_quad(w[i], q + (size_t)(qrow + i) * stride4, qrow + i < qrow_end);
        dot_rows<BITS, M, U::words, U::rows>(w, xs + r, x_stride, acc, xsum);
    }
    constexpr float two_b = float(1 << BITS);
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
        for (int c = 0; c < COLS_PER_THREAD; ++c) out[m][c] = two_b * (acc[m][c] - 1.5f * xsum[m]);
}

// The fp16 scale of four columns of group g, rounded as the format's reference rounds it.
__device__ __forceinline__ void group_scales(const int* q_scale, const __half* q_scale_max, int g, int n_pad, int col,
                                             float (&scale)[COLS_PER_THREAD]) {
    const uint32_t word = __ldg(reinterpret_cast<const uint32_t*>(q_scale) + (size_t)g * (n_pad / 8) + col / 8);
    const float max_over_256 = __half2float(__float2half(__half2float(q_scale_max[g]) / 256.f));
#pragma unroll
    for (int c = 0; c < COLS_PER_THREAD; ++c) {
        const float code = float((word >> (4 * ((col + c) & 7))) & 15u) + 1.f;
        scale[c] = __half2float(__float2half(code * code * max_over_256));
    }
}

// grid (column tiles, K slices); block: threads over columns, four each.
// Every slice adds its partial sums into `partial` (fp32, zero on entry) by
// atomics; the last block of a column tile to finish (counted in `done`) turns
// the sums into fp16 with the bias, and leaves `partial` and `done` zeroed.
template <int M>
__global__ void exl2_gemv_kernel(const __half* __restrict__ x, int x_rows, int k, const int* __restrict__ perm,
                                 const int4* __restrict__ q_weight, int packed_rows, int n_pad, int n,
                                 const int* __restrict__ q_scale, const __half* __restrict__ q_scale_max,
                                 const int4* __restrict__ groups, const int4* __restrict__ slices,
                                 float* __restrict__ partial, int* __restrict__ done, const __half* __restrict__ bias,
                                 __half* __restrict__ out) {
    extern __shared__ float xs[];
    __shared__ bool last;
    const int4 slice = slices[blockIdx.y];  // first group, end group, first row, rows
    const int g_first = slice.x, g_end = slice.y, row0 = slice.z, slice_rows = slice.w;
    // Rounded to 4 so every row's float4 read stays aligned (group starts are multiples of 4 rows).
    const int x_stride = ((slice_rows + 3) & ~3) + X_PAD_ROWS;

    for (int i = threadIdx.x; i < M * x_stride; i += blockDim.x) {
        const int m = i / x_stride, r = i - m * x_stride;
        float v = 0.f;
        if (m < x_rows && r < slice_rows) v = __half2float(x[(size_t)m * k + perm[row0 + r]]);
        xs[i] = v;
    }
    __syncthreads();

    const int col = (blockIdx.x * blockDim.x + threadIdx.x) * COLS_PER_THREAD;
    // Threads past the last column still take part in the barriers below.
    const bool active = col < n_pad;
    const int stride4 = n_pad / COLS_PER_THREAD;
    const int4* q = q_weight + col / COLS_PER_THREAD;

    float acc[M][COLS_PER_THREAD];
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
        for (int c = 0; c < COLS_PER_THREAD; ++c) acc[m][c] = 0.f;

    for (int g = g_first; active && g < g_end; ++g) {
        const int4 gi = groups[g];  // bits, first packed row, first row, rows
        const float* xg = xs + (gi.z - row0);
        float dot[M][COLS_PER_THREAD];
        switch (gi.x) {
            case 2: group_dot<2, M>(q, stride4, gi.y, packed_rows, gi.w, xg, x_stride, dot); break;
            case 3: group_dot<3, M>(q, stride4, gi.y, packed_rows, gi.w, xg, x_stride, dot); break;
            case 4: group_dot<4, M>(q, stride4, gi.y, packed_rows, gi.w, xg, x_stride, dot); break;
            case 5: group_dot<5, M>(q, stride4, gi.y, packed_rows, gi.w, xg, x_stride, dot); break;
            case 6: group_dot<6, M>(q, stride4, gi.y, packed_rows, gi.w, xg, x_stride, dot); break;
            default: group_dot<8, M>(q, stride4, gi.y, packed_rows, gi.w, xg, x_stride, dot); break;
        }
        float scale[COLS_PER_THREAD];
        group_scales(q_scale, q_scale_max, g, n_pad, col, scale);
#pragma unroll
        for (int m = 0; m < M; ++m)
#pragma unroll
            for (int c = 0; c < COLS_PER_THREAD; ++c) acc[m][c] = fmaf(scale[c], dot[m][c], acc[m][c]);
    }

    if (active) {
#pragma unroll
        for (int m = 0; m < M; ++m) {
            if (m >= x_rows) break;
#pragma unroll
            for (int c = 0; c < COLS_PER_THREAD; ++c)
                if (col + c < n) atomicAdd(partial + (size_t)m * n + col + c, acc[m][c]);
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
            for (int c = 0; c < COLS_PER_THREAD && col + c < n; ++c) {
                float* p = partial + (size_t)m * n + col + c;
                float v = __ldcg(p);
                *p = 0.f;
                if (bias) v += __half2float(bias[col + c]);
                out[(size_t)m * n + col + c] = __float2half(v);
            }
        }
    }
    if (threadIdx.x == 0) done[blockIdx.x] = 0;
}

// grid (column tiles, groups): each thread writes four columns of one group's rows, in act-order.
template <int BITS>
__device__ __forceinline__ void dequant_group(const int4* q, int stride4, int qrow, int qrow_end, int rows,
                                              const float (&scale)[COLS_PER_THREAD], __half* out, int n, int col) {
    using U = Unit<BITS>;
    constexpr float two_b = float(1 << BITS);
    for (int r = 0; r < rows; r += U::rows, qrow += U::words) {
        uint32_t w[U::words][COLS_PER_THREAD];
#pragma unroll
        for (int i = 0; i < U::words; ++i) load_quad(w[i], q + (size_t)(qrow + i) * stride4, qrow + i < qrow_end);
#pragma unroll
        for (int j = 0; j < U::rows; ++j) {
            if (r + j >= rows) break;
            __half vals[COLS_PER_THREAD];
#pragma unroll
            for (int c = 0; c < COLS_PER_THREAD; ++c) {
                uint32_t col_words[U::words];
#pragma unroll
                for (int i = 0; i < U::words; ++i) col_words[i] = w[i][c];
                // (f - 1.5) * 2^b is code - 2^(b-1), exactly; one rounding to fp16 as in the reference.
                const float f = code_as_unit_float<BITS>(col_words, j * BITS);
                vals[c] = __float2half((f - 1.5f) * two_b * scale[c]);
            }
            __half* dst = out + (size_t)(r + j) * n + col;
            if ((n & 3) == 0 && col + COLS_PER_THREAD <= n) {
                *reinterpret_cast<uint2*>(dst) = *reinterpret_cast<uint2*>(vals);
            } else {
                for (int c = 0; c < COLS_PER_THREAD && col + c < n; ++c) dst[c] = vals[c];
            }
        }
    }
}

__global__ void exl2_dequant_kernel(const int4* __restrict__ q_weight, int packed_rows, int n_pad, int n,
                                    const int* __restrict__ q_scale, const __half* __restrict__ q_scale_max,
                                    const int4* __restrict__ groups, __half* __restrict__ out) {
    const int col = (blockIdx.x * blockDim.x + threadIdx.x) * COLS_PER_THREAD;
    if (col >= n) return;
    const int g = blockIdx.y;
    const int4 gi = groups[g];
    float scale[COLS_PER_THREAD];
    group_scales(q_scale, q_scale_max, g, n_pad, col, scale);
    const int4* q = q_weight + col / COLS_PER_THREAD;
    const int stride4 = n_pad / COLS_PER_THREAD;
    __half* dst = out + (size_t)gi.z * n;
    switch (gi.x) {
        case 2: dequant_group<2>(q, stride4, gi.y, packed_rows, gi.w, scale, dst, n, col); break;
        case 3: dequant_group<3>(q, stride4, gi.y, packed_rows, gi.w, scale, dst, n, col); break;
        case 4: dequant_group<4>(q, stride4, gi.y, packed_rows, gi.w, scale, dst, n, col); break;
        case 5: dequant_group<5>(q, stride4, gi.y, packed_rows, gi.w, scale, dst, n, col); break;
        case 6: dequant_group<6>(q, stride4, gi.y, packed_rows, gi.w, scale, dst, n, col); break;
        default: dequant_group<8>(q, stride4, gi.y, packed_rows, gi.w, scale, dst, n, col); break;
    }
}

template <int M>
void launch_gemv(const Exl2Layer& layer, const __half* x, int x_rows, int k, int max_slice_rows, int slices,
                 int threads, float* partial, int* done, const __half* bias, __half* out, cudaStream_t stream) {
    const int tiles = (layer.n_pad / COLS_PER_THREAD + threads - 1) / threads;
    const dim3 grid(tiles, slices);
    const size_t smem = sizeof(float) * M * (((max_slice_rows + 3) & ~3) + X_PAD_ROWS);
    auto kernel = exl2_gemv_kernel<M>;
    if (smem > 48 * 1024) cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    kernel<<<grid, threads, smem, stream>>>(
        x, x_rows, k, layer.perm, reinterpret_cast<const int4*>(layer.q_weight), layer.packed_rows, layer.n_pad,
        layer.n, layer.q_scale, static_cast<const __half*>(layer.q_scale_max), reinterpret_cast<const int4*>(layer.groups),
        reinterpret_cast<const int4*>(layer.slices), partial, done, bias, out);
}

}  // namespace

int exl2_gemm_small_tiles(const Exl2Layer& layer, int threads) {
    return (layer.n_pad / COLS_PER_THREAD + threads - 1) / threads;
}

void exl2_gemm_small_launch(const Exl2Layer& layer, const void* x, int x_rows, int k, int max_slice_rows, int slices,
                            int threads, float* partial, const void* bias, void* out, cudaStream_t stream) {
    const __half* xh = static_cast<const __half*>(x);
    const __half* bh = static_cast<const __half*>(bias);
    // The column tiles' completion counts sit right after the sums, zero like them between launches.
    int* done = reinterpret_cast<int*>(partial + (size_t)x_rows * layer.n);
    // Up to 8 rows per pass keeps the accumulators in registers; more rows take more passes.
    for (int m0 = 0; m0 < x_rows; m0 += 8) {
        const int rows = std::min(8, x_rows - m0);
        const __half* xm = xh + (size_t)m0 * k;
        float* pm = partial + (size_t)m0 * layer.n;
        __half* om = static_cast<__half*>(out) + (size_t)m0 * layer.n;
        switch (rows) {
            case 1: launch_gemv<1>(layer, xm, rows, k, max_slice_rows, slices, threads, pm, done, bh, om, stream); break;
            case 2: launch_gemv<2>(layer, xm, rows, k, max_slice_rows, slices, threads, pm, done, bh, om, stream); break;
            case 3: case 4: launch_gemv<4>(layer, xm, rows, k, max_slice_rows, slices, threads, pm, done, bh, om, stream); break;
            default: launch_gemv<8>(layer, xm, rows, k, max_slice_rows, slices, threads, pm, done, bh, om, stream); break;
        }
    }
}

void exl2_dequant_launch(const Exl2Layer& layer, int groups, void* out, cudaStream_t stream) {
    const int threads = 128;
    const dim3 grid(((layer.n + COLS_PER_THREAD - 1) / COLS_PER_THREAD + threads - 1) / threads, groups);
    exl2_dequant_kernel<<<grid, threads, 0, stream>>>(
        reinterpret_cast<const int4*>(layer.q_weight), layer.packed_rows, layer.n_pad, layer.n, layer.q_scale,
        static_cast<const __half*>(layer.q_scale_max), reinterpret_cast<const int4*>(layer.groups), static_cast<__half*>(out));
}
