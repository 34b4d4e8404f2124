// Row-blocked matrix-vector kernels for small batches: y[t, r] = dot(W[r, :], x[t, :]) + b[r] over a range of output
// rows, so that threads split a weight matrix by rows and each byte of W is read once per step. W is float32 or
// bfloat16 (widened to float32 in registers: half the bytes per step, float32 arithmetic); x, y and bias are float32.
#pragma once

#include <cstdint>

#include "simd.h"  // bf16

namespace fastgpt2 {

enum class Epilogue {
  kStore,       // y = W x + b
  kGelu,        // y = gelu_tanh(W x + b)
  kAccumulate,  // y += W x + b (the residual add)
};

// W: (N, K) row-major (float or bf16) with K a multiple of 8; x: (T, K) with row stride ldx; y: (T, N) with row
// stride ldy. Computes rows [row_begin, row_end) of every token t < num_tokens. bias may be null.
template <typename W>
void linear_rows(const W* weight, const float* bias, const float* x, int64_t ldx, float* y, int64_t ldy,
                 int64_t num_tokens, int64_t K, int64_t row_begin, int64_t row_end, Epilogue epilogue);

// LayerNorm of one row of n floats (biased variance, as torch).
void layer_norm_row(const float* x, const float* weight, const float* bias, float* out, int64_t n, float eps);

}  // namespace fastgpt2
