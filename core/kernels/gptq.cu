// GPTQ's row walk inside one block of at most 32 input rows, in one launch;
// and the scale search of a group start in four.
//
// The torch reference (_walk in core/convert/gptq.py) takes about eight small
// ops per input row; on a GPU that is launch overhead, not arithmetic, and it
// dominated conversion time. Inside a block every output column (of every
// setting being quantized at once) is independent: a row's rounding error only
// moves the later rows of the same column. So one thread owns one column, keeps
// the block's rows in registers and walks them in order, doing the reference's
// arithmetic per element.

#include "gptq.h"

#include <cuda_fp16.h>
#include <math_constants.h>

namespace {

constexpr int BLOCK_ROWS = 32;  // = _BLOCK_ROWS in gptq.py

// Relative rows [s0, s1) are quantized; relative rows below n receive their errors.
__global__ void gptq_block_kernel(GptqBlock g, int64_t first, int n, int s0, int s1) {
    const int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= g.columns) return;
    const int64_t setting = c / g.out_features;
    float w[BLOCK_ROWS];
#pragma unroll
    for (int r = 0; r < BLOCK_ROWS; r++) w[r] = (r >= s0 && r < n) ? g.work[(first + r) * g.columns + c] : 0.0f;
    const float scale = g.scales[c], divisor = g.safe[c];
#pragma unroll
    for (int i = 0; i < BLOCK_ROWS; i++) {
        if (i < s0 || i >= s1) continue;
        const int64_t row = first + i;
        const float x = w[i];
        // Division, not a reciprocal product: a zero scale's divisor is inf (code 0),
        // and the reference divides. rintf rounds half to even, as torch.round.
        float step = rintf(__fdiv_rn(x, divisor));
        step = fminf(fmaxf(step, g.low[row * g.settings + setting]), g.high[row * g.settings + setting]);
        const float decoded = __half2float(__float2half_rn(step * scale));
        const float error = __fdiv_rn(x - decoded, g.factor[row * g.in_features + row]);
        g.steps[row * g.columns + c] = step;
        g.errors[(int64_t)i * g.columns + c] = error;
        const float* factor_row = g.factor + row * g.in_features + first;
#pragma unroll
        for (int j = i + 1; j < BLOCK_ROWS; j++)
            if (j < n) w[j] -= factor_row[j] * error;
    }
#pragma unroll
    for (int r = 0; r < BLOCK_ROWS; r++)
        if (r >= s1 && r < n) g.work[(first + r) * g.columns + c] = w[r];
}


// The scale search (_choose_scales in core/convert/gptq.py): each column's
// 4-bit scale code from its largest weight, then one stretch of the group's
// maximum scale from a 97-point grid, chosen by the smallest sum of |error|^3.5
// over the group: every 8th point first, then the 14 around the best of those.
// From Python this was about forty small ops per group start, thousands of
// times per matrix. The arithmetic is the reference's element by element (fp16
// roundings, true division, half-to-even rounding, no fused multiply-add where
// the reference rounds a product); sums run in float32 over a column's rows and
// in float64 over columns, as there, in a fixed order, so reruns (a resumed
// conversion) choose the same scales.
constexpr int COARSE = (GPTQ_SEARCH_GRID + GPTQ_SEARCH_STEP - 1) / GPTQ_SEARCH_STEP;
constexpr int NEAR = 2 * (GPTQ_SEARCH_STEP - 1);
constexpr int SLOTS = COARSE + NEAR;
static_assert(SLOTS == gptq_scale_search_slots(), "slot count");
constexpr int WARPS = GPTQ_SEARCH_THREADS / 32;
constexpr float FP16_MAX = 65504.f;

__device__ __forceinline__ float fp16_round(float x) { return __half2float(__float2half_rn(x)); }

__device__ __forceinline__ const float* group_column(const GptqScaleSearch& s, int g, int64_t c) {
    return s.work + (s.first_row * s.settings_total + s.settings[g]) * s.out_features + c;
}

