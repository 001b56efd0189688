// Where the decode step's elementwise pieces round to fp16, written once for every kernel that
// computes them: the torch twins (reference.py) round at these points, and a kernel that fuses
// a piece into another (the EXL2 product staging a norm's or SwiGLU's output) must round alike.
#pragma once
#include <cuda_fp16.h>

// exp2 without the fix-up for results below 2^-126 (__expf's ex2 takes three instructions more for them): here
// such a result is added to 1, so flushing it to zero changes nothing.
__device__ __forceinline__ float exp2_flushed(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// SwiGLU: fp16(silu(g)) first, as F.silu on an fp16 tensor returns it, then the fp16 product.
// The fast divide (2 ulp of fp32) rounds to the same fp16 but for rare ties; an IEEE divide is a
// dozen instructions more, which the EXL2 product pays for every input of every warp.
__device__ __forceinline__ float silu(float g) { return __fdividef(g, 1.f + exp2_flushed(-1.4426950408889634f * g)); }
__device__ __forceinline__ __half silu_times(float g, float u) {
    return __float2half(__half2float(__float2half(silu(g))) * u);
}
// Two of them: a product of two fp16 values is exact in fp32, so the fp16 multiply rounds it as
// silu_times does.
__device__ __forceinline__ __half2 silu_times2(__half2 g, __half2 u) {
    const float2 f = __half22float2(g);
    return __hmul2(__floats2half2_rn(silu(f.x), silu(f.y)), u);
}

// RMSNorm's output element: x normed in fp32 and stored in x's dtype, then times the weight.
__device__ __forceinline__ __half rms_normed(float x, float inverse_rms, float weight) {
    return __float2half(__half2float(__float2half(x * inverse_rms)) * weight);
}
// Two of them, the weight's multiply in fp16 (exact before its one rounding, as above).
__device__ __forceinline__ __half2 rms_normed2(__half2 x, float inverse_rms, __half2 weight) {
    const float2 f = __half22float2(x);
    return __hmul2(__floats2half2_rn(f.x * inverse_rms, f.y * inverse_rms), weight);
}

// The RMSNorm scale of a row from its sum of squares.
__device__ __forceinline__ float inverse_rms_of(float squares, int hidden, float eps) {
    return rsqrtf(squares / hidden + eps);
}

// The sum of two fp16 values as torch adds them: in fp32, rounded once.
__device__ __forceinline__ __half half_sum(float a, float b) { return __float2half(a + b); }

// Rotary embedding of one element: fp16(x * cos) + fp16(rotate_half(x) * sin), as fp32 (the
// caller rounds once more); `partner` is rotate_half's element (-x[d + dim/2] in the first half,
// x[d - dim/2] in the second).
__device__ __forceinline__ float rope_element(float own, float c, float partner, float s) {
    return __half2float(__float2half(own * c)) + __half2float(__float2half(partner * s));
}
