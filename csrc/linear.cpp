// Matrix-vector kernels of the CPU decode step. Memory traffic: each weight row is read once per call and reused
// across up to three tokens from registers; x rows stay in L1. With AVX2+FMA blocks of 4 rows x 1..3 tokens keep up
// to 12 accumulators live, and a bf16 weight vector is widened once (shift left by 16) for all the tokens it meets;
// elsewhere a portable 8-lane loop that gcc vectorises without -ffast-math.
#include "linear.h"

#include <cmath>

#include "simd.h"

namespace fastgpt2 {
namespace {

inline void finish(float acc, const float* bias, int64_t r, float* y, Epilogue epilogue) {
  const float v = acc + (bias ? bias[r] : 0.0f);
  if (epilogue == Epilogue::kAccumulate) {
    y[r] += v;
  } else {
    y[r] = v;  // GELU is applied afterwards, vectorised, over the whole range
  }
}

#ifdef FASTGPT2_AVX2
// Software prefetch of the 4-row block kPrefetchBlocks ahead (contiguous, 4 K weights) while this one is read: its
// 4 K weights arrive over this block's K / 8 steps, one or two 64-byte lines per step. The hardware prefetchers follow
// the four interleaved row streams poorly (a bf16 row is only 1.5 KB): measured on the 124M LM head, one thread,
// bf16 weights went from 6.5 to ~10.5 GB/s with it (float32 ~10.5 either way), i.e. 2x fewer ms than float32.
constexpr int64_t kPrefetchBlocks = 2;

template <typename W>
inline void prefetch_next(const W* next_block, int64_t k) {
  const char* p = reinterpret_cast<const char*>(next_block) + 4 * k * static_cast<int64_t>(sizeof(W));
  _mm_prefetch(p, _MM_HINT_T0);
  if constexpr (sizeof(W) == 4) _mm_prefetch(p + 64, _MM_HINT_T0);
}

// 4 rows x 2 tokens.
template <typename W>
inline void block_4x2(const W* w, int64_t K, const float* x0, const float* x1, float out[8]) {
  const W *w0 = w, *w1 = w + K, *w2 = w + 2 * K, *w3 = w + 3 * K;
  __m256 a00 = _mm256_setzero_ps(), a10 = a00, a20 = a00, a30 = a00, a01 = a00, a11 = a00, a21 = a00, a31 = a00;
  for (int64_t k = 0; k < K; k += 8) {
    prefetch_next(w + kPrefetchBlocks * 4 * K, k);
    const __m256 xa = _mm256_loadu_ps(x0 + k), xb = _mm256_loadu_ps(x1 + k);
    __m256 v = load8(w0 + k);
    a00 = _mm256_fmadd_ps(v, xa, a00), a01 = _mm256_fmadd_ps(v, xb, a01);
    v = load8(w1 + k);
    a10 = _mm256_fmadd_ps(v, xa, a10), a11 = _mm256_fmadd_ps(v, xb, a11);
    v = load8(w2 + k);
    a20 = _mm256_fmadd_ps(v, xa, a20), a21 = _mm256_fmadd_ps(v, xb, a21);
    v = load8(w3 + k);
    a30 = _mm256_fmadd_ps(v, xa, a30), a31 = _mm256_fmadd_ps(v, xb, a31);
  }
  out[0] = hsum(a00), out[1] = hsum(a10), out[2] = hsum(a20), out[3] = hsum(a30);
  out[4] = hsum(a01), out[5] = hsum(a11), out[6] = hsum(a21), out[7] = hsum(a31);
}

// 4 rows x 3 tokens: 12 accumulators + 3 x vectors + 1 weight vector fill the 16 ymm registers; 7 loads per 12 FMAs.
template <typename W>
inline void block_4x3(const W* w, int64_t K, const float* x0, const float* x1, const float* x2, float out[12]) {
  const W *w0 = w, *w1 = w + K, *w2 = w + 2 * K, *w3 = w + 3 * K;
  __m256 a[12];
  for (int i = 0; i < 12; ++i) a[i] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) {
    prefetch_next(w + kPrefetchBlocks * 4 * K, k);
    const __m256 xa = _mm256_loadu_ps(x0 + k), xb = _mm256_loadu_ps(x1 + k), xc = _mm256_loadu_ps(x2 + k);
    __m256 v = load8(w0 + k);
    a[0] = _mm256_fmadd_ps(v, xa, a[0]), a[4] = _mm256_fmadd_ps(v, xb, a[4]), a[8] = _mm256_fmadd_ps(v, xc, a[8]);
    v = load8(w1 + k);
    a[1] = _mm256_fmadd_ps(v, xa, a[1]), a[5] = _mm256_fmadd_ps(v, xb, a[5]), a[9] = _mm256_fmadd_ps(v, xc, a[9]);
    v = load8(w2 + k);
    a[2] = _mm256_fmadd_ps(v, xa, a[2]), a[6] = _mm256_fmadd_ps(v, xb, a[6]), a[10] = _mm256_fmadd_ps(v, xc, a[10]);
    v = load8(w3 + k);
    a[3] = _mm256_fmadd_ps(v, xa, a[3]), a[7] = _mm256_fmadd_ps(v, xb, a[7]), a[11] = _mm256_fmadd_ps(v, xc, a[11]);
  }
  for (int i = 0; i < 12; ++i) out[i] = hsum(a[i]);
}

// 4 rows x 1 token.
template <typename W>
inline void block_4x1(const W* w, int64_t K, const float* x0, float out[4]) {
  const W *w0 = w, *w1 = w + K, *w2 = w + 2 * K, *w3 = w + 3 * K;
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (int64_t k = 0; k < K; k += 8) {
    prefetch_next(w + kPrefetchBlocks * 4 * K, k);
    const __m256 xa = _mm256_loadu_ps(x0 + k);
    a0 = _mm256_fmadd_ps(load8(w0 + k), xa, a0);
    a1 = _mm256_fmadd_ps(load8(w1 + k), xa, a1);
    a2 = _mm256_fmadd_ps(load8(w2 + k), xa, a2);
    a3 = _mm256_fmadd_ps(load8(w3 + k), xa, a3);
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
template <typename W>
void row_blocks(const W* weight, const float* bias, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t K,
                int64_t row_begin, int64_t row_end, int64_t t_begin, int64_t t_end, Epilogue epilogue) {
#ifdef FASTGPT2_AVX2
  for (int64_t r = row_begin; r + 4 <= row_end; r += 4) {
    const W* w = weight + r * K;
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

template <typename W>
void linear_rows(const W* weight, const float* bias, const float* x, int64_t ldx, float* y, int64_t ldy,
                 int64_t num_tokens, int64_t K, int64_t row_begin, int64_t row_end, Epilogue epilogue) {
  int64_t blocked_end = row_begin;
#ifdef FASTGPT2_AVX2
  blocked_end = row_begin + (row_end - row_begin) / 4 * 4;
  row_blocks(weight, bias, x, ldx, y, ldy, K, row_begin, blocked_end, 0, num_tokens, epilogue);
#endif
  for (int64_t r = blocked_end; r < row_end; ++r)
    for (int64_t t = 0; t < num_tokens; ++t) finish(dot(weight + r * K, x + t * ldx, K), bias, r, y + t * ldy, epilogue);
  if (epilogue == Epilogue::kGelu)
    for (int64_t t = 0; t < num_tokens; ++t) gelu_range(y + t * ldy + row_begin, row_end - row_begin);
}

template void linear_rows<float>(const float*, const float*, const float*, int64_t, float*, int64_t, int64_t, int64_t,
                                 int64_t, int64_t, Epilogue);
template void linear_rows<bf16>(const bf16*, const float*, const float*, int64_t, float*, int64_t, int64_t, int64_t,
                                int64_t, int64_t, Epilogue);

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
