// Python entry points of GPTQ: the converter's block walk and scale search
// (gptq.h) and the 4-bit products of GPTQ checkpoints (gptq4.h). Argument
// checks and streams here, the CUDA code behind plain launchers.
#include "bindings.h"

#include <algorithm>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "gptq.h"
#include "gptq4.h"

namespace {

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

void bind_gptq(pybind11::module_& m) {
    m.def("gptq_block", &gptq_block, "GPTQ's row walk inside one block of at most 32 input rows");
    m.def("gptq_scale_search", &gptq_scale_search, "GPTQ's scale search of one group start for several settings");
    m.def("gptq4_gemm_small", &gptq4_gemm_small, "GPTQ 4-bit product for a few input rows, reading qweight directly");
    m.def("gptq4_dequant", &gptq4_dequant, "GPTQ 4-bit weight to fp16 [K, N], rows in stored (group) order");
}
