// Python entry points of the EXL2 products (exl2.h): argument checks and
// streams here, the CUDA code behind plain launchers.
#include "bindings.h"

#include <vector>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "exl2.h"

namespace {

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

}  // namespace

void bind_exl2(pybind11::module_& m) {
    m.def("exl2_gemm_small", &exl2_gemm_small, "EXL2 products of a few input rows by 1-3 layers in one launch, reading the packed weights",
          py::arg("x_slots"), py::arg("units"), py::arg("q_weight"), py::arg("n"), py::arg("q_scale"),
          py::arg("q_scale_max"), py::arg("slices"), py::arg("quads_per_slice"), py::arg("warps"), py::arg("partial"),
          py::arg("bias"), py::arg("up_slots") = std::vector<torch::Tensor>{},
          py::arg("weight_slots") = std::vector<torch::Tensor>{}, py::arg("squares") = py::none(),
          py::arg("eps") = 0.0, py::arg("hidden") = 0, py::arg("residual") = std::vector<torch::Tensor>{},
          py::arg("routes") = std::vector<int64_t>{}, py::arg("slot_of") = std::vector<torch::Tensor>{},
          py::arg("slots_out") = std::vector<torch::Tensor>{}, py::arg("squares_out") = std::vector<torch::Tensor>{});
    m.def("exl2_dequant", &exl2_dequant, "EXL2 weight to fp16 [K, N], rows in act-order");
}
