// EXL2 kernels: a small-batch product (1 to 16 input rows) that reads the
// packed mixed-bit weights directly, and a dequantizer for large batches.
//
// Layout (see core/formats/exl2/layout.py): q_weight is int32 [packed_rows, n_pad];
// each column is one little-endian bit stream per group, so a run of 32 rows of
// a b-bit group is exactly b words of that column, and codes of 3, 5 and 6 bits
// straddle words. Rows are in act-order.
//
// The small-batch kernel works on "units" of 32 rows of one group (b words per
// column) and "quads" of four units of one width, which core/formats/exl2/kernel.py
// lists once per layer. A warp takes 32 columns of one quad: thread (g, t) loads
// the b words of unit t for columns 4g..4g+3 (16-byte loads, 128 contiguous
// bytes per unit and word across the warp), turns them into fp16 weights two at
// a time and multiplies them on the tensor cores (mma m16n8k16, fp32 sums), the
// inputs of the batch as the mma's 8 (or 16) columns. A reduction may visit its
// terms in any order, so the mma's k index of every weight is whatever makes the
// decoding cheap; the kernel reads its inputs in that same "slot order" (a
// table made on the host, `xperm`), written so by the kernel before it (the
// graph decoder's attention, norms and SwiGLU, or the product before, which
// then leaves the norm or SwiGLU for this one to finish while staging; exl2.h)
// or by a torch gather: a warp's quads' inputs are a few contiguous 256-byte runs. Gathering them from x in
// every block instead was slower (python3 -m bench.speed's kernel table before 0f62cdf removed that
// gather; bench/history/KERNEL_NOTES.md v7).

#include "exl2.h"
#include "launch.h"
#include "rounding.h"

#include <cuda_fp16.h>
#include <algorithm>
#include <cstdint>

namespace {

constexpr int COLS_PER_THREAD = 4;  // one 16-byte load covers four columns of a packed row
constexpr int WARP_COLS = 32;       // 8 thread groups of 4 columns
constexpr int QUAD_SLOTS = 128;     // staged inputs per quad: 4 units of 32 rows

// ---- Two codes into one half2 without a conversion -------------------------
//
// A code c placed in the mantissa of the fp16 number 1024 (0x6400), s bits up,
// reads as 1024 + c * 2^s exactly while s + bits <= 10. One LOP3 masks two
// codes of a 32-bit window of the bit stream and sets both exponents, one
// HFMA2 turns 1024 + c * 2^s into c - 2^(bits-1) (exact: small integers), one
// HMUL2 applies the group scale with a single fp16 rounding, as the reference
// dequantizer rounds. Pair j of a 32-code unit joins codes p and p + d; d is
// the distance at which both codes fit one window's two halves at this width
// (the host's pair rule in core/formats/exl2/kernel.py must agree).

__host__ __device__ constexpr int pair_distance(int bits) { return bits == 2 ? 8 : (bits == 6 || bits == 8) ? 2 : 4; }
__host__ __device__ constexpr int pair_low(int bits, int j) {
    return 2 * pair_distance(bits) * (j / pair_distance(bits)) + j % pair_distance(bits);
}
__host__ __device__ constexpr int pair_high(int bits, int j) { return pair_low(bits, j) + pair_distance(bits); }

// A window starting at stream bit `o` serves pair j if both codes land in the low 10 bits of their half.
__host__ __device__ constexpr bool window_serves(int bits, int j, int o) {
    return pair_low(bits, j) * bits - o >= 0 && pair_low(bits, j) * bits - o <= 10 - bits &&
           pair_high(bits, j) * bits - o - 16 >= 0 && pair_high(bits, j) * bits - o - 16 <= 10 - bits;
}
// The latest start that still holds both codes of pair j, leaving room for the pairs after it.
__host__ __device__ constexpr int own_window(int bits, int j) {
    return pair_low(bits, j) * bits < pair_high(bits, j) * bits - 16 ? pair_low(bits, j) * bits
                                                                      : pair_high(bits, j) * bits - 16;
}
// Reuse the previous pair's window where it serves: fewer shifts on the integer pipe.
__host__ __device__ constexpr int pair_window(int bits, int j) {
    return j == 0 ? own_window(bits, 0)
                  : (window_serves(bits, j, pair_window(bits, j - 1)) ? pair_window(bits, j - 1) : own_window(bits, j));
}

__host__ __device__ constexpr bool pair_rule_holds(int bits) {
    for (int j = 0; j < 16; ++j)
        if (!window_serves(bits, j, pair_window(bits, j))) return false;
    // Every code of the unit in exactly one pair.
    for (int code = 0; code < 32; ++code) {
        int seen = 0;
        for (int j = 0; j < 16; ++j) seen += (pair_low(bits, j) == code) + (pair_high(bits, j) == code);
        if (seen != 1) return false;
    }
    return true;
}
static_assert(pair_rule_holds(2) && pair_rule_holds(3) && pair_rule_holds(4) && pair_rule_holds(5) &&
              pair_rule_holds(6) && pair_rule_holds(8), "every pair of every width decodes from one window");

// fp16 bit patterns of 2^-s and of -n (|n| < 2048, so exact).
__host__ __device__ constexpr uint32_t half_pow2_neg(int s) { return uint32_t(15 - s) << 10; }
__host__ __device__ constexpr uint32_t half_neg_int(int n) {
    int e = 0;
    while ((n >> e) >= 2) ++e;
    return 0x8000u | uint32_t(e + 15) << 10 | ((uint32_t(n) << (10 - e)) & 0x3FFu);
}

__device__ __forceinline__ __half2 as_half2(uint32_t bits) {
    __half2 h;
    static_assert(sizeof(h) == 4, "half2 is one word");
    memcpy(&h, &bits, 4);
    return h;
}
__device__ __forceinline__ uint32_t as_u32(__half2 h) {
    uint32_t bits;
    memcpy(&bits, &h, 4);
    return bits;
}

// (v & mask) | 0x64006400 in one LOP3: with both constants as immediates the compiler splits it in two.
template <uint32_t MASK>
__device__ __forceinline__ uint32_t mask_and_bias(uint32_t v) {
    uint32_t out;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(out) : "r"(v), "n"(MASK), "r"(0x64006400u));
    return out;
}

