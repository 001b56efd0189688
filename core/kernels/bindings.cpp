// Python entry points of the kernels in this folder: argument checks and
// streams here, the CUDA code behind plain launchers (exl2.h).
#include <torch/extension.h>
#include <limits>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "attention.h"
#include "exl2.h"
#include "fused.h"
#include "gptq.h"
#include "gptq4.h"

namespace {

void check(const torch::Tensor& t, torch::ScalarType dtype, const char* name) {
    TORCH_CHECK(t.is_cuda() && t.scalar_type() == dtype && t.is_contiguous(), name, ": expected a contiguous ",
                c10::toString(dtype), " CUDA tensor");
}

Exl2Layer layer_view(const torch::Tensor& q_weight, int64_t n, const torch::Tensor& q_scale,
                     const torch::Tensor& q_scale_max) {
    check(q_weight, torch::kInt32, "q_weight");
    check(q_scale, torch::kInt32, "q_scale");
    check(q_scale_max, torch::kHalf, "q_scale_max");
    TORCH_CHECK(q_weight.dim() == 2 && q_weight.size(1) % 32 == 0, "q_weight columns must be padded to a multiple of 32");
    TORCH_CHECK(n > 0 && n <= q_weight.size(1), "n must be within the packed columns");
    TORCH_CHECK(q_scale.dim() == 2 && q_scale.size(1) * 8 == q_weight.size(1) && q_scale_max.numel() == q_scale.size(0),
                "q_scale: [groups, n_pad / 8], q_scale_max: [groups]");
    Exl2Layer layer{};
    layer.q_weight = q_weight.data_ptr<int>();
    layer.q_scale = q_scale.data_ptr<int>();
    layer.q_scale_max = q_scale_max.data_ptr<at::Half>();
    layer.packed_rows = q_weight.size(0);
    layer.n_pad = q_weight.size(1);
    layer.n = n;
    return layer;
}

// What a product makes of its staged inputs (exl2.h, Exl2Input): up_slots (SwiGLU) or
// weight_slots with squares, eps and hidden (RMSNorm), one per layer, or neither.
Exl2Input staged_input(const std::vector<torch::Tensor>& up_slots, const std::vector<torch::Tensor>& weight_slots,
                       const c10::optional<torch::Tensor>& squares, double eps, int64_t hidden, size_t i,
                       const torch::Tensor& x_slots) {
    Exl2Input input{};
    if (!up_slots.empty()) {
        check(up_slots[i], torch::kHalf, "up_slots");
        TORCH_CHECK(up_slots[i].sizes() == x_slots.sizes(), "up_slots: the shape of x_slots");
        input.up_slots = up_slots[i].data_ptr<at::Half>();
    }
    if (!weight_slots.empty()) {
        check(weight_slots[i], torch::kHalf, "weight_slots");
        TORCH_CHECK(weight_slots[i].numel() == x_slots.size(1), "weight_slots: one weight per slot");
        input.weight_slots = weight_slots[i].data_ptr<at::Half>();
        input.squares = squares->data_ptr<float>();
        input.eps = (float)eps;
        input.hidden = (int)hidden;
    }
    return input;
}

// One launch for several layers that read the same input (q, k, v; gate, up), given in each
// layer's slot order (x_slots[i] fp16 [M <= 16, quads_i * 128]): list i of every argument
// describes layer i; a bias of no elements means none. The input may be finished while staged
// (staged_input). Each output is a new tensor, unless the layer's residual (residual[i], where
// that list is given and the tensor has elements) takes it: then it is fp16(output + residual),
// written into that residual, which is returned. Where routes are given, the output is also
// written in the slot orders of up to 3 consumers with each row's sum of squares added to
// squares_out[i] (fp32 [M], if it has elements): layer i has routes[i] of them, in order in the flat
// lists slot_of and slots_out (slots_out fp16 [M, slots], column c at slot slot_of[c]). A layer
// with routes and no residual returns no output of its own (no elements). The routes come as flat
// lists: taking them as a list of lists, every failed check after a non-empty one was converted
// ended the process on the H100 with a segmentation fault instead of raising (bench/history/KERNEL_NOTES.md v8).
std::vector<torch::Tensor> exl2_gemm_small(std::vector<torch::Tensor> x_slots, std::vector<torch::Tensor> units,
                                           std::vector<torch::Tensor> q_weight, std::vector<int64_t> n,
                                           std::vector<torch::Tensor> q_scale, std::vector<torch::Tensor> q_scale_max,
                                           std::vector<int64_t> slices, std::vector<int64_t> quads_per_slice,
                                           int64_t warps, torch::Tensor partial, std::vector<torch::Tensor> bias,
                                           std::vector<torch::Tensor> up_slots, std::vector<torch::Tensor> weight_slots,
                                           c10::optional<torch::Tensor> squares, double eps, int64_t hidden,
                                           std::vector<torch::Tensor> residual, std::vector<int64_t> routes,
                                           std::vector<torch::Tensor> slot_of, std::vector<torch::Tensor> slots_out,
                                           std::vector<torch::Tensor> squares_out) {
    check(partial, torch::kFloat, "partial");
    const size_t count = q_weight.size();
    TORCH_CHECK(count >= 1 && count <= (size_t)exl2_gemm_group_max(), "one launch takes 1 to ",
                exl2_gemm_group_max(), " layers");
    TORCH_CHECK(x_slots.size() == count && units.size() == count && n.size() == count && q_scale.size() == count &&
                q_scale_max.size() == count && slices.size() == count && quads_per_slice.size() == count &&
                bias.size() == count, "one entry per layer in every list");
    auto none_or_each = [count](size_t size) { return size == 0 || size == count; };
    TORCH_CHECK(none_or_each(up_slots.size()) && none_or_each(weight_slots.size()) && none_or_each(residual.size()) &&
                none_or_each(routes.size()) && none_or_each(squares_out.size()),
                "up_slots, weight_slots, residual, routes and squares_out: none, or one per layer");
    TORCH_CHECK(up_slots.empty() || weight_slots.empty(), "a product stages SwiGLU or a norm, not both");
    size_t all_routes = 0;
    for (int64_t r : routes) {
        TORCH_CHECK(r >= 0 && r <= EXL2_ROUTES_MOST, "routes: at most ", (int)EXL2_ROUTES_MOST, " a layer");
        all_routes += r;
    }
    TORCH_CHECK(slot_of.size() == all_routes && slots_out.size() == all_routes,
                "routes: one slot_of and one slots_out per route");
    if (!weight_slots.empty()) {
        TORCH_CHECK(squares.has_value() && hidden >= 1, "weight_slots need each row's squares and the norm's width");
        check(*squares, torch::kFloat, "squares");
    }
    TORCH_CHECK(warps >= 1 && warps <= exl2_gemm_warps_max(), "warps: 1 to ", exl2_gemm_warps_max(), " per block");
    for (const auto& slots : x_slots) check(slots, torch::kHalf, "x_slots");
    const int64_t rows = x_slots[0].dim() == 2 ? x_slots[0].size(0) : -1;
    TORCH_CHECK(rows >= 0 && rows <= 16, "x_slots: [M <= 16, quads * 128]");
    if (!weight_slots.empty()) TORCH_CHECK(squares->numel() >= rows, "squares: one per input row");
    std::vector<Exl2Product> products(count);
    std::vector<torch::Tensor> outs;
    size_t first_route = 0;
    for (size_t i = 0; i < count; ++i) {
        check(units[i], torch::kInt32, "units");
        Exl2Layer layer = layer_view(q_weight[i], n[i], q_scale[i], q_scale_max[i]);
        TORCH_CHECK(units[i].dim() == 2 && units[i].size(1) == 4 && units[i].size(0) % 4 == 0 && units[i].size(0) > 0,
                    "units: [quads * 4, 4]");
        const int64_t quads = units[i].size(0) / 4;
        TORCH_CHECK(x_slots[i].dim() == 2 && x_slots[i].size(0) == rows && x_slots[i].size(1) == quads * 128,
                    "x_slots: [M, quads * 128], the input in the layer's slot order");
        TORCH_CHECK(quads_per_slice[i] >= 1 && slices[i] >= 1 && (slices[i] - 1) * quads_per_slice[i] < quads &&
                    slices[i] * quads_per_slice[i] >= quads, "slices of quads_per_slice must cover the quads, none empty");
        const int64_t warp_quads = (quads_per_slice[i] + warps - 1) / warps;
        TORCH_CHECK(warp_quads <= exl2_gemm_warp_quads_max(), "at most ", exl2_gemm_warp_quads_max(),
                    " quads per warp: more slices or warps");
        TORCH_CHECK(warps * rows * (warp_quads * 128 + 32) * 2 <= 96 * 1024,
                    "the staged inputs of a block: at most 96 KiB");
        layer.units = units[i].data_ptr<int>();
        layer.quads = quads;
        const void* bias_ptr = nullptr;
        if (bias[i].numel() > 0) {
            check(bias[i], torch::kHalf, "bias");
            TORCH_CHECK(bias[i].numel() == n[i], "bias: [n]");
            bias_ptr = bias[i].data_ptr<at::Half>();
        }
        Exl2Output output{};
        output.routes = routes.empty() ? 0 : (int)routes[i];
        for (int r = 0; r < output.routes; ++r) {
            const torch::Tensor& of = slot_of[first_route + r];
            const torch::Tensor& to = slots_out[first_route + r];
            check(of, torch::kInt32, "slot_of");
            check(to, torch::kHalf, "slots_out");
            // Every entry of slot_of must lie within its slots (the caller builds it from the consumer's table).
            TORCH_CHECK(of.numel() == n[i] && to.dim() == 2 && to.size(0) == rows && to.size(1) >= n[i],
                        "routes: slot_of [n], slots_out [M, slots >= n]");
            output.slot_of[r] = of.data_ptr<int>();
            output.slots_out[r] = to.data_ptr<at::Half>();
            output.slots[r] = (int)to.size(1);
        }
        first_route += output.routes;
        if (!squares_out.empty() && squares_out[i].numel() > 0) {
            check(squares_out[i], torch::kFloat, "squares_out");
            TORCH_CHECK(squares_out[i].numel() >= rows, "squares_out: one per input row");
            output.squares = squares_out[i].data_ptr<float>();
        }
        if (!residual.empty() && residual[i].numel() > 0) {
            check(residual[i], torch::kHalf, "residual");
            TORCH_CHECK(residual[i].numel() == rows * n[i], "residual: [M, n]");
            output.residual = residual[i].data_ptr<at::Half>();
            outs.push_back(residual[i]);
        } else if (output.routes > 0) {
            outs.push_back(torch::empty({rows, 0}, x_slots[0].options()));
        } else {
            outs.push_back(torch::empty({rows, n[i]}, x_slots[0].options()));
            output.out = outs.back().data_ptr<at::Half>();
        }
        products[i] = Exl2Product{layer, (int)slices[i], (int)quads_per_slice[i], bias_ptr, x_slots[i].data_ptr<at::Half>(),
                                  staged_input(up_slots, weight_slots, squares, eps, hidden, i, x_slots[i]), output};
    }
    TORCH_CHECK((size_t)partial.numel() >= exl2_gemm_scratch(products.data(), count, rows),
                "partial: fp32 zeros for M * n sums of each split layer and one count per column tile");
    if (rows == 0) return outs;
    const c10::cuda::CUDAGuard guard(x_slots[0].device());
    exl2_gemm_group_launch(products.data(), count, rows, warps, partial.data_ptr<float>(),
                           c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return outs;
}

// row_of (int32 [k], or no elements): the output row of each act-order row.
torch::Tensor exl2_dequant(torch::Tensor q_weight, int64_t n, torch::Tensor q_scale, torch::Tensor q_scale_max,
                           torch::Tensor groups, int64_t k, torch::Tensor row_of) {
    Exl2Layer layer = layer_view(q_weight, n, q_scale, q_scale_max);
    check(groups, torch::kInt32, "groups");
    TORCH_CHECK(groups.dim() == 2 && groups.size(1) == 4 && q_scale.size(0) == groups.size(0), "groups: [G, 4], one per q_scale row");
    const int* row_of_ptr = nullptr;
    if (row_of.numel() > 0) {
        check(row_of, torch::kInt32, "row_of");
        TORCH_CHECK(row_of.numel() == k, "row_of: one output row per input row");
        row_of_ptr = row_of.data_ptr<int>();
    }
    layer.groups = groups.data_ptr<int>();
    const c10::cuda::CUDAGuard guard(q_weight.device());
    auto out = torch::empty({k, n}, q_weight.options().dtype(torch::kHalf));
    exl2_dequant_launch(layer, groups.size(0), row_of_ptr, out.data_ptr<at::Half>(), c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
}

void gptq_block(torch::Tensor work, torch::Tensor steps, torch::Tensor errors, torch::Tensor factor,
                torch::Tensor scales, torch::Tensor safe, torch::Tensor low, torch::Tensor high, int64_t first,
                int64_t end, int64_t start, int64_t stop) {
    for (const auto* t : {&work, &steps, &errors, &factor, &scales, &safe, &low, &high}) check(*t, torch::kFloat, "gptq_block");
    TORCH_CHECK(work.dim() == 3 && steps.sizes() == work.sizes(), "work, steps: [in, settings, out]");
    TORCH_CHECK(0 <= first && first <= start && start <= stop && stop <= end && end - first <= 32 && end <= work.size(0),
                "gptq_block: rows first <= start <= stop <= end <= first + 32");
    const int64_t columns = work.size(1) * work.size(2);
    TORCH_CHECK(errors.numel() >= 32 * columns && scales.numel() == columns && safe.numel() == columns,
                "gptq_block: errors [32, columns], scales and safe [columns]");
    TORCH_CHECK(factor.size(0) == work.size(0) && factor.size(1) == work.size(0), "gptq_block: factor [in, in]");
    TORCH_CHECK(low.sizes() == high.sizes() && low.size(0) == work.size(0) && low.size(1) == work.size(1),
                "gptq_block: low and high [in, settings]");
    GptqBlock g{work.data_ptr<float>(), steps.data_ptr<float>(), errors.data_ptr<float>(), factor.data_ptr<float>(),
                scales.data_ptr<float>(), safe.data_ptr<float>(), low.data_ptr<float>(), high.data_ptr<float>(),
                work.size(0), work.size(1), work.size(2), columns};
    if (start == stop || columns == 0) return;
    const c10::cuda::CUDAGuard guard(work.device());
    gptq_block_launch(g, first, int(end - first), int(start - first), int(stop - first), c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void gptq_scale_search(torch::Tensor work, int64_t first_row, int64_t rows, torch::Tensor settings, torch::Tensor slots,
                       torch::Tensor maxq, torch::Tensor stretch, torch::Tensor scale_codes, torch::Tensor scale_maxes,
                       torch::Tensor scales, torch::Tensor safe, c10::optional<torch::Tensor> slot_scales) {
    for (const auto* t : {&work, &maxq, &stretch, &scales, &safe}) check(*t, torch::kFloat, "gptq_scale_search");
    check(settings, torch::kLong, "settings");
    check(slots, torch::kLong, "slots");
    check(scale_codes, torch::kByte, "scale_codes");
    check(scale_maxes, torch::kHalf, "scale_maxes");
    TORCH_CHECK(work.dim() == 3, "gptq_scale_search: work [in, settings, out]");
    const int64_t out = work.size(2), k = settings.numel();
    TORCH_CHECK(0 <= first_row && 0 < rows && first_row + rows <= work.size(0), "gptq_scale_search: rows within work");
    TORCH_CHECK(slots.numel() == k && maxq.numel() == k && stretch.numel() == GPTQ_SEARCH_GRID,
                "gptq_scale_search: one slot and maxq per setting, a grid of ", GPTQ_SEARCH_GRID, " stretches");
    TORCH_CHECK(scale_codes.dim() == 2 && scale_codes.size(1) == out && scale_maxes.numel() == scale_codes.size(0),
                "gptq_scale_search: scale_codes [groups, out], scale_maxes [groups]");
    TORCH_CHECK(scales.sizes() == safe.sizes() && scales.dim() == 2 && scales.size(0) == work.size(1) && scales.size(1) == out,
                "gptq_scale_search: scales and safe [settings, out]");
    float* slot_scales_ptr = nullptr;
    if (slot_scales.has_value()) {
        check(*slot_scales, torch::kFloat, "slot_scales");
        TORCH_CHECK(slot_scales->sizes() == scale_codes.sizes(), "gptq_scale_search: slot_scales [groups, out]");
        slot_scales_ptr = slot_scales->data_ptr<float>();
    }
    if (k == 0 || out == 0) return;
    const c10::cuda::CUDAGuard guard(work.device());
    const int64_t chunks = gptq_scale_search_chunks(out);
    auto base = torch::empty({k, out}, work.options());
    auto chunk_max = torch::empty({k, chunks}, work.options());
    auto partial = torch::empty({k, chunks, gptq_scale_search_slots()}, work.options().dtype(torch::kDouble));
    GptqScaleSearch s{work.data_ptr<float>(), work.size(1), out, first_row, int(rows), int(k),
                      settings.data_ptr<int64_t>(), slots.data_ptr<int64_t>(), maxq.data_ptr<float>(),
                      stretch.data_ptr<float>(), scale_codes.data_ptr<uint8_t>(), scale_maxes.data_ptr<at::Half>(),
                      scales.data_ptr<float>(), safe.data_ptr<float>(), slot_scales_ptr, base.data_ptr<float>(),
                      chunk_max.data_ptr<float>(), partial.data_ptr<double>()};
    gptq_scale_search_launch(s, c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

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

Gptq4Layer gptq4_view(const torch::Tensor& qweight, const torch::Tensor& qzeros, const torch::Tensor& scales,
                      int64_t zero_offset) {
    check(qweight, torch::kInt32, "qweight");
    check(qzeros, torch::kInt32, "qzeros");
    check(scales, torch::kHalf, "scales");
    TORCH_CHECK(qweight.dim() == 2 && qweight.size(1) % 8 == 0, "qweight: [k / 8, n] with n a multiple of 8");
    const int64_t n = qweight.size(1);
    TORCH_CHECK(scales.dim() == 2 && scales.size(1) == n && scales.size(0) > 0, "scales: [groups, n]");
    TORCH_CHECK(qzeros.dim() == 2 && qzeros.size(0) == scales.size(0) && qzeros.size(1) == n / 8,
                "qzeros: [groups, n / 8]");
    TORCH_CHECK(zero_offset == 0 || zero_offset == 1, "zero_offset: 0 (gptq_v2) or 1 (gptq)");
    Gptq4Layer layer{};
    layer.qweight = qweight.data_ptr<int>();
    layer.qzeros = qzeros.data_ptr<int>();
    layer.scales = scales.data_ptr<at::Half>();
    layer.k = qweight.size(0) * 8;
    layer.n = n;
    layer.zero_offset = zero_offset;
    return layer;
}

torch::Tensor gptq4_gemm_small(torch::Tensor x, torch::Tensor perm, torch::Tensor qweight, torch::Tensor qzeros,
                               torch::Tensor scales, int64_t zero_offset, torch::Tensor segments, torch::Tensor slices,
                               int64_t max_slice_rows, int64_t threads, bool prefetch, bool async_copy,
                               torch::Tensor partial, c10::optional<torch::Tensor> bias) {
    Gptq4Layer layer = gptq4_view(qweight, qzeros, scales, zero_offset);
    check(x, torch::kHalf, "x");
    check(perm, torch::kInt32, "perm");
    check(segments, torch::kInt32, "segments");
    check(slices, torch::kInt32, "slices");
    check(partial, torch::kFloat, "partial");
    TORCH_CHECK(x.dim() == 2 && x.size(1) == layer.k && perm.numel() == layer.k, "x: [M, K] with K = the layer's inputs");
    TORCH_CHECK(threads % 32 == 0 && threads > 0 && threads <= 1024, "threads: a multiple of 32, at most 1024");
    TORCH_CHECK(segments.dim() == 2 && segments.size(1) == 4, "segments: [S, 4]");
    TORCH_CHECK(slices.dim() == 2 && slices.size(1) == 4 && slices.size(0) > 0, "slices: [L, 4]");
    // Inputs of up to 8 rows, and with async_copy the block's weights, in the 48 KiB every GPU gives a block.
    TORCH_CHECK(max_slice_rows > 0 && max_slice_rows * 16 * (8 + (async_copy ? threads : 0)) <= 48 * 1024,
                "max_slice_rows: the staged inputs (and weights) fit 48 KiB");
    TORCH_CHECK(partial.numel() >= std::min<int64_t>(x.size(0), 8) * layer.n + gptq4_gemm_small_tiles(layer, threads),
                "partial: fp32 zeros for min(M, 8) * n sums and one count per column tile");
    const void* bias_ptr = nullptr;
    if (bias.has_value()) {
        check(*bias, torch::kHalf, "bias");
        TORCH_CHECK(bias->numel() == layer.n, "bias: [n]");
        bias_ptr = bias->data_ptr<at::Half>();
    }
    layer.perm = perm.data_ptr<int>();
    layer.segments = segments.data_ptr<int>();
    layer.slices = slices.data_ptr<int>();
    const c10::cuda::CUDAGuard guard(x.device());
    auto out = torch::empty({x.size(0), layer.n}, x.options());
    if (x.size(0) == 0) return out;
    gptq4_gemm_small_launch(layer, x.data_ptr<at::Half>(), x.size(0), max_slice_rows, slices.size(0), threads,
                            prefetch, async_copy, partial.data_ptr<float>(), bias_ptr, out.data_ptr<at::Half>(),
                            c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
}

torch::Tensor gptq4_dequant(torch::Tensor qweight, torch::Tensor qzeros, torch::Tensor scales, torch::Tensor row_group,
                            int64_t zero_offset) {
    Gptq4Layer layer = gptq4_view(qweight, qzeros, scales, zero_offset);
    check(row_group, torch::kInt32, "row_group");
    TORCH_CHECK(row_group.numel() == layer.k, "row_group: one group per input row");
    layer.row_group = row_group.data_ptr<int>();
    const c10::cuda::CUDAGuard guard(qweight.device());
    auto out = torch::empty({layer.k, layer.n}, qweight.options().dtype(torch::kHalf));
    if (layer.k == 0) return out;
    gptq4_dequant_launch(layer, out.data_ptr<at::Half>(), c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("exl2_gemm_small", &exl2_gemm_small, "EXL2 products of a few input rows by 1-3 layers in one launch, reading the packed weights",
          py::arg("x_slots"), py::arg("units"), py::arg("q_weight"), py::arg("n"), py::arg("q_scale"),
          py::arg("q_scale_max"), py::arg("slices"), py::arg("quads_per_slice"), py::arg("warps"), py::arg("partial"),
          py::arg("bias"), py::arg("up_slots") = std::vector<torch::Tensor>{},
          py::arg("weight_slots") = std::vector<torch::Tensor>{}, py::arg("squares") = py::none(),
          py::arg("eps") = 0.0, py::arg("hidden") = 0, py::arg("residual") = std::vector<torch::Tensor>{},
          py::arg("routes") = std::vector<int64_t>{}, py::arg("slot_of") = std::vector<torch::Tensor>{},
          py::arg("slots_out") = std::vector<torch::Tensor>{}, py::arg("squares_out") = std::vector<torch::Tensor>{});
    m.def("exl2_dequant", &exl2_dequant, "EXL2 weight to fp16 [K, N], rows in act-order");
    m.def("rms_norm", &rms_norm, "RMSNorm of fp16 rows, optionally after adding a residual into x",
          py::arg("x"), py::arg("weight"), py::arg("eps"), py::arg("residual") = py::none());
    m.def("rope_cache", &rope_cache, "Rotary embedding of one token's q (in place) and k, appended with v to the caches");
    m.def("rope_cache_rows", &rope_cache_rows, "Rotary embedding of a prompt's q (in place) and k, written with v into the caches");
    m.def("silu_mul", &silu_mul, "fp16(silu(gate)) * up");
    m.def("rms_norm_takes_slots", &rms_norm_takes_slots, "Whether rms_norm_slots takes rows of this width");
    m.def("rms_norm_slots", &rms_norm_slots, "x + residual (new), its RMSNorm, and that also in up to 3 consumers' slot orders");
    m.def("silu_mul_slots", &silu_mul_slots, "fp16(silu(gate)) * up written in a consumer's slot order");
    m.def("decode_attention", &decode_attention, "One token's rope, cache append and attention over the key/value cache (batch 1)",
          py::arg("q"), py::arg("k"), py::arg("v"), py::arg("cos_table"), py::arg("sin_table"), py::arg("position"),
          py::arg("key_cache"), py::arg("value_cache"), py::arg("length"), py::arg("window"), py::arg("scratch"),
          py::arg("slot_of") = py::none(), py::arg("slots_out") = py::none());
    m.def("decode_attention_scratch", &decode_attention_scratch, "Floats of scratch decode_attention needs (its last `heads` zero)");
    m.def("gptq_block", &gptq_block, "GPTQ's row walk inside one block of at most 32 input rows");
    m.def("gptq_scale_search", &gptq_scale_search, "GPTQ's scale search of one group start for several settings");
    m.def("gptq4_gemm_small", &gptq4_gemm_small, "GPTQ 4-bit product for a few input rows, reading qweight directly");
    m.def("gptq4_dequant", &gptq4_dequant, "GPTQ 4-bit weight to fp16 [K, N], rows in stored (group) order");
}
