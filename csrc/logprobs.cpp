// See logprobs.h: per row one pass for the max (the sampler's scan), one for the top-N (vector compares against the
// N-th best so far; only the few tokens above it are inserted) and one for the sum of exp(x - max) in float64.
#include "logprobs.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "sampling_math.h"
#include "sampling_passes.h"
#include "sampling_rows.h"

namespace fastgpt2 {
namespace {

using namespace sampling_detail;

// sum_i exp(x_i - max) in float64, in a fixed order: the vector accumulators' lanes (reduced in a fixed order), then
// the tail one by one.
double sum_exp(const float* x, int64_t n, float max) {
  const double m = max;
  double total = 0.0;
  int64_t i = 0;
#if defined(FASTGPT2_AVX512)
  constexpr int U = 4;
  __m512d acc[U];
  for (int u = 0; u < U; ++u) acc[u] = _mm512_setzero_pd();
  const __m512d m_v = _mm512_set1_pd(m);
  for (; i + 8 * U <= n; i += 8 * U) {
    __m512d d[U], e[U];
    __mmask8 valid[U];
    for (int u = 0; u < U; ++u) d[u] = _mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(x + i + 8 * u)), m_v);
    exp_nonpositive8<true, U>(d, e, valid);
    for (int u = 0; u < U; ++u) acc[u] = _mm512_add_pd(acc[u], e[u]);
  }
  total = _mm512_reduce_add_pd(_mm512_add_pd(_mm512_add_pd(acc[0], acc[1]), _mm512_add_pd(acc[2], acc[3])));
#elif defined(FASTGPT2_AVX2)
  constexpr int U = 4;
  __m256d acc[U];
  for (int u = 0; u < U; ++u) acc[u] = _mm256_setzero_pd();
  const __m256d m_v = _mm256_set1_pd(m);
  for (; i + 4 * U <= n; i += 4 * U) {
    __m256d d[U], e[U], valid[U];
    for (int u = 0; u < U; ++u) d[u] = _mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(x + i + 4 * u)), m_v);
    exp_nonpositive4<true, U>(d, e, valid);
    for (int u = 0; u < U; ++u) acc[u] = _mm256_add_pd(acc[u], e[u]);
  }
  total = hsum(_mm256_add_pd(_mm256_add_pd(acc[0], acc[1]), _mm256_add_pd(acc[2], acc[3])));
#endif
  for (; i < n; ++i) total += exp_nonpositive(static_cast<double>(x[i]) - m);
  return total;
}

struct Ranked {
  float value;
  int64_t id;
};

// The top_n largest of x[0, n) (n >= top_n >= 1) in (value descending, id ascending) order into best. NaN-free rows
// only. A token enters when its value exceeds the N-th best so far (an equal value has a larger id, so ranks after).
void top_n_of(const float* x, int64_t n, int64_t top_n, Ranked* best) {
  int64_t size = 0;
  auto insert = [&](float v, int64_t id) {  // v ranks before best[size - 1] when the list is full
    int64_t p = std::min(size, top_n - 1);
    while (p > 0 && best[p - 1].value < v) {
      best[p] = best[p - 1];
      --p;
    }
    best[p] = {v, id};
    size = std::min(size + 1, top_n);
  };
  int64_t i = 0;
  for (; i < top_n; ++i) insert(x[i], i);
  float threshold = best[top_n - 1].value;
  auto take = [&](int64_t at, uint32_t mask) {  // the lanes of mask (tokens at + lane) above the threshold when taken
    while (mask != 0) {
      const int64_t id = at + __builtin_ctz(mask);
      mask &= mask - 1;
      if (x[id] > threshold) {
        insert(x[id], id);
        threshold = best[top_n - 1].value;
      }
    }
  };
#if defined(FASTGPT2_AVX512)
  for (; i + 16 <= n; i += 16) {
    const __mmask16 above = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + i), _mm512_set1_ps(threshold), _CMP_GT_OQ);
    if (above) take(i, above);
  }
#elif defined(FASTGPT2_AVX2)
  for (; i + 8 <= n; i += 8) {
    const int above = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), _mm256_set1_ps(threshold), _CMP_GT_OQ));
    if (above) take(i, static_cast<uint32_t>(above));
  }
#endif
  for (; i < n; ++i) {
    if (x[i] > threshold) take(i, 1u);
  }
}

float logprob_of(float x, double lse) { return static_cast<float>(static_cast<double>(x) - lse); }

}  // namespace

void logprob_rows(const float* logits, const int64_t* rows, int64_t num_rows, int64_t vocab_size, int64_t stride_row,
                  const int64_t* targets, int64_t top_n, float* target_logprob, int64_t* top_ids, float* top_logprobs,
                  int32_t* status, int num_threads) {
  auto row_fn = [&](int64_t row, bool, Workspace&) {
    const float* x = logits + (rows != nullptr ? rows[row] : row) * stride_row;
    const RowScan scan = scan_row(x, vocab_size);
    status[row] = row_status(scan);
    if (status[row] != kOk) return;
    const double lse = static_cast<double>(scan.max) + std::log(sum_exp(x, vocab_size, scan.max));
    if (targets != nullptr) {
      const int64_t t = targets[row];
      target_logprob[row] = t >= 0 ? logprob_of(x[t], lse) : std::numeric_limits<float>::quiet_NaN();
    }
    if (top_n > 0) {
      Ranked best_local[32];
      std::vector<Ranked> best_heap;
      Ranked* best = best_local;
      if (top_n > 32) {
        best_heap.resize(top_n);
        best = best_heap.data();
      }
      top_n_of(x, vocab_size, top_n, best);
      for (int64_t j = 0; j < top_n; ++j) {
        top_ids[row * top_n + j] = best[j].id;
        top_logprobs[row * top_n + j] = logprob_of(best[j].value, lse);
      }
    }
  };
  // A row of 50257 takes ~30 us on one Intel Xeon core (AVX-512): one range per 4 rows at most, so that up to 7 rows
  // stay on the calling thread.
  parallel_rows(num_rows, num_threads, row_fn, num_rows / 4);
}

}  // namespace fastgpt2
