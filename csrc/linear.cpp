// Matrix-vector kernels of the CPU decode step. Memory traffic: each weight row is read once per call and reused
// across up to two tokens from registers; x rows stay in L1. With AVX2+FMA a block of 4 rows x 2 tokens keeps 8
// accumulators live; elsewhere a portable 8-lane loop that gcc vectorises without -ffast-math.
#include "linear.h"

#include <cmath>

#include "simd.h"

namespace fastgpt2 {
namespace {

constexpr float kSqrt2OverPi = 0.7978845608028654f;

inline float gelu_scalar(float v) {
  return 0.5f * v * (1.0f + std::tanh(kSqrt2OverPi * (v + 0.044715f * v * v * v)));
}

inline void finish(float acc, const float* bias, int64_t r, float* y, Epilogue epilogue) {
  const float v = acc + (bias ? bias[r] : 0.0f);
  if (epilogue == Epilogue::kAccumulate) {
    y[r] += v;
  } else {
    y[r] = v;  // GELU is applied afterwards, vectorised, over the whole range
  }
}

#ifdef FASTGPT2_AVX2
// gelu_tanh(v) = v - v / (1 + exp(2u)), u = sqrt(2/pi) (v + 0.044715 v^3): the same value as
// 0.5 v (1 + tanh(u)) without the cancellation of 1 + tanh(u) for negative u.
inline __m256 gelu256(__m256 v) {
  const __m256 v3 = _mm256_mul_ps(_mm256_mul_ps(v, v), v);
  const __m256 u2 = _mm256_mul_ps(_mm256_set1_ps(2.0f * kSqrt2OverPi), _mm256_fmadd_ps(_mm256_set1_ps(0.044715f), v3, v));
  const __m256 d = _mm256_add_ps(_mm256_set1_ps(1.0f), exp256(u2));
  return _mm256_sub_ps(v, _mm256_div_ps(v, d));
}

// 4 rows x 2 tokens.
inline void block_4x2(const float* w, int64_t K, const float* x0, const float* x1, float out[8]) {
  const float *w0 = w, *w1 = w + K, *w2 = w + 2 * K, *w3 = w + 3 * K;
  __m256 a00 = _mm256_setzero_ps(), a10 = a00, a20 = a00, a30 = a00, a01 = a00, a11 = a00, a21 = a00, a31 = a00;
  for (int64_t k = 0; k < K; k += 8) {
    const __m256 xa = _mm256_loadu_ps(x0 + k), xb = _mm256_loadu_ps(x1 + k);
    __m256 v = _mm256_loadu_ps(w0 + k);
    a00 = _mm256_fmadd_ps(v, xa, a00), a01 = _mm256_fmadd_ps(v, xb, a01);
    v = _mm256_loadu_ps(w1 + k);
    a10 = _mm256_fmadd_ps(v, xa, a10), a11 = _mm256_fmadd_ps(v, xb, a11);
    v = _mm256_loadu_ps(w2 + k);
    a20 = _mm256_fmadd_ps(v, xa, a20), a21 = _mm256_fmadd_ps(v, xb, a21);
    v = _mm256_loadu_ps(w3 + k);
    a30 = _mm256_fmadd_ps(v, xa, a30), a31 = _mm256_fmadd_ps(v, xb, a31);
  }
  out[0] = hsum(a00), out[1] = hsum(a10), out[2] = hsum(a20), out[3] = hsum(a30);
  out[4] = hsum(a01), out[5] = hsum(a11), out[6] = hsum(a21), out[7] = hsum(a31);
}

// 4 rows x 3 tokens: 12 accumulators + 3 x vectors + 1 weight vector fill the 16 ymm registers; 7 loads per 12 FMAs.
inline void block_4x3(const float* w, int64_t K, const float* x0, const float* x1, const float* x2, float out[12]) {
  const float *w0 = w, *w1 = w + K, *w2 = w + 2 * K, *w3 = w + 3 * K;
  __m256 a[12];
  for (int i = 0; i < 12; ++i) a[i] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) {
    const __m256 xa = _mm256_loadu_ps(x0 + k), xb = _mm256_loadu_ps(x1 + k), xc = _mm256_loadu_ps(x2 + k);
    __m256 v = _mm256_loadu_ps(w0 + k);
    a[0] = _mm256_fmadd_ps(v, xa, a[0]), a[4] = _mm256_fmadd_ps(v, xb, a[4]), a[8] = _mm256_fmadd_ps(v, xc, a[8]);
    v = _mm256_loadu_ps(w1 + k);
    a[1] = _mm256_fmadd_ps(v, xa, a[1]), a[5] = _mm256_fmadd_ps(v, xb, a[5]), a[9] = _mm256_fmadd_ps(v, xc, a[9]);
    v = _mm256_loadu_ps(w2 + k);
    a[2] = _mm256_fmadd_ps(v, xa, a[2]), a[6] = _mm256_fmadd_ps(v, xb, a[6]), a[10] = _mm256_fmadd_ps(v, xc, a[10]);
    v = _mm256_loadu_ps(w3 + k);
    a[3] = _mm256_fmadd_ps(v, xa, a[3]), a[7] = _mm256_fmadd_ps(v, xb, a[7]), a[11] = _mm256_fmadd_ps(v, xc, a[11]);
  }
  for (int i = 0; i < 12; ++i) out[i] = hsum(a[i]);
}

// 4 rows x 1 token.
inline void block_4x1(const float* w, int64_t K, const float* x0, float out[4]) {
  const float *w0 = w, *w1 = w + K, *w2 = w + 2 * K, *w3 = w + 3 * K;
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (int64_t k = 0; k < K; k += 8) {
    const __m256 xa = _mm256_loadu_ps(x0 + k);
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + k), xa, a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + k), xa, a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + k), xa, a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + k), xa, a3);
  }
  out[0] = hsum(a0), out[1] = hsum(a1), out[2] = hsum(a2), out[3] = hsum(a3);
}

