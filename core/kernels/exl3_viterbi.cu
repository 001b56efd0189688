// Viterbi search of EXL3 tiles, the GPU twin of core/convert/exl3/trellis.py encode_tiles: the same
// two tail-biting passes and the same fp32 arithmetic, so that both return the same states.
//
// One block of 1024 threads per tile (a persistent grid walks the tiles). At each position the
// block holds one cost per node, the 16 - D overlap bits two consecutive states share, in shared
// memory (in global scratch where 2^(16-D) floats exceed what a block may take: K < 2 off sm_80
// and sm_90; one kernel takes either, through a generic pointer, which keeps the build short). A state's cost is its node's cost plus (value - w)^2, each op rounded to fp32
// (__fsub_rn, __fmul_rn, __fadd_rn: no FMA contraction); the next node's cost is the least of its
// 2^D' predecessors, the lowest predecessor on ties. Each choice is kept as D' bit planes of 32
// nodes (one ballot a plane) in global scratch, at most 4 KiB a position, and one thread follows
// them back.
#include "exl3.h"
#include "exl3_trellis.cuh"

namespace {

constexpr int THREADS = 1024;
constexpr int POSITIONS = 256;
constexpr int FIRST_PASS_START = POSITIONS / 2;  // as ExLlamaV3 and the torch encoder
constexpr int SLOT_WORDS = 1024;                // back-pointer planes of one position: 2^(16-D) * D bits <= 4 KiB
constexpr int BACK_WORDS = POSITIONS * SLOT_WORDS;
constexpr int MOST_NODES = 1 << 15;             // D >= 1
constexpr int MISC_WORDS = 32;
constexpr size_t BLOCK_SCRATCH_WORDS = (size_t)BACK_WORDS + MOST_NODES + MISC_WORDS;

__device__ __forceinline__ float infinity() { return __int_as_float(0x7F800000); }

template <int CODEBOOK>
__device__ __forceinline__ float state_cost(const float* node_costs, uint32_t state, int bits, float w) {
    const float d = __fsub_rn(__half2float(exl3_value<CODEBOOK>(state)), w);
    return __fadd_rn(__fmul_rn(d, d), node_costs[state >> bits]);
}

// Positions first, first + 1, ... (mod 256), 256 of them. Leaves in node_costs the node costs of
// the last position's predecessors and in back the choices, slot i for the step into position i + 1.
// A thread keeps the next costs of at most 2^15 / 1024 nodes in registers while the block still reads the old ones.
constexpr int MOST_PER_THREAD = MOST_NODES / THREADS;

template <int CODEBOOK>
__device__ void forward(const float* __restrict__ w, int first, int bits_x2, float* node_costs, uint32_t* back,
                        int start_node) {
    const int tid = threadIdx.x, lane = tid & 31;
    const int start_nodes = (1 << 16) >> exl3_step_bits(first, bits_x2);
    for (int n = tid; n < start_nodes; n += THREADS)
        node_costs[n] = start_node < 0 || n == start_node ? 0.f : infinity();
    __syncthreads();
    for (int i = 0; i < POSITIONS - 1; ++i) {
        const int p = (first + i) & (POSITIONS - 1);
        const int bits = exl3_step_bits(p, bits_x2);
        const int bits_next = exl3_step_bits((p + 1) & (POSITIONS - 1), bits_x2);
        const int nodes_next = (1 << 16) >> bits_next;
        const float wp = __ldg(w + p);
        uint32_t* slot = back + (size_t)i * SLOT_WORDS;
        float best[MOST_PER_THREAD];
#pragma unroll
        for (int k = 0; k < MOST_PER_THREAD; ++k) {
            const int node = k * THREADS + tid;
            // nodes_next is a multiple of 256: a warp is wholly in or out.
            if (node < nodes_next) {
                float least = 0.f;
                int choice = 0;
                for (int t = 0; t < 1 << bits_next; ++t) {
                    const float c = state_cost<CODEBOOK>(node_costs, ((uint32_t)t << (16 - bits_next)) | node, bits, wp);
                    if (t == 0 || c < least) {
                        least = c;
                        choice = t;
                    }
                }
                best[k] = least;
                for (int j = 0; j < bits_next; ++j) {
                    const uint32_t plane = __ballot_sync(0xFFFFFFFFu, (choice >> j) & 1);
                    if (lane == 0) slot[(node >> 5) * bits_next + j] = plane;
                }
            }
        }
        __syncthreads();  // every read of this position's node costs is done
#pragma unroll
        for (int k = 0; k < MOST_PER_THREAD; ++k)
            if (k * THREADS + tid < nodes_next) node_costs[k * THREADS + tid] = best[k];
        __syncthreads();
    }
}

// From the state at order index 255 back to order index stop - 1 (order index i is position first + i);
// writes each state into out (position-indexed) when out is not null. Returns the state at stop - 1.
__device__ uint32_t trace(const uint32_t* back, int first, int bits_x2, uint32_t last, int stop, int32_t* out) {
    uint32_t current = last;
    if (out != nullptr) out[(first + POSITIONS - 1) & (POSITIONS - 1)] = (int32_t)current;
    for (int index = POSITIONS - 1; index >= stop; --index) {
        const int bits = exl3_step_bits((first + index) & (POSITIONS - 1), bits_x2);
        const uint32_t node = current >> bits;
        const uint32_t* planes = back + (size_t)(index - 1) * SLOT_WORDS + (node >> 5) * bits;
        uint32_t choice = 0;
        for (int j = 0; j < bits; ++j) choice |= ((planes[j] >> (node & 31)) & 1u) << j;
        current = (choice << (16 - bits)) | node;
        if (out != nullptr) out[(first + index - 1) & (POSITIONS - 1)] = (int32_t)current;
    }
    return current;
}

// The lowest-cost state of the last position, the lowest state on ties (torch's argmin).
template <int CODEBOOK>
__device__ uint32_t best_state(float* node_costs, int bits, float w) {
    const int tid = threadIdx.x, lane = tid & 31;
    float least = infinity();
    int state = -1;
    for (int s = tid; s < 1 << 16; s += THREADS) {
        const float c = state_cost<CODEBOOK>(node_costs, s, bits, w);
        if (state < 0 || c < least) {
            least = c;
            state = s;
        }
    }
#pragma unroll
    for (int mask = 16; mask > 0; mask >>= 1) {
        const float other = __shfl_xor_sync(0xFFFFFFFFu, least, mask);
        const int other_state = __shfl_xor_sync(0xFFFFFFFFu, state, mask);
        if (other < least || (other == least && other_state < state)) {
            least = other;
            state = other_state;
        }
    }
    __syncthreads();  // the node costs are read; their first words take the warps' results
    if (lane == 0) {
        node_costs[2 * (tid >> 5)] = least;
        node_costs[2 * (tid >> 5) + 1] = __int_as_float(state);
    }
    __syncthreads();
    uint32_t result = 0;
    if (tid == 0) {
        float block_least = node_costs[0];
        int block_state = __float_as_int(node_costs[1]);
        for (int warp = 1; warp < THREADS / 32; ++warp) {
            const float c = node_costs[2 * warp];
            const int s = __float_as_int(node_costs[2 * warp + 1]);
            if (c < block_least || (c == block_least && s < block_state)) {
                block_least = c;
                block_state = s;
            }
        }
        result = (uint32_t)block_state;
    }
    return result;  // meaningful in thread 0 only
}

template <int CODEBOOK>
__global__ void __launch_bounds__(THREADS, 1) exl3_viterbi_kernel(const float* __restrict__ values, int tiles,
                                                                  int bits_x2, int32_t* __restrict__ states,
                                                                  uint32_t* __restrict__ scratch, bool shared_costs) {
    extern __shared__ float shared_cost_words[];
    uint32_t* back = scratch + (size_t)blockIdx.x * BLOCK_SCRATCH_WORDS;
    float* node_costs = shared_costs ? shared_cost_words : reinterpret_cast<float*>(back + BACK_WORDS);
    volatile uint32_t* wrap_word = back + BACK_WORDS + MOST_NODES;
    const int first_bits = exl3_step_bits(0, bits_x2);
    const int last_bits = exl3_step_bits(POSITIONS - 1, bits_x2);
    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const float* w = values + (size_t)tile * POSITIONS;
        // Pass 1: once around from the middle, unconstrained; its state at position 0 gives the wrap node.
        forward<CODEBOOK>(w, FIRST_PASS_START, bits_x2, node_costs, back, -1);
        const int pass1_last = FIRST_PASS_START - 1;
        const uint32_t end = best_state<CODEBOOK>(node_costs, exl3_step_bits(pass1_last, bits_x2),
                                                  __ldg(w + pass1_last));
        if (threadIdx.x == 0) {
            const uint32_t at_zero = trace(back, FIRST_PASS_START, bits_x2, end, POSITIONS - FIRST_PASS_START + 1, nullptr);
            *wrap_word = at_zero >> first_bits;
        }
        __syncthreads();
        const int wrap = (int)*wrap_word;
        __syncthreads();  // everyone has read the wrap node before pass 2 may reuse the word
        // Pass 2: positions 0..255 from the wrap node, ending on a state whose low bits close the ring.
        forward<CODEBOOK>(w, 0, bits_x2, node_costs, back, wrap);
        if (threadIdx.x == 0) {
            const float w_last = __ldg(w + POSITIONS - 1);
            float least = 0.f;
            uint32_t last = 0;
            for (int t = 0; t < 1 << first_bits; ++t) {
                const uint32_t s = ((uint32_t)t << (16 - first_bits)) | (uint32_t)wrap;
                const float c = state_cost<CODEBOOK>(node_costs, s, last_bits, w_last);
                if (t == 0 || c < least) {
                    least = c;
                    last = s;
                }
            }
            trace(back, 0, bits_x2, last, 1, states + (size_t)tile * POSITIONS);
        }
        __syncthreads();  // node costs and back-pointers are free for the next tile
    }
}

