// What every EXL3 kernel computes alike: a state's codebook value, the bits each position adds,
// and the 16-bit window of a tile's ring (../shared/EXL3.md sections 2 and 3).
#pragma once
#include <cstdint>
#include <cuda_fp16.h>

#include "exl3.h"

// A state's value with the fp16 operations ExLlamaV3 uses, so that every bit agrees with the
// tables of core/formats/exl3/codebook.py: MUL1 is one fp16 fma of h = fp16(1024 + byte sum)
// (bits 0x6400 + sum, exact below 2048); 3INST and MCG add the two masked fp16 halves once.
template <int CODEBOOK>
__device__ __forceinline__ __half exl3_value(uint32_t state) {
    if constexpr (CODEBOOK == EXL3_CB_MUL1) {
        const uint32_t x = state * 0x83DCD12Du;
        const uint32_t byte_sum = __dp4a(x, 0x01010101u, 0u);
        const __half h = __ushort_as_half((unsigned short)(0x6400u + byte_sum));
        return __hfma(h, __ushort_as_half((unsigned short)0x1EEE), __ushort_as_half((unsigned short)0xC931));
    } else {
        uint32_t x = CODEBOOK == EXL3_CB_3INST ? state * 89226354u + 64248484u : state * 0xCBAC1FEDu;
        x = (x & 0x8FFF8FFFu) ^ 0x3B603B60u;
        return __hadd(__ushort_as_half((unsigned short)(x & 0xFFFFu)), __ushort_as_half((unsigned short)(x >> 16)));
    }
}

// Bits position p adds: K, or at half rates (bits_x2 odd) floor(K) plus one at odd p (0xAAAA >> p%16 & 1).
__device__ __forceinline__ int exl3_step_bits(int p, int bits_x2) { return (bits_x2 >> 1) + ((bits_x2 & 1) & p); }

// E(p), the ring bit after position p's window: the sum of step bits over 0..p.
__device__ __forceinline__ int exl3_window_end(int p, int bits_x2) {
    return (p + 1) * (bits_x2 >> 1) + ((bits_x2 & 1) ? (p + 1) >> 1 : 0);
}

// The 16 ring bits [end - 16, end), indices mod the ring's 32 * words32 bits, MSB-first: ring bit b is
// bit 31 - b % 32 of little-endian uint32 word b / 32 (the first bit is the state's most significant).
__device__ __forceinline__ uint32_t exl3_ring_window(const uint32_t* ring, int words32, int end) {
    int start = end - 16;
    if (start < 0) start += words32 * 32;
    const int word = start >> 5;
    const int next = word + 1 == words32 ? 0 : word + 1;
    const uint64_t both = ((uint64_t)ring[word] << 32) | ring[next];
    return (uint32_t)(both >> (48 - (start & 31))) & 0xFFFFu;
}

// Element of position p in its 16x16 tile (the mma.m16n8k16 B-fragment order): p = 8t + e.
__device__ __forceinline__ int exl3_position_row(int p) {
    const int t = p >> 3, e = p & 7;
    return 2 * (t & 3) + (e & 1) + 8 * ((e >> 1) & 1);
}
__device__ __forceinline__ int exl3_position_col(int p) { return (p >> 5) + 8 * ((p & 7) >> 2); }
