// Row-blocked matrix-vector kernels for small batches: y[t, r] = dot(W[r, :], x[t, :]) + b[r] over a range of output
// rows, so that threads split a weight matrix by rows and each byte of W is read once per step. W is float32 or
// bfloat16 (widened to float32 in registers: half the bytes per step, float32 arithmetic); x, y and bias are float32.
#pragma once

#include <cstdint>
#include <cstring>

namespace fastgpt2 {

// A bfloat16 value (the top 16 bits of a float32), storage only.
struct bf16 {
  uint16_t bits;
};

inline float to_float(float v) { return v; }
inline float to_float(bf16 v) {
  const uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Round to nearest even, as torch's float32 -> bfloat16 conversion (NaN stays a quiet NaN).
inline bf16 to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{static_cast<uint16_t>((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16{static_cast<uint16_t>(u >> 16)};
}

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
