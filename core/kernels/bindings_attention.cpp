// Python entry points of the decode step's attention (attention.h): argument
// checks and streams here, the CUDA code behind plain launchers.
#include "bindings.h"

#include <cmath>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "attention.h"

namespace {

// One token's rotary embedding, cache append and attention over the cache (batch 1):
// q [heads * dim], k and v [kv_heads * dim] -> [heads * dim].
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor cos_table,
                               torch::Tensor sin_table, torch::Tensor position, torch::Tensor key_cache,
                               torch::Tensor value_cache, int64_t length, int64_t window, torch::Tensor scratch,
                               c10::optional<torch::Tensor> slot_of, c10::optional<torch::Tensor> slots_out) {
    for (const auto* t : {&q, &k, &v, &cos_table, &sin_table, &key_cache, &value_cache}) check(*t, torch::kHalf, "decode_attention");
    check(position, torch::kLong, "position");
    check(scratch, torch::kFloat, "scratch");
    TORCH_CHECK(key_cache.dim() == 4 && key_cache.size(0) == 1 && value_cache.sizes() == key_cache.sizes(),
                "decode_attention: caches [1, kv_heads, max_seq, dim]");
    const int64_t kv_heads = key_cache.size(1), max_seq = key_cache.size(2), dim = key_cache.size(3);
    TORCH_CHECK(dim % 8 == 0 && dim <= 256 && q.numel() % dim == 0 && (q.numel() / dim) % kv_heads == 0,
                "decode_attention: head dim a multiple of 8 up to 256, query heads a multiple of the kv heads");
    TORCH_CHECK(k.numel() == kv_heads * dim && v.numel() == k.numel(), "decode_attention: k and v of one token for the caches' heads");
    TORCH_CHECK(cos_table.dim() == 2 && cos_table.size(0) >= max_seq && cos_table.size(1) == dim &&
                sin_table.sizes() == cos_table.sizes(), "decode_attention: cos and sin tables [max_seq, dim]");
    TORCH_CHECK(position.numel() == 1 && length >= 1 && length <= max_seq, "decode_attention: one position, length within the cache");
    const int64_t heads = q.numel() / dim;
    TORCH_CHECK(scratch.numel() >= decode_attention_scratch_floats(heads, dim, max_seq),
                "decode_attention: scratch smaller than decode_attention_scratch_floats");
    const int* slot_ptr = nullptr;
    void* slots_ptr = nullptr;
    if (slots_out.has_value()) {
        TORCH_CHECK(slot_of.has_value(), "decode_attention: slots_out needs slot_of");
        check(*slot_of, torch::kInt32, "slot_of");
        check(*slots_out, torch::kHalf, "slots_out");
        // Every entry of slot_of must lie within slots_out (the graph decoder builds it from the layer's table).
        TORCH_CHECK(slot_of->numel() == q.numel() && slots_out->numel() >= q.numel(),
                    "decode_attention: slot_of [heads * dim], slots_out at least as long");
        slot_ptr = slot_of->data_ptr<int>();
        slots_ptr = slots_out->data_ptr<at::Half>();
    }
    const c10::cuda::CUDAGuard guard(q.device());
    auto out = torch::empty_like(q);
    decode_attention_launch(q.data_ptr<at::Half>(), k.data_ptr<at::Half>(), v.data_ptr<at::Half>(),
                            cos_table.data_ptr<at::Half>(), sin_table.data_ptr<at::Half>(),
                            key_cache.data_ptr<at::Half>(), value_cache.data_ptr<at::Half>(),
                            position.data_ptr<int64_t>(), window, heads, kv_heads, dim, max_seq, length,
                            1.0f / std::sqrt((float)dim), scratch.data_ptr<float>(), out.data_ptr<at::Half>(),
                            slot_ptr, slots_ptr, c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
}

int64_t decode_attention_scratch(int64_t heads, int64_t dim, int64_t max_seq) {
    return decode_attention_scratch_floats(heads, dim, max_seq);
}

}  // namespace

void bind_attention(pybind11::module_& m) {
    m.def("decode_attention", &decode_attention, "One token's rope, cache append and attention over the key/value cache (batch 1)",
          py::arg("q"), py::arg("k"), py::arg("v"), py::arg("cos_table"), py::arg("sin_table"), py::arg("position"),
          py::arg("key_cache"), py::arg("value_cache"), py::arg("length"), py::arg("window"), py::arg("scratch"),
          py::arg("slot_of") = py::none(), py::arg("slots_out") = py::none());
    m.def("decode_attention_scratch", &decode_attention_scratch, "Floats of scratch decode_attention needs (its last `heads` zero)");
}
