// Python entry points of the fused norm, rope and SwiGLU kernels (fused.h):
// argument checks and streams here, the CUDA code behind plain launchers.
#include "bindings.h"

#include <algorithm>
#include <limits>
#include <vector>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "fused.h"

namespace {

// Slot tables (int16 views of uint16 input indices, each [slots], slots a multiple of 8) and
// their outputs fp16 [rows, slots], for a producer that writes its row in its consumers' orders.
SlotTables slot_tables(const std::vector<torch::Tensor>& index, int64_t rows, int64_t width,
                       std::vector<torch::Tensor>& outs, const torch::TensorOptions& options) {
    TORCH_CHECK(index.size() <= (size_t)SLOT_TABLES_MOST, "at most 3 slot tables");
    TORCH_CHECK(index.empty() || width < NO_SLOT_INPUT, "slot tables index at most 65534 inputs");
    SlotTables tables{};
    tables.count = (int)index.size();
    for (size_t t = 0; t < index.size(); ++t) {
        check(index[t], torch::kShort, "slot table");
        TORCH_CHECK(index[t].dim() == 1 && index[t].numel() % 8 == 0 && index[t].numel() < (1 << 30),
                    "slot table: [slots], a multiple of 8");
        outs.push_back(torch::empty({rows, index[t].numel()}, options));
        tables.index[t] = reinterpret_cast<const uint16_t*>(index[t].data_ptr<int16_t>());
        tables.out[t] = outs.back().data_ptr<at::Half>();
        tables.slots[t] = (int)index[t].numel();
    }
    return tables;
}

std::vector<torch::Tensor> norm_checked(torch::Tensor x, torch::Tensor weight, double eps,
                                        c10::optional<torch::Tensor> residual, std::vector<torch::Tensor> index,
                                        bool in_place) {
    check(x, torch::kHalf, "x");
    check(weight, torch::kHalf, "weight");
    const int64_t hidden = x.size(-1);
    TORCH_CHECK(weight.numel() == hidden && hidden <= std::numeric_limits<int>::max(), "rms_norm: weight [hidden]");
    const void* residual_ptr = nullptr;
    if (residual.has_value()) {
        check(*residual, torch::kHalf, "residual");
        TORCH_CHECK(residual->sizes() == x.sizes(), "rms_norm: residual shaped like x");
        residual_ptr = residual->data_ptr<at::Half>();
    }
    // slot_tables checks this too, but only after the device guard below; a throw from there with
    // 4 tables crashed the process on the H100 instead of raising (not understood), so here first.
    static_assert(SLOT_TABLES_MOST == 3, "the message below");
    TORCH_CHECK(index.size() <= 3, "rms_norm: at most 3 slot tables");
    TORCH_CHECK(index.empty() || rms_norm_takes_slots(hidden), "rms_norm: slot tables take rows of a multiple of 8 up to ",
                "the 16-byte kernel's width");
    const c10::cuda::CUDAGuard guard(x.device());
    auto sum = residual_ptr && !in_place ? torch::empty_like(x) : x;
    std::vector<torch::Tensor> outs{sum, torch::empty_like(x)};
    const int64_t rows = x.numel() / hidden;
    const SlotTables tables = slot_tables(index, rows, hidden, outs, x.options());
    if (rows == 0) return outs;
    rms_norm_launch(x.data_ptr<at::Half>(), residual_ptr, sum.data_ptr<at::Half>(), weight.data_ptr<at::Half>(),
                    outs[1].data_ptr<at::Half>(), rows, hidden, eps, c10::cuda::getCurrentCUDAStream(), tables);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return outs;
}

// The norm; with a residual, x += residual first (in place).
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps, c10::optional<torch::Tensor> residual) {
    return norm_checked(x, weight, eps, residual, {}, true)[1];
}

// [x + residual (a new tensor; x where no residual), its norm, the norm in slot table 0's order, ...];
// the tables' input indices must be below hidden.
std::vector<torch::Tensor> rms_norm_slots(torch::Tensor x, torch::Tensor weight, double eps,
                                          c10::optional<torch::Tensor> residual, std::vector<torch::Tensor> index) {
    return norm_checked(x, weight, eps, residual, index, false);
}

