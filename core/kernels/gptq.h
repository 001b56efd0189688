// Launcher of the GPTQ block walk (gptq.cu), free of torch headers like exl2.h.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

// GPTQ arrays as core/convert/gptq.py holds them, all float32 on the device:
// work and steps [in_features, columns], errors [32, columns], factor (the upper
// inverse Cholesky factor) [in_features, in_features], scales and safe [columns],
// low and high [in_features, settings]; a column is (setting, output).
struct GptqBlock {
    float* work;
    float* steps;
    float* errors;
    const float* factor;
    const float* scales;
    const float* safe;
    const float* low;
    const float* high;
    int64_t in_features;
    int64_t settings;
    int64_t out_features;
    int64_t columns;
};

// Quantize rows first + [start, stop) of the block of rows first + [0, rows)
// (rows <= 32), each row's error moving the block's rows after it.
void gptq_block_launch(const GptqBlock& g, int64_t first, int rows, int start, int stop, cudaStream_t stream);
