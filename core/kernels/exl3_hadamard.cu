// Block Hadamard over 128-wide blocks of the last dim, the rotation on both sides of an EXL3 product
// (../shared/EXL3.md section 4; reference: core/formats/exl3/hadamard.py, block_hadamard). One warp a
// block, 4 elements a lane: two butterfly stages in registers, five across lanes, all in fp32.
#include "exl3.h"
#include <cuda_fp16.h>

namespace {

// 1/sqrt(128): H128 is scaled on both sides, so the rotation is its own inverse.
constexpr float HAD128_SCALE = 0.08838834764831845f;

// Four consecutive inputs of a lane as fp32: fp16 ones times the fp16 input scale (an fp16 multiply, as
// ExLlamaV3's kernel does it), or fp32 ones as they are (a product's sums before rounding; no scale).
__device__ __forceinline__ void load4(const __half* x, size_t at, const __half* pre_scale, int col, float v[4]) {
    const uint2 raw = *reinterpret_cast<const uint2*>(x + at);
    __half2 lo = *reinterpret_cast<const __half2*>(&raw.x), hi = *reinterpret_cast<const __half2*>(&raw.y);
    if (pre_scale != nullptr) {
        const uint2 s = *reinterpret_cast<const uint2*>(pre_scale + col);
        lo = __hmul2(lo, *reinterpret_cast<const __half2*>(&s.x));
        hi = __hmul2(hi, *reinterpret_cast<const __half2*>(&s.y));
    }
    const float2 a = __half22float2(lo), b = __half22float2(hi);
    v[0] = a.x, v[1] = a.y, v[2] = b.x, v[3] = b.y;
}
__device__ __forceinline__ void load4(const float* x, size_t at, const __half*, int, float v[4]) {
    const float4 raw = *reinterpret_cast<const float4*>(x + at);
    v[0] = raw.x, v[1] = raw.y, v[2] = raw.z, v[3] = raw.w;
}

template <typename Input>
__global__ void __launch_bounds__(256) exl3_hadamard_kernel(const Input* x, int blocks, const __half* pre_scale,
                                                            const __half* post_scale, int dim, __half* out) {
    const int lane = threadIdx.x & 31;
    const int block = blockIdx.x * 8 + (threadIdx.x >> 5);
    if (block >= blocks) return;
    const size_t at = (size_t)block * 128 + lane * 4;
    const int col = (int)(at % (size_t)dim);
    float x4[4];
    load4(x, at, pre_scale, col, x4);
    float v[4] = {x4[0] + x4[1], x4[0] - x4[1], x4[2] + x4[3], x4[2] - x4[3]};
    float u[4] = {v[0] + v[2], v[1] + v[3], v[0] - v[2], v[1] - v[3]};
#pragma unroll
    for (int mask = 1; mask < 32; mask <<= 1) {
        const bool upper = lane & mask;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const float other = __shfl_xor_sync(0xFFFFFFFFu, u[i], mask);
            u[i] = upper ? other - u[i] : u[i] + other;
        }
    }
    __half2 lo = __floats2half2_rn(u[0] * HAD128_SCALE, u[1] * HAD128_SCALE);
    __half2 hi = __floats2half2_rn(u[2] * HAD128_SCALE, u[3] * HAD128_SCALE);
    if (post_scale != nullptr) {
        const uint2 s = *reinterpret_cast<const uint2*>(post_scale + col);
        lo = __hmul2(lo, *reinterpret_cast<const __half2*>(&s.x));
        hi = __hmul2(hi, *reinterpret_cast<const __half2*>(&s.y));
    }
    uint2 raw;
    raw.x = *reinterpret_cast<uint32_t*>(&lo);
    raw.y = *reinterpret_cast<uint32_t*>(&hi);
    *reinterpret_cast<uint2*>(out + at) = raw;
}

}  // namespace

void exl3_hadamard_launch(const void* x, bool x_fp32, int rows, int dim, const void* pre_scale, const void* post_scale,
                          void* out, cudaStream_t stream) {
    const int blocks = rows * (dim / 128);
    if (blocks == 0) return;
    const __half* pre = static_cast<const __half*>(pre_scale);
    const __half* post = static_cast<const __half*>(post_scale);
    if (x_fp32)
        exl3_hadamard_kernel<float><<<(blocks + 7) / 8, 256, 0, stream>>>(static_cast<const float*>(x), blocks, nullptr,
                                                                          post, dim, static_cast<__half*>(out));
    else
        exl3_hadamard_kernel<__half><<<(blocks + 7) / 8, 256, 0, stream>>>(static_cast<const __half*>(x), blocks, pre,
                                                                           post, dim, static_cast<__half*>(out));
}
