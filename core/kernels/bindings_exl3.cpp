// Python entry points of the EXL3 kernels (exl3.h): argument checks and streams here, the CUDA
// code behind plain launchers. Shapes and orders: ../shared/EXL3.md sections 2-4.
#include "bindings.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "exl3.h"

namespace {

void check_codebook(int64_t codebook) {
    TORCH_CHECK(codebook == EXL3_CB_3INST || codebook == EXL3_CB_MCG || codebook == EXL3_CB_MUL1,
                "codebook: 0 (3INST), 1 (MCG) or 2 (MUL1), not ", codebook);
}

// trellis int16 [k / 16, n / 16, 16 K] -> fp16 [k, n], the rotated weight W_r in matrix order.
torch::Tensor exl3_decode(const torch::Tensor& trellis, int64_t codebook) {
    check(trellis, torch::kShort, "trellis");
    check_codebook(codebook);
    TORCH_CHECK(trellis.dim() == 3, "trellis: [k / 16, n / 16, 16 K]");
    const int64_t words = trellis.size(2);
    TORCH_CHECK(words % 8 == 0 && words >= 16 && words <= 128, "trellis: 16 K words a tile, K = 1 to 8 in halves, not ",
                words, " words");
    TORCH_CHECK(reinterpret_cast<uintptr_t>(trellis.data_ptr()) % 4 == 0, "trellis: 4-byte aligned");
    const c10::cuda::CUDAGuard guard(trellis.device());
    auto out = torch::empty({trellis.size(0) * 16, trellis.size(1) * 16}, trellis.options().dtype(torch::kHalf));
    exl3_decode_launch(trellis.data_ptr<int16_t>(), (int)trellis.size(0), (int)trellis.size(1), (int)words,
                       (int)codebook, out.data_ptr<at::Half>(), c10::cuda::getCurrentCUDAStream());
    return out;
}

const void* scale_pointer(const c10::optional<torch::Tensor>& scale, int64_t dim, const char* name) {
    if (!scale.has_value() || scale->numel() == 0) return nullptr;
    check(*scale, torch::kHalf, name);
    TORCH_CHECK(scale->numel() == dim, name, ": one fp16 scale per column of x");
    TORCH_CHECK(reinterpret_cast<uintptr_t>(scale->data_ptr()) % 8 == 0, name, ": 8-byte aligned");
    return scale->data_ptr<at::Half>();
}

// x [..., dim] (fp16, or fp32 without pre_scale; dim a multiple of 128) -> fp16(fp16(had128(x * pre_scale)) *
// post_scale) over each 128-block, into out (fp16, x's shape; may be x itself) or a new fp16 tensor.
torch::Tensor exl3_hadamard(const torch::Tensor& x, const c10::optional<torch::Tensor>& pre_scale,
                            const c10::optional<torch::Tensor>& post_scale, const c10::optional<torch::Tensor>& out) {
    const bool x_fp32 = x.scalar_type() == torch::kFloat;
    check(x, x_fp32 ? torch::kFloat : torch::kHalf, "x");
    TORCH_CHECK(x.dim() >= 1 && x.size(-1) % 128 == 0, "x: [..., dim], dim a multiple of 128");
    TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % (x_fp32 ? 16 : 8) == 0, "x: aligned to 4 elements");
    const int64_t dim = x.size(-1);
    TORCH_CHECK(x.numel() / 128 <= INT32_MAX, "x: too many 128-blocks for one launch");
    const void* pre = scale_pointer(pre_scale, dim, "pre_scale");
    TORCH_CHECK(pre == nullptr || !x_fp32, "pre_scale: an fp16 multiply, for fp16 x only");
    const c10::cuda::CUDAGuard guard(x.device());
    torch::Tensor result;
    if (out.has_value()) {
        check(*out, torch::kHalf, "out");
        TORCH_CHECK(out->sizes() == x.sizes(), "out: the shape of x");
        TORCH_CHECK(reinterpret_cast<uintptr_t>(out->data_ptr()) % 8 == 0, "out: 8-byte aligned");
        result = *out;
    } else {
        result = torch::empty(x.sizes(), x.options().dtype(torch::kHalf));
    }
    exl3_hadamard_launch(x.data_ptr(), x_fp32, (int)(x.numel() / dim), (int)dim, pre,
                         scale_pointer(post_scale, dim, "post_scale"), result.data_ptr<at::Half>(),
                         c10::cuda::getCurrentCUDAStream());
    return result;
}

