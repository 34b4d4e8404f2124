// The vectorised passes of the CPU sampler over one row (AVX-512 or AVX2 + FMA when built with them, else the same
// arithmetic in scalar code): the max, e = exp(x - max) with its bucket histogram, and the masked collections and
// sums over e. The fast top-p path's passes are in sampling_fast.h.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "sampling_math.h"

namespace fastgpt2 {
namespace sampling_detail {

// The max, the smallest finite value and whether a NaN or a -inf is present. read V floats.
RowScan scan_row(const float* x, int64_t vocab_size);

// min_max's running max and min (NaN compares false and changes neither) and NaN flag, kStep floats at a time, so
// that a pass over one row can scan the next on the way (sampling_fast_passes.cpp); FINITE_ONLY leaves -inf out of
// the min. The same lanes and order as a scan by itself, so the same values (the max of +0 and -0 depends on it).
template <bool FINITE_ONLY>
struct MinMaxScan {
  static constexpr float kInf = std::numeric_limits<float>::infinity();
#if defined(FASTGPT2_AVX512)
  static constexpr int64_t kStep = 32;
  __m512 hi_v[2] = {_mm512_set1_ps(-kInf), _mm512_set1_ps(-kInf)};
  __m512 lo_v[2] = {_mm512_set1_ps(kInf), _mm512_set1_ps(kInf)};
  __mmask16 nan_k = 0;
  void step(const float* p) {
    for (int h = 0; h < 2; ++h) {
      const __m512 v = _mm512_loadu_ps(p + 16 * h);
      const __mmask16 neg_inf = _mm512_cmp_ps_mask(v, _mm512_set1_ps(-kInf), _CMP_EQ_OQ);
      const __m512 for_min = FINITE_ONLY ? _mm512_mask_mov_ps(v, neg_inf, _mm512_set1_ps(kInf)) : v;
      nan_k |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      hi_v[h] = _mm512_max_ps(v, hi_v[h]);  // the second operand when the first is NaN
      lo_v[h] = _mm512_min_ps(for_min, lo_v[h]);
    }
  }
#elif defined(FASTGPT2_AVX2)
  static constexpr int64_t kStep = 16;
  __m256 hi_v[2] = {_mm256_set1_ps(-kInf), _mm256_set1_ps(-kInf)};
  __m256 lo_v[2] = {_mm256_set1_ps(kInf), _mm256_set1_ps(kInf)};
  __m256 nan_v[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  void step(const float* p) {
    for (int h = 0; h < 2; ++h) {
      const __m256 v = _mm256_loadu_ps(p + 8 * h);
      const __m256 neg_inf = _mm256_cmp_ps(v, _mm256_set1_ps(-kInf), _CMP_EQ_OQ);
      const __m256 for_min = FINITE_ONLY ? _mm256_blendv_ps(v, _mm256_set1_ps(kInf), neg_inf) : v;
      nan_v[h] = _mm256_or_ps(nan_v[h], _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      hi_v[h] = _mm256_max_ps(v, hi_v[h]);  // the second operand when the first is NaN
      lo_v[h] = _mm256_min_ps(for_min, lo_v[h]);
    }
  }
#else
  static constexpr int64_t kStep = 0;  // no vector steps: finish() scans the whole row
  void step(const float*) {}
#endif
  // Every whole step over x[0, n); returns where they ended.
  int64_t steps(const float* x, int64_t n) {
    int64_t i = 0;
    if (kStep > 0)
      for (; i + kStep <= n; i += kStep) step(x + i);
    return i;
  }
  // The vector lanes reduced, then x[from, n) one by one (from: where the steps ended). Returns whether a NaN occurs.
  bool finish(const float* x, int64_t from, int64_t n, float* min_out, float* max_out) const {
    float lo = kInf, hi = -kInf;
    bool has_nan = false;
#if defined(FASTGPT2_AVX512)
    hi = _mm512_reduce_max_ps(_mm512_max_ps(hi_v[0], hi_v[1]));
    lo = _mm512_reduce_min_ps(_mm512_min_ps(lo_v[0], lo_v[1]));
    has_nan = nan_k != 0;
#elif defined(FASTGPT2_AVX2)
    alignas(32) float lanes[2][8];
    _mm256_store_ps(lanes[0], _mm256_max_ps(hi_v[0], hi_v[1]));
    _mm256_store_ps(lanes[1], _mm256_min_ps(lo_v[0], lo_v[1]));
    has_nan = _mm256_movemask_ps(_mm256_or_ps(nan_v[0], nan_v[1])) != 0;
    for (int j = 0; j < 8; ++j) hi = std::max(hi, lanes[0][j]), lo = std::min(lo, lanes[1][j]);
#endif
    for (int64_t i = from; i < n; ++i) {
      const float v = x[i];
      has_nan |= v != v;
      hi = v > hi ? v : hi;
      if (!(FINITE_ONLY && v == -kInf)) lo = v < lo ? v : lo;
    }
    *min_out = lo;
    *max_out = hi;
    return has_nan;
  }
};

// The RowScan of a row from its MinMaxScan<false> (steps ended at `from`): a row with -inf (banned tokens) takes a
// second pass for its smallest finite value.
RowScan finish_scan(const MinMaxScan<false>& acc, const float* x, int64_t from, int64_t vocab_size);

// The histogram's scale over max - x in [0, range] (range = max - min_finite, at most RANGE_MAX). The bucket index is
// computed in float32 (bucket_of): its two roundings move a token's e by at most a relative 2 * 2^-24 * (2047 /
// scale) off its bucket's bounds, which the slack covers with the rounding of the exp and of the bound recurrence
// (< 3e-13). scale is 0 (inv_scale +inf) when every finite logit is the same.
struct BucketScale {
  float scale;
  double inv_scale, slack;
};

inline BucketScale bucket_scale_of(const RowScan& scan) {
  const double range = std::min(static_cast<double>(scan.max) - scan.min_finite, RANGE_MAX);
  const float scale = range >= 1e-30 ? static_cast<float>(NUM_LINEAR_BUCKETS / range) : 0.0f;
  const double inv_scale = scale > 0.0f ? 1.0 / scale : std::numeric_limits<double>::infinity();
  const double slack = 1e-12 + (scale > 0.0f ? 2.5 * 0x1p-24 * (NUM_LINEAR_BUCKETS + 1) * inv_scale : 0.0);
  return {scale, inv_scale, slack};
}

struct ExpSums {
  double total;  // sum of e
  int64_t num_zero;  // tokens with e == 0
};

// e = exp(x - max), its sum and its zeros; with HIST also each token's bucket (bucket_of with bucket_scale) and the
// tokens per bucket (the tiny bucket's lanes folded into count[BUCKET_TINY]). read V floats; write V doubles
// (+ V uint16 and the count histogram). next_row (or nullptr) is prefetched. Instantiated for HIST = false and true.
template <bool HIST>
ExpSums exp_pass(const float* x, int64_t vocab_size, const RowScan& scan, float bucket_scale, const float* next_row,
                 Workspace& ws);

// The tokens with bucket <= last (BUCKET_TINY_LAST takes in the tiny bucket's copies) with their e, in id order, into
// `out` (replacing its contents): the top-k candidates, a peaked row's top-p list. ws.listed is its scratch.
// read padded V uint16.
void bucket_range_pass(Workspace& ws, int64_t padded, int last, std::vector<RankedToken>& out);

// The top-p pass: returns the mass of the tokens with e > e_above and writes it per block into block_mass; appends
// the tokens with e_below < e <= e_above to `window` in id order. Window tokens are looked for only in buckets
// [first, last], which must hold all of them, so that most of the pass is a masked sum.
// read padded V doubles + padded V uint16.
double window_pass(const Workspace& ws, int64_t padded, double e_above, double e_below, int first, int last,
                   std::vector<RankedToken>& window, double* block_mass);

// Per block, the mass of the tokens kept by `cut`. read padded V doubles.
void block_sums(const Workspace& ws, int64_t padded, const Cut& cut, double* block_mass);

}  // namespace sampling_detail
}  // namespace fastgpt2
