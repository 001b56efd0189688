// Launcher of the decode attention kernels (attention.cu), free of torch headers.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

// Chunks of keys the first kernel splits `length` keys into (rows of `partial` per head).
int decode_attention_chunks_for(int length);

// out fp16 [heads * dim] = softmax(q k^T * scale) v for one token (batch 1) at *position,
// over the cache's keys [kv_heads, max_seq, dim] from position - window + 1 (window 0: from 0)
// to position, reading at most the first `length` positions. Query head h reads key/value head
// h / (heads / kv_heads). partial: fp32 scratch of heads * decode_attention_chunks_for(length) * (dim + 2).
void decode_attention_launch(const void* q, const void* keys, const void* values, const int64_t* position, int window,
                             int heads, int kv_heads, int dim, int max_seq, int length, float scale, float* partial,
                             void* out, cudaStream_t stream);
