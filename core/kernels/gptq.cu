// GPTQ's row walk inside one block of at most 32 input rows, in one launch.
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

}  // namespace

void gptq_block_launch(const GptqBlock& g, int64_t first, int rows, int start, int stop, cudaStream_t stream) {
    const int threads = 128;
    const int64_t blocks = (g.columns + threads - 1) / threads;
    gptq_block_kernel<<<(unsigned)blocks, threads, 0, stream>>>(g, first, rows, start, stop);
}