// Bits [O, O + 32) of a unit's stream (B words); bits outside the stream read as zero.
template <int B, int O>
__device__ __forceinline__ uint32_t window(const uint32_t (&w)[B]) {
    if constexpr (O < 0) {
        return w[0] << (-O);
    } else if constexpr (O % 32 == 0) {
        return w[O / 32];
    } else if constexpr (O / 32 + 1 < B) {
        return __funnelshift_r(w[O / 32], w[O / 32 + 1], O % 32);
    } else {
        return w[O / 32] >> (O % 32);
    }
}

// Pair J of one column's unit as two fp16 weights (low half: the pair's first code): code - 2^(B-1),
// times the column's scale where SCALED (rounded once, as the reference rounds), else left as the
// exact small integer for a scale applied to the quad's fp32 sums.
template <int B, int J, bool SCALED>
__device__ __forceinline__ uint32_t weight_pair(const uint32_t (&w)[B], __half2 scale) {
    constexpr int o = pair_window(B, J);
    constexpr int s_lo = pair_low(B, J) * B - o, s_hi = pair_high(B, J) * B - o - 16;
    constexpr uint32_t field = (1u << B) - 1;
    constexpr uint32_t mask = field << s_lo | field << (16 + s_hi);
    constexpr uint32_t unit_scale = half_pow2_neg(s_lo) | half_pow2_neg(s_hi) << 16;
    constexpr int zero = 1 << (B - 1);
    constexpr uint32_t offset = half_neg_int((1024 >> s_lo) + zero) | half_neg_int((1024 >> s_hi) + zero) << 16;
    const uint32_t biased = mask_and_bias<mask>(window<B, o>(w));
    const __half2 centered = __hfma2(as_half2(biased), as_half2(unit_scale), as_half2(offset));
    if constexpr (SCALED) return as_u32(__hmul2(centered, scale));
    return as_u32(centered);
}

// d += A (16x16, fp16) * B (16x8, fp16) in fp32.
__device__ __forceinline__ void mma_16x8x16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#elif defined(__CUDA_ARCH__)
    // Turing has the k8 shape only: the two halves of k one after the other.
    asm("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(b0));
    asm("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[2]), "r"(a[3]), "r"(b1));
#endif
}

// One k step (pairs 2S and 2S+1 of each of the thread's four columns) into both 16-column mma tiles.
// A fragment of tile mt: rows g and g + 8 are columns 2mt and 2mt+1 of the thread's four;
// k slots (2t, 2t+1) hold pair 2S, (2t+8, 2t+9) pair 2S+1; B holds the inputs of the same codes.
template <int B, int S, int NT, bool SCALED>
__device__ __forceinline__ void k_step(const uint32_t (&w)[COLS_PER_THREAD][B], const __half2 (&scale)[COLS_PER_THREAD],
                                       const uint32_t (&b)[NT][2], float (&acc)[NT][2][4]) {
    uint32_t first[COLS_PER_THREAD], second[COLS_PER_THREAD];
#pragma unroll
    for (int c = 0; c < COLS_PER_THREAD; ++c) {
        first[c] = weight_pair<B, 2 * S, SCALED>(w[c], scale[c]);
        second[c] = weight_pair<B, 2 * S + 1, SCALED>(w[c], scale[c]);
    }
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
        const uint32_t a[4] = {first[2 * mt], first[2 * mt + 1], second[2 * mt], second[2 * mt + 1]};
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) mma_16x8x16(acc[nt][mt], a, b[nt][0], b[nt][1]);
    }
}

// Two k steps: one 16-byte read of staged inputs per batch tile covers both.
template <int B, int S2, int NT, bool SCALED>
__device__ __forceinline__ void k_step_pair(const uint32_t (&w)[COLS_PER_THREAD][B],
                                            const __half2 (&scale)[COLS_PER_THREAD], const __half* xq, int x_stride,
                                            int g, int x_rows, float (&acc)[NT][2][4]) {
    uint32_t b0[NT][2], b1[NT][2];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
        uint4 v = make_uint4(0, 0, 0, 0);
        if (g + 8 * nt < x_rows) v = *reinterpret_cast<const uint4*>(xq + (g + 8 * nt) * x_stride + S2 * 32);
        b0[nt][0] = v.x; b0[nt][1] = v.y; b1[nt][0] = v.z; b1[nt][1] = v.w;
    }
    k_step<B, 2 * S2, NT, SCALED>(w, scale, b0, acc);
    k_step<B, 2 * S2 + 1, NT, SCALED>(w, scale, b1, acc);
}