// fp32 values [tiles, 256] (position order) -> int32 states [tiles, 256] of the best tail-biting ring
// at K = bits_x2 / 2 bits a weight, as core/convert/exl3/trellis.py encode_tiles finds it.
torch::Tensor exl3_viterbi(const torch::Tensor& values, int64_t bits_x2, int64_t codebook) {
    check(values, torch::kFloat, "values");
    check_codebook(codebook);
    TORCH_CHECK(values.dim() == 2 && values.size(1) == 256, "values: [tiles, 256]");
    TORCH_CHECK(bits_x2 >= 2 && bits_x2 <= 16, "bits_x2: twice K, 2 (K = 1) to 16 (K = 8)");
    TORCH_CHECK(values.size(0) <= INT32_MAX, "values: too many tiles for one launch");
    const c10::cuda::CUDAGuard guard(values.device());
    const int tiles = (int)values.size(0);
    auto states = torch::empty({values.size(0), 256}, values.options().dtype(torch::kInt));
    auto scratch = torch::empty({(int64_t)exl3_viterbi_scratch_bytes(tiles)}, values.options().dtype(torch::kByte));
    exl3_viterbi_launch(values.data_ptr<float>(), tiles, (int)bits_x2, (int)codebook, states.data_ptr<int32_t>(),
                        scratch.data_ptr(), c10::cuda::getCurrentCUDAStream());
    return states;
}

// fp16 x [rows <= 8, k] @ W_r (decoded on the fly from trellis int16 [k / 16, n / 16, 16 K]) -> fp32 [rows, n],
// k cut into splits of tiles_per_split tile rows (at most 64).
torch::Tensor exl3_gemv(const torch::Tensor& x, const torch::Tensor& trellis, int64_t codebook, int64_t tiles_per_split) {
    check(x, torch::kHalf, "x");
    check(trellis, torch::kShort, "trellis");
    check_codebook(codebook);
    TORCH_CHECK(trellis.dim() == 3 && trellis.size(2) % 8 == 0 && trellis.size(2) >= 16 && trellis.size(2) <= 128,
                "trellis: [k / 16, n / 16, 16 K], K = 1 to 8 in halves");
    TORCH_CHECK(reinterpret_cast<uintptr_t>(trellis.data_ptr()) % 4 == 0, "trellis: 4-byte aligned");
    TORCH_CHECK(x.dim() == 2 && x.size(0) <= EXL3_GEMV_ROWS_MOST && x.size(1) == trellis.size(0) * 16,
                "x: [rows <= ", EXL3_GEMV_ROWS_MOST, ", k]");
    TORCH_CHECK(tiles_per_split >= 1 && tiles_per_split <= EXL3_GEMV_SPLIT_TILES_MOST, "tiles_per_split: 1 to ",
                EXL3_GEMV_SPLIT_TILES_MOST);
    const c10::cuda::CUDAGuard guard(x.device());
    auto out = torch::zeros({x.size(0), trellis.size(1) * 16}, x.options().dtype(torch::kFloat));
    exl3_gemv_launch(x.data_ptr<at::Half>(), (int)x.size(0), trellis.data_ptr<int16_t>(), (int)trellis.size(0),
                     (int)trellis.size(1), (int)trellis.size(2), (int)codebook, (int)tiles_per_split,
                     out.data_ptr<float>(), c10::cuda::getCurrentCUDAStream());
    return out;
}

}  // namespace

void bind_exl3(pybind11::module_& m) {
    m.def("exl3_decode", &exl3_decode, "EXL3 trellis [k/16, n/16, 16K] to the fp16 rotated weight [k, n]",
          py::arg("trellis"), py::arg("codebook"));
    m.def("exl3_hadamard", &exl3_hadamard, "128-block Hadamard of fp16 (or fp32) rows to fp16, with optional fp16 scales before and after",
          py::arg("x"), py::arg("pre_scale") = py::none(), py::arg("post_scale") = py::none(),
          py::arg("out") = py::none());
    m.def("exl3_viterbi", &exl3_viterbi, "EXL3 trellis search: fp32 tile values [tiles, 256] to int32 states",
          py::arg("values"), py::arg("bits_x2"), py::arg("codebook"));
    m.def("exl3_gemv", &exl3_gemv, "fp16 rows (at most 8) times the EXL3 rotated weight, decoded on the fly, to fp32",
          py::arg("x"), py::arg("trellis"), py::arg("codebook"), py::arg("tiles_per_split"));
}
