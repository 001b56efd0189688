// What the binding files of each kernel family share: the argument check, and the
// functions that add each family's entry points to the one extension module (bindings.cpp).
#pragma once

#include <torch/extension.h>

inline void check(const torch::Tensor& t, torch::ScalarType dtype, const char* name) {
    TORCH_CHECK(t.is_cuda() && t.scalar_type() == dtype && t.is_contiguous(), name, ": expected a contiguous ",
                c10::toString(dtype), " CUDA tensor");
}

void bind_exl2(pybind11::module_& m);
void bind_gptq(pybind11::module_& m);
void bind_fused(pybind11::module_& m);
void bind_attention(pybind11::module_& m);
void bind_exl3(pybind11::module_& m);