// A unit's words (B of them, 4 columns each) and its group's scales, as loaded: nothing here is
// computed from a load, so loading the next quad never waits for its bytes (a shift of the scale
// word right after its load stalled every lookahead for a memory round trip: ncu's stall samples of
// 4096x11008 at 4 bits, bench/history/KERNEL_NOTES.md v5).
template <int B>
struct UnitWords {
    uint4 words[B];
    uint32_t scale_word;  // eight columns' 4-bit scale codes, the thread's four in one half (column_scales)
    __half scale_max;     // the group's q_scale_max
};

// Where a thread's words and scales are: its four columns' first word and scale word, the strides
// between packed rows and between groups, all unsigned so that an address is one multiply-add.
struct WeightSource {
    const uint4* q;          // q_weight at packed row 0, the thread's four columns
    const uint32_t* scales;  // q_scale at group 0, the word holding the thread's columns
    const __half* scale_max;
    unsigned stride4, scale_stride;
    int packed_rows;
};

// Unit table entry: bits, first packed row (-1: padding), group, 1 if the quad's four units share one group.
// `width` words are loaded (the entry's own width where B is only the most there can be).
template <int B>
__device__ __forceinline__ void load_words(UnitWords<B>& u, int4 info, const WeightSource& src, int width = B) {
    const uint4* word = src.q + (size_t)(unsigned)max(info.y, 0) * src.stride4;
#pragma unroll
    for (int i = 0; i < B; ++i) {
        u.words[i] = make_uint4(0, 0, 0, 0);
        // A last group that ends mid-unit stops at the matrix's end; the inputs past its rows are zero.
        if (i < width && info.y >= 0 && info.y + i < src.packed_rows) u.words[i] = __ldg(word + i * src.stride4);
    }
    u.scale_word = __ldg(src.scales + (size_t)(unsigned)info.z * src.scale_stride);
    u.scale_max = __ldg(src.scale_max + info.z);
}

// The thread's four columns' scales from their 4-bit codes (the thread's half of the scale word, which
// `selector` picks), two columns an instruction: (code + 1)^2 * fp16(q_scale_max / 256) rounded once to
// fp16, as the reference rounds it (each fp16 product is exact before its one rounding). The codes land
// in fp16 mantissas as the weights' do; `even` holds columns 0 and 2, `odd` columns 1 and 3.
__device__ __forceinline__ void column_scales(uint32_t scale_word, uint32_t selector, __half scale_max, __half2& even,
                                              __half2& odd) {
    const uint32_t spread = __byte_perm(scale_word, 0, selector);  // columns 0, 1 in byte 0; 2, 3 in byte 2
    const __half2 low = as_half2(mask_and_bias<0x000F000Fu>(spread));   // 1024 + code
    const __half2 high = as_half2(mask_and_bias<0x00F000F0u>(spread));  // 1024 + 16 code
    constexpr uint32_t minus_1023 = half_neg_int(1023) * 0x10001u, minus_63 = half_neg_int(63) * 0x10001u;
    const __half2 e = __hadd2(low, as_half2(minus_1023));
    const __half2 o = __hfma2(high, as_half2(half_pow2_neg(4) * 0x10001u), as_half2(minus_63));
    const __half2 max_over_256 = __hmul2(__half2half2(scale_max), as_half2(half_pow2_neg(8) * 0x10001u));
    even = __hmul2(__hmul2(e, e), max_over_256);
    odd = __hmul2(__hmul2(o, o), max_over_256);
}

// column_scales' selector for columns col..col + 3 (col a multiple of 4): the half of the word that holds them.
__device__ __forceinline__ uint32_t scale_selector(int col) { return col & 4 ? 0x4342u : 0x4140u; }

// column_scales' four scales as fp32, columns in order.
__device__ __forceinline__ void scales_in_order(__half2 even, __half2 odd, float (&scale)[COLS_PER_THREAD]) {
    scale[0] = __low2float(even);
    scale[1] = __low2float(odd);
    scale[2] = __high2float(even);
    scale[3] = __high2float(odd);
}

// `selector`: the __byte_perm that spreads the thread's four columns' scale codes (column_scales).
template <int B, int NT>
__device__ __forceinline__ void quad_product(const UnitWords<B>& u, bool one_group, uint32_t selector, const __half* xq,
                                             int x_stride, int g, int x_rows, float (&acc)[NT][2][4]) {
    uint32_t w[COLS_PER_THREAD][B];
#pragma unroll
    for (int i = 0; i < B; ++i) {
        w[0][i] = u.words[i].x; w[1][i] = u.words[i].y; w[2][i] = u.words[i].z; w[3][i] = u.words[i].w;
    }
    __half2 even, odd;
    column_scales(u.scale_word, selector, u.scale_max, even, odd);
    if (one_group) {
        // All k of the mma share each column's scale: multiply the quad's fp32 sums once
        // instead of every weight (one HMUL2 per pair saved; the weights skip their fp16 rounding).
        float scale[COLS_PER_THREAD];
        scales_in_order(even, odd, scale);
        float part[NT][2][4] = {};
        const __half2 unused[COLS_PER_THREAD] = {};
        k_step_pair<B, 0, NT, false>(w, unused, xq, x_stride, g, x_rows, part);
        k_step_pair<B, 1, NT, false>(w, unused, xq, x_stride, g, x_rows, part);
        k_step_pair<B, 2, NT, false>(w, unused, xq, x_stride, g, x_rows, part);
        k_step_pair<B, 3, NT, false>(w, unused, xq, x_stride, g, x_rows, part);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int mt = 0; mt < 2; ++mt)
#pragma unroll
                for (int i = 0; i < 4; ++i) acc[nt][mt][i] = fmaf(scale[2 * mt + i / 2], part[nt][mt][i], acc[nt][mt][i]);
    } else {
        const __half2 scale2[COLS_PER_THREAD] = {__low2half2(even), __low2half2(odd), __high2half2(even),
                                                 __high2half2(odd)};
        k_step_pair<B, 0, NT, true>(w, scale2, xq, x_stride, g, x_rows, acc);
        k_step_pair<B, 1, NT, true>(w, scale2, xq, x_stride, g, x_rows, acc);
        k_step_pair<B, 2, NT, true>(w, scale2, xq, x_stride, g, x_rows, acc);
        k_step_pair<B, 3, NT, true>(w, scale2, xq, x_stride, g, x_rows, acc);
    }
}

