// The one extension module of the kernels in this folder: each family's entry points
// (argument checks and streams) live in its bindings_<family>.cpp.
#include "bindings.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    bind_exl2(m);
    bind_fused(m);
    bind_attention(m);
    bind_gptq(m);
    bind_exl3(m);
}
