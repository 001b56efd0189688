// Launchers of the GPTQ block walk and scale search (gptq.cu), free of torch headers like exl2.h.
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

// The scale search of one group start (_choose_scales in core/convert/gptq.py)
// for k settings at once, writing its results where _gptq_rows keeps them.
// work is [in_features, settings, out_features] float32; the groups are rows
// [first_row, first_row + rows) of the settings in `settings`; maxq [k] is each
// one's 2^bits - 1; stretch holds the SCALE_SEARCH_STEPS + 1 grid values.
struct GptqScaleSearch {
    const float* work;
    int64_t settings_total;
    int64_t out_features;
    int64_t first_row;
    int rows;
    int k;
    const int64_t* settings;
    const int64_t* slots;
    const float* maxq;
    const float* stretch;
    uint8_t* scale_codes;     // [groups, out]
    void* scale_maxes;        // fp16 [groups]
    float* scales;            // [settings, out]
    float* safe;              // [settings, out]
    float* slot_scales;       // [groups, out] or null
    // Workspace: base [k, out], per-chunk maxima [k, chunks], per-chunk error sums [k, chunks, 27].
    float* base;
    float* chunk_max;
    double* partial;
};

constexpr int GPTQ_SEARCH_GRID = 97;      // SCALE_SEARCH_STEPS + 1
constexpr int GPTQ_SEARCH_STEP = 8;       // _COARSE_STEP
constexpr int GPTQ_SEARCH_THREADS = 128;  // columns per chunk
int gptq_scale_search_chunks(int64_t out_features);
constexpr int gptq_scale_search_slots() { return (GPTQ_SEARCH_GRID + GPTQ_SEARCH_STEP - 1) / GPTQ_SEARCH_STEP + 2 * (GPTQ_SEARCH_STEP - 1); }
void gptq_scale_search_launch(const GptqScaleSearch& s, cudaStream_t stream);