// Eight staged inputs (16 bytes) made from what the previous kernel left, two at a time from two
// fp16 vectors: f(gate, up) for SwiGLU, f(x, weight) for RMSNorm.
template <typename F>
__device__ __forceinline__ uint4 elementwise8(uint4 a, uint4 b, F f) {
    const __half2* ha = reinterpret_cast<const __half2*>(&a);
    const __half2* hb = reinterpret_cast<const __half2*>(&b);
    uint4 out;
    __half2* o = reinterpret_cast<__half2*>(&out);
#pragma unroll
    for (int e = 0; e < 4; ++e) o[e] = f(ha[e], hb[e]);
    return out;
}

// Where a warp's walk through its quads stands: its i-th quad (of the warp's own, in order) and
// that quad's table entry.
struct Walk {
    int i;
    int4 info;
};

// The warp's consecutive quads of width B from walk.i: up to 4 bits the next quad's words are
// requested before this one is decoded (two quads of words fit the registers), wider ones one
// at a time. The walk's first quad takes the words loaded before the kernel's wait (`first`,
// loaded for any width) where `have_first`. Returns at the first quad of another width, its
// words not yet loaded.
template <int B, int NT>
__device__ __forceinline__ Walk walk_width(Walk walk, bool have_first, const UnitWords<8>& first, int my_quads,
                                           const int4* units_w, int t, const WeightSource& src, uint32_t selector,
                                           const __half* xs, int x_stride, int g, int x_rows,
                                           float (&acc)[NT][2][4]) {
    constexpr bool AHEAD = B <= 4;
    UnitWords<B> cur;
    if (have_first) {
#pragma unroll
        for (int i = 0; i < B; ++i) cur.words[i] = first.words[i];
        cur.scale_word = first.scale_word;
        cur.scale_max = first.scale_max;
    } else {
        load_words<B>(cur, walk.info, src);
    }
    for (;;) {
        const int next = walk.i + 1;
        const int4 info = next < my_quads ? units_w[next * 4 + t] : make_int4(0, -1, 0, 0);
        const bool same = next < my_quads && info.x == B;
        UnitWords<B> ahead;
        if (AHEAD && same) load_words<B>(ahead, info, src);
        quad_product<B, NT>(cur, walk.info.w != 0, selector, xs + walk.i * QUAD_SLOTS + t * 8, x_stride, g, x_rows,
                            acc);
        walk = {next, info};
        if (!same) return walk;
        if constexpr (AHEAD) {
            cur = ahead;
        } else {
            load_words<B>(cur, info, src);
        }
    }
}

// One matrix of a launch, as the kernel reads it: its tables, its K split, its outputs, and the
// first column tile of the launch's grid that is its.
struct GemvMatrix {
    const __half* x_slots;  // the inputs in slot order, [x_rows, quads * 128]
    const int4* units;
    const uint4* q_weight;
    const uint32_t* q_scale;
    const __half* q_scale_max;
    int quads, quads_per_slice, warp_quads, slices, packed_rows, n_pad, n, first_tile;
};
// What staging makes of x_slots (exl2.h, Exl2Input), read in place when staging. GemvInput and
// GemvOutput copy exl2.h's Exl2Input and Exl2Output field by field with typed pointers: the
// kernel taking exl2.h's structs themselves (GemvOutput holding an Exl2Output) measured slower
// with the same registers and spills, both builds in one call (python3 -m bench.step_ablation
// --bpw 4.0 and python3 -m bench.speed --matrix-only).
struct GemvInput {
    const __half* up_slots;
    const __half* weight_slots;
    const float* squares;
    float eps;
    int hidden;
};
// Where a matrix's sums go (exl2.h, Exl2Output), apart from GemvMatrix: the kernel reads these only
// after its main loop, so they hold no registers through it.
struct GemvOutput {
    const __half* bias;
    float* partial;
    __half* out;
    __half* residual;
    float* squares;
    const int* slot_of[EXL2_ROUTES_MOST];
    __half* slots_out[EXL2_ROUTES_MOST];
    int slots[EXL2_ROUTES_MOST];
    int routes, n;
};
// q, k and v (or gate and up) read the same input: one launch takes them all, so the launch's
// fixed cost (the first loads' latency, the tail) is paid once instead of per matrix.
constexpr int MOST_MATRICES = 3;
struct GemvGroup {
    GemvMatrix m[MOST_MATRICES];
    GemvInput in[MOST_MATRICES];
    GemvOutput o[MOST_MATRICES];
    int count;
};