void gelu_range(float* y, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, gelu256(_mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] = gelu_scalar(y[i]);
}
#else
void gelu_range(float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = gelu_scalar(y[i]);
}
#endif

// Rows [row_begin, row_end) (a multiple of 4 apart) for tokens [t_begin, t_end).
void row_blocks(const float* W, const float* bias, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t K,
                int64_t row_begin, int64_t row_end, int64_t t_begin, int64_t t_end, Epilogue epilogue) {
#ifdef FASTGPT2_AVX2
  for (int64_t r = row_begin; r + 4 <= row_end; r += 4) {
    const float* w = W + r * K;
    int64_t t = t_begin;
    for (; t + 3 <= t_end; t += 3) {
      float out[12];
      block_4x3(w, K, x + t * ldx, x + (t + 1) * ldx, x + (t + 2) * ldx, out);
      for (int j = 0; j < 3; ++j)
        for (int i = 0; i < 4; ++i) finish(out[4 * j + i], bias, r + i, y + (t + j) * ldy, epilogue);
    }
    for (; t + 2 <= t_end; t += 2) {
      float out[8];
      block_4x2(w, K, x + t * ldx, x + (t + 1) * ldx, out);
      for (int i = 0; i < 4; ++i) {
        finish(out[i], bias, r + i, y + t * ldy, epilogue);
        finish(out[4 + i], bias, r + i, y + (t + 1) * ldy, epilogue);
      }
    }
    if (t < t_end) {
      float out[4];
      block_4x1(w, K, x + t * ldx, out);
      for (int i = 0; i < 4; ++i) finish(out[i], bias, r + i, y + t * ldy, epilogue);
    }
  }
#endif
}

}  // namespace

void linear_rows(const float* W, const float* bias, const float* x, int64_t ldx, float* y, int64_t ldy,
                 int64_t num_tokens, int64_t K, int64_t row_begin, int64_t row_end, Epilogue epilogue) {
  int64_t blocked_end = row_begin;
#ifdef FASTGPT2_AVX2
  blocked_end = row_begin + (row_end - row_begin) / 4 * 4;
  row_blocks(W, bias, x, ldx, y, ldy, K, row_begin, blocked_end, 0, num_tokens, epilogue);
#endif
  for (int64_t r = blocked_end; r < row_end; ++r)
    for (int64_t t = 0; t < num_tokens; ++t) finish(dot(W + r * K, x + t * ldx, K), bias, r, y + t * ldy, epilogue);
  if (epilogue == Epilogue::kGelu)
    for (int64_t t = 0; t < num_tokens; ++t) gelu_range(y + t * ldy + row_begin, row_end - row_begin);
}

void layer_norm_row(const float* x, const float* weight, const float* bias, float* out, int64_t n, float eps) {
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) sum += x[i];
  const float mean = static_cast<float>(sum / n);
  double sq = 0.0;
  for (int64_t i = 0; i < n; ++i) sq += static_cast<double>(x[i] - mean) * (x[i] - mean);
  const float rstd = static_cast<float>(1.0 / std::sqrt(sq / n + eps));
  for (int64_t i = 0; i < n; ++i) out[i] = (x[i] - mean) * rstd * weight[i] + bias[i];
}

}  // namespace fastgpt2
