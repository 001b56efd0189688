// Python entry points of the kernels in this folder: argument checks and
// streams here, the CUDA code behind plain launchers (exl2.h).
#include <torch/extension.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "exl2.h"
#include "gptq.h"

namespace {

void check(const torch::Tensor& t, torch::ScalarType dtype, const char* name) {
    TORCH_CHECK(t.is_cuda() && t.scalar_type() == dtype && t.is_contiguous(), name, ": expected a contiguous ",
                c10::toString(dtype), " CUDA tensor");
}

Exl2Layer layer_view(const torch::Tensor& q_weight, int64_t n, const torch::Tensor& q_scale,
                     const torch::Tensor& q_scale_max, const torch::Tensor& groups, const torch::Tensor* slices,
                     const torch::Tensor* perm) {
    check(q_weight, torch::kInt32, "q_weight");
    check(q_scale, torch::kInt32, "q_scale");
    check(q_scale_max, torch::kHalf, "q_scale_max");
    check(groups, torch::kInt32, "groups");
    TORCH_CHECK(q_weight.dim() == 2 && q_weight.size(1) % 32 == 0, "q_weight columns must be padded to a multiple of 32");
    TORCH_CHECK(n > 0 && n <= q_weight.size(1), "n must be within the packed columns");
    TORCH_CHECK(groups.dim() == 2 && groups.size(1) == 4 && q_scale.size(0) == groups.size(0), "groups: [G, 4], one per q_scale row");
    Exl2Layer layer{};
    layer.q_weight = q_weight.data_ptr<int>();
    layer.q_scale = q_scale.data_ptr<int>();
    layer.q_scale_max = q_scale_max.data_ptr<at::Half>();
    layer.groups = groups.data_ptr<int>();
    layer.slices = slices ? slices->data_ptr<int>() : nullptr;
    layer.perm = perm ? perm->data_ptr<int>() : nullptr;
    layer.packed_rows = q_weight.size(0);
    layer.n_pad = q_weight.size(1);
    layer.n = n;
    return layer;
}

torch::Tensor exl2_gemm_small(torch::Tensor x, torch::Tensor perm, torch::Tensor q_weight, int64_t n,
                              torch::Tensor q_scale, torch::Tensor q_scale_max, torch::Tensor groups,
                              torch::Tensor slices, int64_t max_slice_rows, int64_t threads,
                              torch::Tensor partial, c10::optional<torch::Tensor> bias) {
    check(x, torch::kHalf, "x");
    check(perm, torch::kInt32, "perm");
    check(slices, torch::kInt32, "slices");
    check(partial, torch::kFloat, "partial");
    TORCH_CHECK(x.dim() == 2 && perm.numel() == x.size(1), "x: [M, K] with K = the layer's inputs");
    TORCH_CHECK(partial.numel() >= x.size(0) * n, "partial: fp32 scratch of at least M * n");
    TORCH_CHECK(threads % 32 == 0 && threads <= 1024, "threads: a multiple of 32");
    Exl2Layer layer = layer_view(q_weight, n, q_scale, q_scale_max, groups, &slices, &perm);
    const void* bias_ptr = nullptr;
    if (bias.has_value()) {
        check(*bias, torch::kHalf, "bias");
        bias_ptr = bias->data_ptr<at::Half>();
    }
    const c10::cuda::CUDAGuard guard(x.device());
    auto out = torch::empty({x.size(0), n}, x.options());
    if (x.size(0) == 0) return out;
    exl2_gemm_small_launch(layer, x.data_ptr<at::Half>(), x.size(0), x.size(1), max_slice_rows, slices.numel() - 1,
                           threads, partial.data_ptr<float>(), bias_ptr, out.data_ptr<at::Half>(),
                           c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
}

torch::Tensor exl2_dequant(torch::Tensor q_weight, int64_t n, torch::Tensor q_scale, torch::Tensor q_scale_max,
                           torch::Tensor groups, int64_t k) {
    Exl2Layer layer = layer_view(q_weight, n, q_scale, q_scale_max, groups, nullptr, nullptr);
    const c10::cuda::CUDAGuard guard(q_weight.device());
    auto out = torch::empty({k, n}, q_weight.options().dtype(torch::kHalf));
    exl2_dequant_launch(layer, groups.size(0), out.data_ptr<at::Half>(), c10::cuda::getCurrentCUDAStream());
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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("exl2_gemm_small", &exl2_gemm_small, "EXL2 product for a few input rows, reading the packed weights");
    m.def("exl2_dequant", &exl2_dequant, "EXL2 weight to fp16 [K, N], rows in act-order");
    m.def("gptq_block", &gptq_block, "GPTQ's row walk inside one block of at most 32 input rows");
}