// What writing column c of row m reads: its bias, its residual, its slot in each consumer's order.
// All are loaded before anything is stored, so they take one memory round trip, not one each.
struct OutputReads {
    float bias, residual;
    int slot[EXL2_ROUTES_MOST];
};

__device__ __forceinline__ OutputReads output_reads(const GemvOutput& o, int m, int c) {
    OutputReads reads{};
    if (o.bias) reads.bias = __half2float(o.bias[c]);
    if (o.residual) reads.residual = __half2float(o.residual[(size_t)m * o.n + c]);
#pragma unroll
    for (int r = 0; r < EXL2_ROUTES_MOST; ++r)
        if (r < o.routes) reads.slot[r] = __ldg(o.slot_of[r] + c);
    return reads;
}

// Column c of row m, its fp32 sum v: the bias added, rounded to fp16 once, then where the matrix's
// output goes (exl2.h, Exl2Output). Returns the square of the value written, for the row's norm.
__device__ __forceinline__ float put_output(const GemvOutput& o, int m, int c, float v, const OutputReads& reads) {
    __half h = __float2half(v + reads.bias);
    const size_t at = (size_t)m * o.n + c;
    if (o.residual) {
        h = half_sum(__half2float(h), reads.residual);
        o.residual[at] = h;
    }
    if (o.out) o.out[at] = h;
#pragma unroll
    for (int r = 0; r < EXL2_ROUTES_MOST; ++r)
        if (r < o.routes) o.slots_out[r][(size_t)m * o.slots[r] + reads.slot[r]] = h;
    const float f = __half2float(h);
    return f * f;
}

// Blocks of 8 warps a multiprocessor keeps at batch 1..8, which caps a thread at 80 registers.
// 3 blocks (some spills in the 5-8 bit walks) beat 2 (128 registers, no spills) and 4 (64
// registers) on 4096x11008 at 4 bits, each built and timed by python3 -m bench.speed --matrix-only
// (bench/history/KERNEL_NOTES.md v4): the kernel is bound by latency, and warps to switch between
// matter more than the spills.
constexpr int MIN_BLOCKS = 3;

// The most quads one warp takes in a launch (the host's K split keeps within it).
constexpr int WARP_QUADS = 4;
constexpr int MOST_WARPS = 8;

// Per warp: x_rows rows of staged inputs (its quads' slots), then its quads' unit table.
__host__ __device__ inline size_t warp_staging_bytes(int warp_quads, int x_rows) {
    return sizeof(__half) * (size_t)x_rows * (warp_quads * QUAD_SLOTS + 32) + sizeof(int4) * 4 * warp_quads;
}

