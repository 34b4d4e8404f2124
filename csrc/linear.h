// Shared pieces of the CPU step's layers: the epilogues fused into the packed GEMM (packed_gemm.h) and LayerNorm.
#pragma once

#include <cstdint>

namespace fastgpt2 {

enum class Epilogue {
  kStore,       // y = W x + b
  kGelu,        // y = gelu_tanh(W x + b)
  kAccumulate,  // y += W x + b (the residual add)
  kArgmax,      // nothing stored: per token, the column of the largest W x + b (packed_argmax)
};

// LayerNorm of one row of n floats (biased variance, as torch). Per row, the same operations whatever else is in the
// step.
void layer_norm_row(const float* x, const float* weight, const float* bias, float* out, int64_t n, float eps);

}  // namespace fastgpt2