int grid_for(int tiles) {
    int device = 0, multiprocessors = 1;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device);
    return tiles < multiprocessors ? tiles : multiprocessors;
}

template <int CODEBOOK>
void launch(const float* values, int tiles, int bits_x2, int32_t* states, uint32_t* scratch, cudaStream_t stream) {
    int device = 0, most_shared = 0;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&most_shared, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    const size_t cost_bytes = (size_t)((1 << 16) >> (bits_x2 >> 1)) * sizeof(float);
    const bool shared_costs = cost_bytes <= (size_t)most_shared;
    const size_t shared_bytes = shared_costs ? cost_bytes : 0;
    auto kernel = exl3_viterbi_kernel<CODEBOOK>;
    if (shared_bytes > 48 * 1024) cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)shared_bytes);
    kernel<<<grid_for(tiles), THREADS, shared_bytes, stream>>>(values, tiles, bits_x2, states, scratch, shared_costs);
}

}  // namespace

size_t exl3_viterbi_scratch_bytes(int tiles) {
    return tiles <= 0 ? 0 : (size_t)grid_for(tiles) * BLOCK_SCRATCH_WORDS * sizeof(uint32_t);
}

void exl3_viterbi_launch(const float* values, int tiles, int bits_x2, int codebook, int32_t* states, void* scratch,
                         cudaStream_t stream) {
    if (tiles <= 0) return;
    uint32_t* words = static_cast<uint32_t*>(scratch);
    if (codebook == EXL3_CB_3INST)
        launch<EXL3_CB_3INST>(values, tiles, bits_x2, states, words, stream);
    else if (codebook == EXL3_CB_MCG)
        launch<EXL3_CB_MCG>(values, tiles, bits_x2, states, words, stream);
    else
        launch<EXL3_CB_MUL1>(values, tiles, bits_x2, states, words, stream);
}