// grid (column tiles of 32 of all the matrices, K slices); block: warps each taking a few of the
// slice's quads (warp w: quads w, w + warps, ...), each staging the inputs of its own quads
// (already in slot order) in shared memory. Before waiting for the previous kernel a warp
// requests its first quad's words, so they are on their way while its inputs are staged.
// A matrix with one slice writes its columns; with several, every block adds its sums
// into the matrix's `partial` (fp32, zero on entry) by atomics and the last block of a column
// tile to finish (counted in `done`, one count per tile of the grid) writes fp16 with the bias
// and leaves `partial` and `done` zeroed. "Writes" as the matrix's GemvOutput says: its own
// output, or added into a residual and in its consumers' slot orders, with the rows' squares.
template <int NT>
__global__ void __launch_bounds__(MOST_WARPS * 32, NT == 1 ? MIN_BLOCKS : 1)
exl2_gemv_kernel(int x_rows, const __grid_constant__ GemvGroup group, int* __restrict__ done) {
    // The matrix by whole-struct selects with constant indices: its fields are used all through the
    // kernel. The outputs are read in place after the main loop by a dynamic index, which the
    // __grid_constant__ parameters allow without a local copy.
    int which = 0;
    if (group.count > 1 && (int)blockIdx.x >= group.m[1].first_tile) which = 1;
    if (group.count > 2 && (int)blockIdx.x >= group.m[2].first_tile) which = 2;
    GemvMatrix mat = group.m[0];
    if (which == 1) mat = group.m[1];
    if (which == 2) mat = group.m[2];
    allow_dependents();
    if ((int)blockIdx.y >= mat.slices) return;  // a matrix split fewer ways than the grid's widest
    const int4* __restrict__ units = mat.units;
    const int quads = mat.quads, packed_rows = mat.packed_rows, n_pad = mat.n_pad, n = mat.n;
    const int tile = blockIdx.x - mat.first_tile;

    extern __shared__ __align__(16) unsigned char shared[];
    __shared__ bool last;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int col = tile * WARP_COLS + COLS_PER_THREAD * g;
    const int q_first = blockIdx.y * mat.quads_per_slice;
    const int q_end = min(quads, q_first + mat.quads_per_slice);
    const int warp_quads = mat.warp_quads;  // the most any warp of the launch takes (host: a division less here)
    auto quad_of = [&](int i) { return q_first + warp + i * warps; };
    int my_quads = 0;
#pragma unroll
    for (int i = 0; i < WARP_QUADS; ++i) my_quads += quad_of(i) < q_end;
    // Rows 64 bytes apart modulo 128: a quarter-warp's 16-byte reads of two rows hit different banks.
    const int x_stride = warp_quads * QUAD_SLOTS + 32;
    unsigned char* mine = shared + warp * warp_staging_bytes(warp_quads, x_rows);
    __half* xs = reinterpret_cast<__half*>(mine);
    int4* units_w = reinterpret_cast<int4*>(mine + sizeof(__half) * x_rows * x_stride);
    const WeightSource src{mat.q_weight + col / COLS_PER_THREAD, mat.q_scale + col / 8, mat.q_scale_max,
                           unsigned(n_pad / COLS_PER_THREAD), unsigned(n_pad / 8), packed_rows};
    const uint32_t selector = scale_selector(col);

    // Before the wait only the layer's own tensors are read: the first quad's table entry and
    // words and the warp's unit table.
    Walk walk{0, make_int4(0, -1, 0, 0)};
    UnitWords<8> first;
    if (my_quads > 0) {
        walk.info = __ldg(units + quad_of(0) * 4 + t);
        load_words<8>(first, walk.info, src, walk.info.x);
    }
    for (int e = lane; e < my_quads * 4; e += 32) units_w[e] = __ldg(units + quad_of(e / 4) * 4 + e % 4);
    // The inputs are the previous kernel's output, in slot order: each quad's 128 are one
    // 256-byte run per row, two quads to a pass of the warp's 16-byte loads. Where that kernel
    // left SwiGLU or the norm to this one, they are applied here, as the reference rounds them.
    wait_for_producer();
    const size_t row_slots = (size_t)quads * QUAD_SLOTS;
    // One loop per way of finishing the inputs (the choice is the launch's), so plain staging stays a bare copy.
    auto stage = [&](auto finish) {
        for (int m = 0; m < x_rows; ++m) {
#pragma unroll
            for (int i0 = 0; i0 < WARP_QUADS; i0 += 2) {
                const int i = i0 + (lane >> 4);
                if (i < my_quads) {
                    const size_t at = (size_t)quad_of(i) * QUAD_SLOTS + 8 * (lane & 15);
                    const uint4 v = __ldg(reinterpret_cast<const uint4*>(mat.x_slots + m * row_slots + at));
                    *reinterpret_cast<uint4*>(xs + m * x_stride + i * QUAD_SLOTS + 8 * (lane & 15)) = finish(v, m, at);
                }
            }
        }
    };
    const GemvInput& in = group.in[which];
    if (in.up_slots) {
        stage([&](uint4 gate, int m, size_t at) {
            return elementwise8(gate, __ldg(reinterpret_cast<const uint4*>(in.up_slots + m * row_slots + at)),
                                [](__half2 g, __half2 u) { return silu_times2(g, u); });
        });
    } else if (in.weight_slots) {
        stage([&](uint4 x, int m, size_t at) {
            const float inverse_rms = inverse_rms_of(in.squares[m], in.hidden, in.eps);
            return elementwise8(x, __ldg(reinterpret_cast<const uint4*>(in.weight_slots + at)),
                                [inverse_rms](__half2 v, __half2 w) { return rms_normed2(v, inverse_rms, w); });
        });
    } else {
        stage([](uint4 x, int, size_t) { return x; });
    }
    __syncwarp();

    float acc[NT][2][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[nt][mt][i] = 0.f;

    // Every unit of a quad has one width, so the switch never splits the warp. The first walk
    // (peeled, so `first` is dead after it) takes the words loaded before the wait. The walks
    // after a change of width are unrolled too (a warp has at most WARP_QUADS quads, so at most
    // that many walks): inside a loop over widths, ptxas kept everything live across the loop and
    // spilled the lookahead's words at 2-4 bits right after their loads (an STL waits for its
    // data, so each quad waited a memory round trip); unrolled, no walk spills loaded words.
#define EXL2_WALK(B, FIRST) walk_width<B, NT>(walk, FIRST, first, my_quads, units_w, t, src, selector, xs, x_stride, \
                                              g, x_rows, acc)
#define EXL2_WALK_ANY(FIRST)                                   \
    switch (walk.info.x) {                                     \
        case 2: walk = EXL2_WALK(2, FIRST); break;             \
        case 3: walk = EXL2_WALK(3, FIRST); break;             \
        case 4: walk = EXL2_WALK(4, FIRST); break;             \
        case 5: walk = EXL2_WALK(5, FIRST); break;             \
        case 6: walk = EXL2_WALK(6, FIRST); break;             \
        default: walk = EXL2_WALK(8, FIRST); break;            \
    }
    // Written out: `#pragma unroll` over the same `if` gave different code that spilled again.
    static_assert(WARP_QUADS == 4, "one walk per quad a warp can take, written out below");
    if (walk.i < my_quads) EXL2_WALK_ANY(true)
    if (walk.i < my_quads) EXL2_WALK_ANY(false)
    if (walk.i < my_quads) EXL2_WALK_ANY(false)
    if (walk.i < my_quads) EXL2_WALK_ANY(false)
#undef EXL2_WALK_ANY
#undef EXL2_WALK

    // Sum the warps' tiles through shared memory (the staged inputs are no longer needed).
    __syncthreads();
    // Opaque from here: the compiler cannot load the outputs before the loop and keep them live through it.
    asm volatile("" : "+r"(which));
    const GemvOutput& o = group.o[which];
    float* sums = reinterpret_cast<float*>(shared);
    constexpr int ENTRIES = NT * 8;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
            for (int i = 0; i < 4; ++i) sums[(warp * ENTRIES + nt * 8 + mt * 4 + i) * 32 + lane] = acc[nt][mt][i];
    __syncthreads();
    const bool split = mat.slices > 1;
    // The loop's trip count is the same for every lane of a warp (a multiple of 32 entries), so
    // the rows' squares can be summed across the warp.
    for (int e = threadIdx.x; e < ENTRIES * 32; e += blockDim.x) {
        // Entry (nt, mt, i) of lane (g, t): column 4g + 2mt + i/2, batch row 8nt + 2t + i%2.
        const int entry = e >> 5, owner = e & 31;
        const int c = tile * WARP_COLS + COLS_PER_THREAD * (owner >> 2) + 2 * ((entry >> 2) & 1) + ((entry >> 1) & 1);
        const int m = 8 * (entry >> 3) + 2 * (owner & 3) + (entry & 1);
        float square = 0.f;
        if (m < x_rows && c < n) {
            float v = 0.f;
            for (int w = 0; w < warps; ++w) v += sums[(w * ENTRIES + entry) * 32 + owner];
            if (split) {
                atomicAdd(o.partial + (size_t)m * n + c, v);
            } else if (o.routes == 0 && !o.residual) {  // a plain product: only its own output
                o.out[(size_t)m * n + c] = __float2half(o.bias ? v + __half2float(o.bias[c]) : v);
            } else {
                square = put_output(o, m, c, v, output_reads(o, m, c));
            }
        }
        if (!split && o.squares) {
            // Lanes with one owner % 4 hold one row: sum over them, then one add per row.
#pragma unroll
            for (int offset = 4; offset < 32; offset <<= 1) square += __shfl_xor_sync(0xffffffffu, square, offset);
            if (owner < 4 && m < x_rows) atomicAdd(o.squares + m, square);
        }
    }
    if (!split) return;

    // One thread counts the block. Its fence after the barrier is cumulative (PTX memory model):
    // it makes every sum the block's threads added before the barrier visible before the count,
    // so the other threads need no fence (each would wait for its own atomics: ncu's stalls of the
    // 4096x4096 product, bench/history/KERNEL_NOTES.md v9). In the last block the same thread's fence after the count
    // orders the reads behind the next barrier after every other block's sums.
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        last = atomicAdd(done + blockIdx.x, 1) == mat.slices - 1;
        if (last) __threadfence();
    }
    __syncthreads();
    if (!last) return;
    // A warp takes one row's 32 columns of the tile at a time.
    for (int e = threadIdx.x; e < x_rows * WARP_COLS; e += blockDim.x) {
        const int m = e / WARP_COLS, c = tile * WARP_COLS + e % WARP_COLS;
        float square = 0.f;
        if (c < n) {
            float* p = o.partial + (size_t)m * n + c;
            const float v = __ldcg(p);
            const OutputReads reads = output_reads(o, m, c);
            *p = 0.f;
            square = put_output(o, m, c, v, reads);
        }
        if (o.squares) {
#pragma unroll
            for (int offset = 16; offset > 0; offset >>= 1) square += __shfl_xor_sync(0xffffffffu, square, offset);
            if (lane == 0) atomicAdd(o.squares + m, square);
        }
    }
    if (threadIdx.x == 0) done[blockIdx.x] = 0;
}