void rope_cache_checked(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor cos_table,
                        torch::Tensor sin_table, const int64_t* position, int64_t first_position, int64_t table_first,
                        int64_t tokens, torch::Tensor key_cache, torch::Tensor value_cache) {
    for (const auto* t : {&q, &k, &v, &cos_table, &sin_table, &key_cache, &value_cache}) check(*t, torch::kHalf, "rope_cache");
    TORCH_CHECK(key_cache.dim() == 4 && key_cache.size(0) == 1 && value_cache.sizes() == key_cache.sizes(),
                "rope_cache: caches [1, kv_heads, max_seq, dim]");
    const int64_t kv_heads = key_cache.size(1), max_seq = key_cache.size(2), dim = key_cache.size(3);
    TORCH_CHECK(tokens >= 1 && dim % 2 == 0 && dim <= 1024 && k.numel() == tokens * kv_heads * dim &&
                v.numel() == k.numel() && q.numel() % (tokens * dim) == 0,
                "rope_cache: q, k, v of the tokens for the caches' heads");
    TORCH_CHECK(cos_table.size(-1) == dim && sin_table.sizes() == cos_table.sizes(), "rope_cache: cos and sin tables [*, dim]");
    const c10::cuda::CUDAGuard guard(q.device());
    rope_cache_launch(q.data_ptr<at::Half>(), k.data_ptr<at::Half>(), v.data_ptr<at::Half>(),
                      cos_table.data_ptr<at::Half>(), sin_table.data_ptr<at::Half>(), position, first_position,
                      table_first, tokens, key_cache.data_ptr<at::Half>(), value_cache.data_ptr<at::Half>(),
                      q.numel() / (tokens * dim), kv_heads, dim, max_seq, c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// One decode token at the device-held position; the tables cover every position of the cache.
void rope_cache(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor cos_table, torch::Tensor sin_table,
                torch::Tensor position, torch::Tensor key_cache, torch::Tensor value_cache) {
    check(position, torch::kLong, "position");
    TORCH_CHECK(position.numel() == 1, "rope_cache: one position");
    TORCH_CHECK(cos_table.size(0) >= key_cache.size(2), "rope_cache: cos and sin tables [max_seq, dim]");
    rope_cache_checked(q, k, v, cos_table, sin_table, position.data_ptr<int64_t>(), 0, 0, 1, key_cache, value_cache);
}

// A prompt's tokens from `position` on; the tables hold exactly their positions.
void rope_cache_rows(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor cos, torch::Tensor sin,
                     int64_t position, torch::Tensor key_cache, torch::Tensor value_cache) {
    const int64_t tokens = cos.size(0);
    TORCH_CHECK(cos.dim() == 2 && position >= 0 && position + tokens <= key_cache.size(2),
                "rope_cache_rows: cos and sin [tokens, dim] for positions inside the cache");
    rope_cache_checked(q, k, v, cos, sin, nullptr, position, position, tokens, key_cache, value_cache);
}

torch::Tensor silu_mul(torch::Tensor gate, torch::Tensor up) {
    check(gate, torch::kHalf, "gate");
    check(up, torch::kHalf, "up");
    TORCH_CHECK(gate.sizes() == up.sizes() && gate.numel() % 2 == 0, "silu_mul: gate and up of one even-sized shape");
    const c10::cuda::CUDAGuard guard(gate.device());
    auto out = torch::empty_like(gate);
    if (gate.numel() == 0) return out;
    silu_mul_launch(gate.data_ptr<at::Half>(), up.data_ptr<at::Half>(), out.data_ptr<at::Half>(), gate.numel(),
                    c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
}

// fp16(silu(gate)) * up [rows, n] in one slot table's order: [rows, slots].
torch::Tensor silu_mul_slots(torch::Tensor gate, torch::Tensor up, torch::Tensor index) {
    check(gate, torch::kHalf, "gate");
    check(up, torch::kHalf, "up");
    TORCH_CHECK(gate.sizes() == up.sizes() && gate.dim() >= 1, "silu_mul_slots: gate and up of one shape");
    const int64_t n = gate.size(-1), rows = gate.numel() / std::max<int64_t>(n, 1);
    TORCH_CHECK(rows <= 65535, "silu_mul_slots: at most 65535 rows");
    const c10::cuda::CUDAGuard guard(gate.device());
    std::vector<torch::Tensor> outs;
    const SlotTables tables = slot_tables({index}, rows, n, outs, gate.options());
    if (rows > 0)
        silu_mul_slots_launch(gate.data_ptr<at::Half>(), up.data_ptr<at::Half>(), tables.index[0], outs[0].data_ptr<at::Half>(),
                              rows, n, tables.slots[0], c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return outs[0];
}

}  // namespace

void bind_fused(pybind11::module_& m) {
    m.def("rms_norm", &rms_norm, "RMSNorm of fp16 rows, optionally after adding a residual into x",
          py::arg("x"), py::arg("weight"), py::arg("eps"), py::arg("residual") = py::none());
    m.def("rope_cache", &rope_cache, "Rotary embedding of one token's q (in place) and k, appended with v to the caches");
    m.def("rope_cache_rows", &rope_cache_rows, "Rotary embedding of a prompt's q (in place) and k, written with v into the caches");
    m.def("silu_mul", &silu_mul, "fp16(silu(gate)) * up");
    m.def("rms_norm_takes_slots", &rms_norm_takes_slots, "Whether rms_norm_slots takes rows of this width");
    m.def("rms_norm_slots", &rms_norm_slots, "x + residual (new), its RMSNorm, and that also in up to 3 consumers' slot orders");
    m.def("silu_mul_slots", &silu_mul_slots, "fp16(silu(gate)) * up written in a consumer's slot order");
}
