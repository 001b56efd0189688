// Launchers of the small fused kernels of a decode step (fused.cu), free of torch headers.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

// out[r] = weight * fp16(x[r] / rms(x[r])), one row of `hidden` fp16 values per r.
// With `residual`, x[r] first becomes fp16(x[r] + residual[r]), written back into x.
void rms_norm_launch(void* x, const void* residual, const void* weight, void* out, int rows, int hidden, float eps,
                     cudaStream_t stream);

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
