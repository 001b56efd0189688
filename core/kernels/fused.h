// Launchers of the small fused kernels of a decode step (fused.cu), free of torch headers.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

// A kernel's output row as its consumers read it: the EXL2 small-batch product stages its
// inputs in an order of its own (core/formats/exl2/kernel.py, xperm), which the producer writes
// directly. Table t: out[t] fp16 [rows, slots[t]], slot s of row r = row r's value at input
// index[t][s], or 0 where that is NO_SLOT_INPUT. slots[t] is a multiple of 8.
constexpr int SLOT_TABLES_MOST = 3;
constexpr uint16_t NO_SLOT_INPUT = 0xFFFF;
struct SlotTables {
    const uint16_t* index[SLOT_TABLES_MOST];
    void* out[SLOT_TABLES_MOST];
    int slots[SLOT_TABLES_MOST];
    int count;
};

// out[r] = weight * fp16(x[r] / rms(x[r])), one row of `hidden` fp16 values per r.
// With `residual`, x[r] first becomes fp16(x[r] + residual[r]), written to sum_out[r] (x itself
// where no slot tables are given; with them several blocks read x, so sum_out must be other memory).
// With slot tables (rms_norm_takes_slots(hidden) only), out[r] is also written in their orders.
bool rms_norm_takes_slots(int hidden);
void rms_norm_launch(void* x, const void* residual, void* sum_out, const void* weight, void* out, int rows, int hidden,
                     float eps, cudaStream_t stream, const SlotTables& tables = SlotTables{});

// Batch 1, `tokens` tokens at consecutive positions from *position (device; or from
// first_position where position is null): rotate q [tokens, heads, dim] in place and k
// [tokens, kv_heads, dim] into the key cache [kv_heads, max_seq, dim] at their positions, v
// into the value cache there. Row r of the cos and sin tables [*, dim] holds position table_first + r.
void rope_cache_launch(void* q, const void* k, const void* v, const void* cos_table, const void* sin_table,
                       const int64_t* position, int64_t first_position, int64_t table_first, int tokens,
                       void* key_cache, void* value_cache, int heads, int kv_heads, int dim, int max_seq,
                       cudaStream_t stream);

// out = fp16(silu(gate)) * up, elementwise over n fp16 values.
void silu_mul_launch(const void* gate, const void* up, void* out, int64_t n, cudaStream_t stream);

// The same for rows [rows, n], written in one slot table's order: out fp16 [rows, slots].
void silu_mul_slots_launch(const void* gate, const void* up, const uint16_t* index, void* out, int rows, int n,
                           int slots, cudaStream_t stream);