// ---- Dequantizer (prefill) -------------------------------------------------

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

// The fp16 scale of four columns of group g, rounded as the format's reference rounds it.
__device__ __forceinline__ void group_scales(const int* q_scale, const __half* q_scale_max, int g, int n_pad, int col,
                                             float (&scale)[COLS_PER_THREAD]) {
    const uint32_t word = __ldg(reinterpret_cast<const uint32_t*>(q_scale) + (size_t)g * (n_pad / 8) + col / 8);
    __half2 even, odd;
    column_scales(word, scale_selector(col), q_scale_max[g], even, odd);
    scales_in_order(even, odd, scale);
}

// grid (column tiles, groups): each thread writes four columns of one group's rows, act-order
// row r at row `row_of[r]` (input order: the product then needs no permuted copy of x), or at r
// where row_of is null.
template <int BITS>
__device__ __forceinline__ void dequant_group(const int4* q, int stride4, int qrow, int qrow_end, int rows,
                                              const float (&scale)[COLS_PER_THREAD], const int* row_of, int first_row,
                                              __half* out, int n, int col) {
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
            const int row = first_row + r + j;
            __half* dst = out + (size_t)(row_of ? __ldg(row_of + row) : row) * n + col;
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
                                    const int4* __restrict__ groups, const int* __restrict__ row_of,
                                    __half* __restrict__ out) {
    const int col = (blockIdx.x * blockDim.x + threadIdx.x) * COLS_PER_THREAD;
    if (col >= n) return;
    const int g = blockIdx.y;
    const int4 gi = groups[g];
    float scale[COLS_PER_THREAD];
    group_scales(q_scale, q_scale_max, g, n_pad, col, scale);
    const int4* q = q_weight + col / COLS_PER_THREAD;
    const int stride4 = n_pad / COLS_PER_THREAD;
    switch (gi.x) {
        case 2: dequant_group<2>(q, stride4, gi.y, packed_rows, gi.w, scale, row_of, gi.z, out, n, col); break;
        case 3: dequant_group<3>(q, stride4, gi.y, packed_rows, gi.w, scale, row_of, gi.z, out, n, col); break;
        case 4: dequant_group<4>(q, stride4, gi.y, packed_rows, gi.w, scale, row_of, gi.z, out, n, col); break;
        case 5: dequant_group<5>(q, stride4, gi.y, packed_rows, gi.w, scale, row_of, gi.z, out, n, col); break;
        case 6: dequant_group<6>(q, stride4, gi.y, packed_rows, gi.w, scale, row_of, gi.z, out, n, col); break;
        default: dequant_group<8>(q, stride4, gi.y, packed_rows, gi.w, scale, row_of, gi.z, out, n, col); break;
    }
}

