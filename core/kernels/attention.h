// Launcher of the decode attention kernel (attention.cu), free of torch headers.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

// Floats of scratch the kernel needs for a cache of max_seq positions; its last `heads` words
// are arrival counts that must be zero before the first launch (the kernel leaves them so).
int64_t decode_attention_scratch_floats(int heads, int dim, int max_seq);

// One token (batch 1) at *position: q [heads * dim], k and v [kv_heads * dim] as projected.
// Rotates q and k by the rows of the cos and sin tables [max_seq, dim] at the position, writes
// k and v into the caches [kv_heads, max_seq, dim] there, and writes out fp16 [heads * dim] =
// softmax(q k^T * scale) v over the cache from position - window + 1 (window 0: from 0) to
// the position, reading at most the first `length` positions. Query head h reads key/value
// head h / (heads / kv_heads). Where slots_out is not null, out[i] is also written to
// slots_out[slot_of[i]] (int32 [heads * dim]): the next product's input in its slot order.
void decode_attention_launch(const void* q, const void* k, const void* v, const void* cos_table, const void* sin_table,
                             void* keys, void* values, const int64_t* position, int window, int heads, int kv_heads,
                             int dim, int max_seq, int length, float scale, float* scratch, void* out,
                             const int* slot_of, void* slots_out, cudaStream_t stream);
