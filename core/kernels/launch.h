// Chained launches: programmatic dependent launch (sm_90 and newer).
//
// A decode step is a chain of short kernels, each waiting for the one before.
// Launched with programmatic stream serialization, a kernel's blocks may start
// while the previous kernel is still finishing, and do their independent work
// (reading weights and tables) before `wait_for_producer()`, which returns once
// the previous kernel has completed and its writes are visible. The rule that
// keeps this safe: before that wait a kernel reads only data no kernel writes
// and writes nothing. Older GPUs, and QUANTLAB_PDL=0, launch plainly; the device
// functions compile to nothing there.
#pragma once
#include <cuda_runtime.h>
#include <cstdlib>
#include <cstring>
#include <utility>

#ifdef __CUDACC__
__device__ __forceinline__ void wait_for_producer() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Lets the next chained kernel's blocks be scheduled as this one's retire.
__device__ __forceinline__ void allow_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
#endif

inline bool chained_launch_supported() {
    static const bool switched_off = [] {
        const char* value = std::getenv("QUANTLAB_PDL");
        return value != nullptr && std::strcmp(value, "0") == 0;
    }();
    if (switched_off) return false;
    constexpr int MOST_DEVICES = 64;
    static int known[MOST_DEVICES] = {};  // 0: not asked yet, 1: yes, 2: no
    int device = 0;
    if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= MOST_DEVICES) return false;
    if (known[device] == 0) {
        int major = 0;
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
        known[device] = major >= 9 ? 1 : 2;
    }
    return known[device] == 1;
}

template <typename... Params, typename... Args>
void launch_chained(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream,
                    Args&&... args) {
    cudaLaunchConfig_t config{};
    config.gridDim = grid;
    config.blockDim = block;
    config.dynamicSmemBytes = shared_bytes;
    config.stream = stream;
    cudaLaunchAttribute attribute[1];
    attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attribute[0].val.programmaticStreamSerializationAllowed = 1;
    config.attrs = attribute;
    config.numAttrs = chained_launch_supported() ? 1 : 0;
    cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}