// base = (max |w| + 1e-12) / (maxq / 2) of each column, and the largest of each chunk of columns.
__global__ void scale_base_kernel(GptqScaleSearch s) {
    __shared__ float warp_max[WARPS];
    const int g = blockIdx.y;
    const int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    float b = 0.f;
    if (c < s.out_features) {
        const float* w = group_column(s, g, c);
        const int64_t stride = s.settings_total * s.out_features;
        float m = 0.f;
        for (int r = 0; r < s.rows; ++r) m = fmaxf(m, fabsf(w[r * stride]));
        b = __fdiv_rn(__fadd_rn(m, 1e-12f), s.maxq[g] / 2.f);
        s.base[(int64_t)g * s.out_features + c] = b;
    }
    for (int o = 16; o; o >>= 1) b = fmaxf(b, __shfl_down_sync(0xffffffffu, b, o));
    if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x >> 5] = b;
    __syncthreads();
    if (threadIdx.x == 0) {
        float v = warp_max[0];
        for (int i = 1; i < WARPS; ++i) v = fmaxf(v, warp_max[i]);
        s.chunk_max[(int64_t)g * gridDim.x + blockIdx.x] = v;
    }
}

__device__ __forceinline__ float group_base_max(const GptqScaleSearch& s, int g, int chunks) {
    float v = 0.f;
    for (int i = 0; i < chunks; ++i) v = fmaxf(v, s.chunk_max[(int64_t)g * chunks + i]);
    return v;
}

// Sum over chunks, in chunk order, of one slot's error.
__device__ __forceinline__ double slot_error(const double* partial, int chunks, int slot) {
    double e = 0.0;
    for (int i = 0; i < chunks; ++i) e += partial[(int64_t)i * SLOTS + slot];
    return e;
}

// The grid index of the best coarse point (the first of equals, as torch.argmin).
__device__ int coarse_centre(const double* partial, int chunks) {
    double best = CUDART_INF;
    int centre = 0;
    for (int j = 0; j < COARSE; ++j) {
        const double e = slot_error(partial, chunks, j);
        if (e < best) best = e, centre = j * GPTQ_SEARCH_STEP;
    }
    return centre;
}

__device__ __forceinline__ int near_index(int centre, int j) {
    const int offset = j < GPTQ_SEARCH_STEP - 1 ? j - (GPTQ_SEARCH_STEP - 1) : j - (GPTQ_SEARCH_STEP - 2);
    return min(max(centre + offset, 0), GPTQ_SEARCH_GRID - 1);
}

__device__ __forceinline__ float column_code(const GptqScaleSearch& s, int g, int64_t c, float base_max) {
    const float fraction = __fmul_rn(sqrtf(__fdiv_rn(s.base[(int64_t)g * s.out_features + c], base_max)), 16.f);
    return fminf(fmaxf(rintf(fraction), 1.f), 16.f) - 1.f;
}

// The scale the loader decodes from a code and the grid point t: fp16 (code + 1)^2 * fp16(max / 256).
__device__ __forceinline__ float grid_scale(const GptqScaleSearch& s, float code, float base_max, int t) {
    const float scale_max = fp16_round(fminf(__fmul_rn(base_max, s.stretch[t]), FP16_MAX));
    return fp16_round(__fmul_rn((code + 1.f) * (code + 1.f), fp16_round(scale_max / 256.f)));
}