template <int NT>
void launch_gemv(const Exl2Product* products, int count, int x_rows, int warps,
                 float* partial, cudaStream_t stream) {
    GemvGroup group{};
    group.count = count;
    int tiles = 0, slices = 1;
    size_t staged = 0;
    float* sums = partial;
    for (int i = 0; i < count; ++i) {
        const Exl2Product& p = products[i];
        const Exl2Layer& layer = p.layer;
        GemvMatrix& m = group.m[i];
        m.x_slots = static_cast<const __half*>(p.x_slots);
        m.units = reinterpret_cast<const int4*>(layer.units);
        m.q_weight = reinterpret_cast<const uint4*>(layer.q_weight);
        m.q_scale = reinterpret_cast<const uint32_t*>(layer.q_scale);
        m.q_scale_max = static_cast<const __half*>(layer.q_scale_max);
        GemvInput& in = group.in[i];
        in.up_slots = static_cast<const __half*>(p.input.up_slots);
        in.weight_slots = static_cast<const __half*>(p.input.weight_slots);
        in.squares = p.input.squares;
        in.eps = p.input.eps;
        in.hidden = p.input.hidden;
        GemvOutput& o = group.o[i];
        o.bias = static_cast<const __half*>(p.bias);
        o.out = static_cast<__half*>(p.output.out);
        o.residual = static_cast<__half*>(p.output.residual);
        o.squares = p.output.squares;
        for (int r = 0; r < EXL2_ROUTES_MOST; ++r) {
            o.slot_of[r] = p.output.slot_of[r];
            o.slots_out[r] = static_cast<__half*>(p.output.slots_out[r]);
            o.slots[r] = p.output.slots[r];
        }
        o.routes = p.output.routes;
        o.n = layer.n;
        m.quads = layer.quads;
        m.quads_per_slice = p.quads_per_slice;
        m.warp_quads = (p.quads_per_slice + warps - 1) / warps;
        m.slices = p.slices;
        m.packed_rows = layer.packed_rows;
        m.n_pad = layer.n_pad;
        m.n = layer.n;
        m.first_tile = tiles;
        // Only a split matrix adds into the scratch: each its own stretch of it.
        o.partial = sums;
        if (p.slices > 1) sums += (size_t)x_rows * layer.n;
        tiles += layer.n_pad / WARP_COLS;
        slices = std::max(slices, p.slices);
        staged = std::max(staged, warps * warp_staging_bytes(m.warp_quads, x_rows));
    }
    // The grid's completion counts sit right after the sums, zero like them between launches.
    int* done = reinterpret_cast<int*>(sums);
    const dim3 grid(tiles, slices);
    const size_t warp_sums = sizeof(float) * warps * NT * 8 * 32;
    const size_t smem = std::max(staged, warp_sums);
    auto kernel = exl2_gemv_kernel<NT>;
    if (smem > 48 * 1024) cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    launch_chained(kernel, grid, dim3(warps * 32), smem, stream, x_rows, group, done);
}

}  // namespace

int exl2_gemm_group_max() { return MOST_MATRICES; }
int exl2_gemm_warps_max() { return MOST_WARPS; }
int exl2_gemm_warp_quads_max() { return WARP_QUADS; }

size_t exl2_gemm_scratch(const Exl2Product* products, int count, int x_rows) {
    size_t floats = 0, tiles = 0;
    for (int i = 0; i < count; ++i) {
        if (products[i].slices > 1) floats += (size_t)x_rows * products[i].layer.n;
        tiles += products[i].layer.n_pad / WARP_COLS;
    }
    return floats + tiles;
}

void exl2_gemm_group_launch(const Exl2Product* products, int count, int x_rows, int warps, float* partial,
                            cudaStream_t stream) {
    if (x_rows <= 8) {
        launch_gemv<1>(products, count, x_rows, warps, partial, stream);
    } else {
        launch_gemv<2>(products, count, x_rows, warps, partial, stream);
    }
}

void exl2_dequant_launch(const Exl2Layer& layer, int groups, const int* row_of, void* out, cudaStream_t stream) {
    const int threads = 128;
    const dim3 grid(((layer.n + COLS_PER_THREAD - 1) / COLS_PER_THREAD + threads - 1) / threads, groups);
    exl2_dequant_kernel<<<grid, threads, 0, stream>>>(
        reinterpret_cast<const int4*>(layer.q_weight), layer.packed_rows, layer.n_pad, layer.n, layer.q_scale,
        static_cast<const __half*>(layer.q_scale_max), reinterpret_cast<const int4*>(layer.groups), row_of,
        static_cast<__half*>(out));
}