// PHASE 0 sums the coarse points' errors, PHASE 1 those around the best of them.
template <int PHASE>
__global__ void scale_search_kernel(GptqScaleSearch s) {
    constexpr int N = PHASE == 0 ? COARSE : NEAR;
    __shared__ double warp_sums[WARPS][N];
    const int g = blockIdx.y, chunks = gridDim.x;
    const int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    double* partial = s.partial + (int64_t)g * chunks * SLOTS;
    const float base_max = group_base_max(s, g, chunks);
    const int centre = PHASE == 1 ? coarse_centre(partial, chunks) : 0;
    const float maxq = s.maxq[g], zero = (maxq + 1.f) / 2.f, low = -zero, high = maxq - zero;
    float sums[N];
#pragma unroll
    for (int j = 0; j < N; ++j) sums[j] = 0.f;
    if (c < s.out_features) {
        const float code = column_code(s, g, c, base_max);
        float scale[N], divisor[N];
#pragma unroll
        for (int j = 0; j < N; ++j) {
            const int t = PHASE == 0 ? j * GPTQ_SEARCH_STEP : near_index(centre, j);
            scale[j] = grid_scale(s, code, base_max, t);
            divisor[j] = scale[j] > 0.f ? scale[j] : 1.f;
        }
        const float* w = group_column(s, g, c);
        const int64_t stride = s.settings_total * s.out_features;
        for (int r = 0; r < s.rows; ++r) {
            const float x = w[r * stride];
#pragma unroll
            for (int j = 0; j < N; ++j) {
                const float step = fminf(fmaxf(rintf(__fdiv_rn(x, divisor[j])), low), high);
                const float e = fabsf(__fsub_rn(__fmul_rn(step, scale[j]), x));
                sums[j] = __fadd_rn(sums[j], __fmul_rn(__fmul_rn(__fmul_rn(e, e), e), sqrtf(e)));
            }
        }
    }
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
    for (int j = 0; j < N; ++j) {
        double v = sums[j];
        for (int o = 16; o; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
        if (lane == 0) warp_sums[warp][j] = v;
    }
    __syncthreads();
    if (threadIdx.x < N) {
        double v = 0.0;
        for (int i = 0; i < WARPS; ++i) v += warp_sums[i][threadIdx.x];
        partial[(int64_t)blockIdx.x * SLOTS + (PHASE == 0 ? 0 : COARSE) + threadIdx.x] = v;
    }
}

// The best grid point of every group, and its codes and scales written where the row walk reads them.
__global__ void scale_choose_kernel(GptqScaleSearch s) {
    __shared__ double errors[GPTQ_SEARCH_GRID];
    __shared__ int best_shared;
    const int g = blockIdx.y, chunks = gridDim.x;
    const double* partial = s.partial + (int64_t)g * chunks * SLOTS;
    if (threadIdx.x == 0) {
        for (int t = 0; t < GPTQ_SEARCH_GRID; ++t) errors[t] = CUDART_INF;
        for (int j = 0; j < COARSE; ++j) errors[j * GPTQ_SEARCH_STEP] = slot_error(partial, chunks, j);
        const int centre = coarse_centre(partial, chunks);
        // A clamped neighbour repeats a point already measured, with the same sum.
        for (int j = 0; j < NEAR; ++j) errors[near_index(centre, j)] = slot_error(partial, chunks, COARSE + j);
        int best = 0;
        for (int t = 1; t < GPTQ_SEARCH_GRID; ++t)
            if (errors[t] < errors[best]) best = t;
        best_shared = best;
    }
    __syncthreads();
    const int best = best_shared;
    const float base_max = group_base_max(s, g, chunks);
    const int64_t slot = s.slots[g], setting = s.settings[g];
    if (blockIdx.x == 0 && threadIdx.x == 0)
        static_cast<__half*>(s.scale_maxes)[slot] = __float2half_rn(fminf(__fmul_rn(base_max, s.stretch[best]), FP16_MAX));
    const int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= s.out_features) return;
    const float code = column_code(s, g, c, base_max);
    const float scale = grid_scale(s, code, base_max, best);
    s.scale_codes[slot * s.out_features + c] = (uint8_t)code;
    s.scales[setting * s.out_features + c] = scale;
    s.safe[setting * s.out_features + c] = scale > 0.f ? scale : CUDART_INF_F;
    if (s.slot_scales) s.slot_scales[slot * s.out_features + c] = scale;
}

}  // namespace

void gptq_block_launch(const GptqBlock& g, int64_t first, int rows, int start, int stop, cudaStream_t stream) {
    const int threads = 128;
    const int64_t blocks = (g.columns + threads - 1) / threads;
    gptq_block_kernel<<<(unsigned)blocks, threads, 0, stream>>>(g, first, rows, start, stop);
}

int gptq_scale_search_chunks(int64_t out_features) {
    return (int)((out_features + GPTQ_SEARCH_THREADS - 1) / GPTQ_SEARCH_THREADS);
}

void gptq_scale_search_launch(const GptqScaleSearch& s, cudaStream_t stream) {
    const dim3 grid(gptq_scale_search_chunks(s.out_features), s.k);
    scale_base_kernel<<<grid, GPTQ_SEARCH_THREADS, 0, stream>>>(s);
    scale_search_kernel<0><<<grid, GPTQ_SEARCH_THREADS, 0, stream>>>(s);
    scale_search_kernel<1><<<grid, GPTQ_SEARCH_THREADS, 0, stream>>>(s);
    scale_choose_kernel<<<grid, GPTQ_SEARCH_THREADS, 0, stream>>>(s);
}
