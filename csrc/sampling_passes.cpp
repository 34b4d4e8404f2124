// See sampling_passes.h. scan_row is plain C++ that gcc vectorises; the other passes have an AVX2 loop and a portable
// loop for other targets (and for exp_pass's tail).
#include "sampling_passes.h"

#include <algorithm>
#include <limits>

namespace fastgpt2 {
namespace sampling_detail {

// Lane-wise accumulators so that gcc vectorises the loop.
RowScan scan_row(const float* x, int64_t vocab_size) {
  constexpr int LANES = 16;
  constexpr float INF = std::numeric_limits<float>::infinity();
  float max_lane[LANES], min_lane[LANES];
  int32_t nan_lane[LANES];
  for (int j = 0; j < LANES; ++j) {
    max_lane[j] = -INF;
    min_lane[j] = INF;
    nan_lane[j] = 0;
  }
  int64_t i = 0;
  for (; i + LANES <= vocab_size; i += LANES) {
    for (int j = 0; j < LANES; ++j) {
      const float v = x[i + j];
      nan_lane[j] |= (v != v);
      max_lane[j] = v > max_lane[j] ? v : max_lane[j];
      const float finite_or_inf = v > -INF ? v : INF;
      min_lane[j] = finite_or_inf < min_lane[j] ? finite_or_inf : min_lane[j];
    }
  }
  for (; i < vocab_size; ++i) {
    const float v = x[i];
    nan_lane[0] |= (v != v);
    max_lane[0] = v > max_lane[0] ? v : max_lane[0];
    if (v > -INF) min_lane[0] = std::min(min_lane[0], v);
  }
  RowScan scan{-INF, INF, false};
  for (int j = 0; j < LANES; ++j) {
    scan.max = std::max(scan.max, max_lane[j]);
    scan.min_finite = std::min(scan.min_finite, min_lane[j]);
    scan.has_nan |= nan_lane[j] != 0;
  }
  return scan;
}

template <bool HIST>
ExpSums exp_pass(const float* x, int64_t vocab_size, float max, double bucket_scale, const float* next_row,
                 Workspace& ws) {
  double* e = ws.e.data();
  uint16_t* bucket = ws.bucket.data();
  int32_t* count = ws.count.data();
  if (HIST) std::fill(count, count + NUM_BUCKETS, 0);
  static_cast<void>(next_row);  // a prefetch hint, used by the AVX2 loop only
  ExpSums sums{0.0, 0};
  int64_t j = 0;
#ifdef FASTGPT2_AVX2
  const __m256d max_v = _mm256_set1_pd(max), scale_v = _mm256_set1_pd(-bucket_scale);
  const __m256i tiny_v = _mm256_set1_epi32(BUCKET_TINY);
  __m256d sum0 = _mm256_setzero_pd(), sum1 = _mm256_setzero_pd();
  __m256i valid_count = _mm256_setzero_si256();
  for (; j + 8 <= vocab_size; j += 8) {
    // The next row's logits come from memory while this compute-bound loop runs (its scan then reads them from L2).
    if (next_row != nullptr && (j & 15) == 0) _mm_prefetch(reinterpret_cast<const char*>(next_row + j), _MM_HINT_T1);
    const __m256 xv = _mm256_loadu_ps(x + j);
    const __m256d d0 = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(xv)), max_v);
    const __m256d d1 = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(xv, 1)), max_v);
    __m256d valid0, valid1;
    const __m256d e0 = exp_nonpositive4(d0, &valid0), e1 = exp_nonpositive4(d1, &valid1);
    _mm256_storeu_pd(e + j, e0);
    _mm256_storeu_pd(e + j + 4, e1);
    sum0 = _mm256_add_pd(sum0, e0);
    sum1 = _mm256_add_pd(sum1, e1);
    valid_count = _mm256_sub_epi64(valid_count, _mm256_castpd_si256(valid0));
    valid_count = _mm256_sub_epi64(valid_count, _mm256_castpd_si256(valid1));
    if (HIST) {
      const __m128i b0 = _mm256_cvttpd_epi32(_mm256_mul_pd(d0, scale_v));
      const __m128i b1 = _mm256_cvttpd_epi32(_mm256_mul_pd(d1, scale_v));
      const __m256i b = _mm256_min_epu32(_mm256_inserti128_si256(_mm256_castsi128_si256(b0), b1, 1), tiny_v);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(bucket + j),
                       _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1)));
    }
  }
  if (HIST) {
    // Counted after the loop, into two sub-histograms (no chain of increments to one counter): inside the loop the
    // increments crowded out the exp chains' FMAs (measured in alternation: 3-20% less time per row).
    int32_t odd[NUM_BUCKETS] = {};  // the second sub-histogram; the first is count itself (zeroed above)
    int64_t i = 0;
    for (; i + 2 <= j; i += 2) ++count[bucket[i]], ++odd[bucket[i + 1]];
    for (; i < j; ++i) ++count[bucket[i]];
    for (int b = 0; b < NUM_BUCKETS; ++b) count[b] += odd[b];
  }
  sums.total = hsum(_mm256_add_pd(sum0, sum1));
  alignas(32) int64_t valid_lanes[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(valid_lanes), valid_count);
  sums.num_zero = j - (valid_lanes[0] + valid_lanes[1] + valid_lanes[2] + valid_lanes[3]);
#endif
  for (; j < vocab_size; ++j) {
    const double d = static_cast<double>(x[j]) - static_cast<double>(max);
    e[j] = exp_nonpositive(d);
    sums.total += e[j];
    sums.num_zero += !(d >= EXP_MIN);
    if (HIST) {
      bucket[j] = static_cast<uint16_t>(bucket_of(d, bucket_scale));
      ++count[bucket[j]];
    }
  }
  const int64_t padded = (vocab_size + BLOCK - 1) / BLOCK * BLOCK;
  std::fill(e + vocab_size, e + padded, 0.0);
  std::fill(bucket + vocab_size, bucket + padded, static_cast<uint16_t>(BUCKET_PAD));
  return sums;
}

template ExpSums exp_pass<false>(const float*, int64_t, float, double, const float*, Workspace&);
template ExpSums exp_pass<true>(const float*, int64_t, float, double, const float*, Workspace&);

void bucket_prefix_pass(const Workspace& ws, int64_t padded, int last, std::vector<RankedToken>& out) {
  const double* e = ws.e.data();
  const uint16_t* bucket = ws.bucket.data();
  out.clear();
  int64_t j = 0;
#ifdef FASTGPT2_AVX2
  const __m256i last_v = _mm256_set1_epi16(static_cast<int16_t>(last));
  for (; j < padded; j += 16) {
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bucket + j));
    uint32_t in = ~static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_cmpgt_epi16(b, last_v)));  // 2 bits per token
    for (; in; in &= in - 1, in &= in - 1) out.push_back({e[j + (__builtin_ctz(in) >> 1)], j + (__builtin_ctz(in) >> 1)});
  }
#endif
  for (; j < padded; ++j) {
    if (bucket[j] <= last) out.push_back({e[j], j});
  }
}

double window_pass(const Workspace& ws, int64_t padded, double e_above, double e_below, int first, int last,
                   std::vector<RankedToken>& window, double* block_mass) {
  const double* e = ws.e.data();
  const uint16_t* bucket = ws.bucket.data();
  window.clear();
  double mass_above = 0.0;
  for (int64_t start = 0; start < padded; start += BLOCK) {
    double sum = 0.0;
#ifdef FASTGPT2_AVX2
    const __m256i first_v = _mm256_set1_epi16(static_cast<int16_t>(first));
    const __m256i last_v = _mm256_set1_epi16(static_cast<int16_t>(last));
    const __m256d above_v = _mm256_set1_pd(e_above);
    __m256d acc0 = _mm256_setzero_pd(), acc1 = _mm256_setzero_pd();
    for (int64_t j = start; j < start + BLOCK; j += 16) {
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bucket + j));
      const __m256i outside = _mm256_or_si256(_mm256_cmpgt_epi16(first_v, b), _mm256_cmpgt_epi16(b, last_v));
      uint32_t candidates = ~static_cast<uint32_t>(_mm256_movemask_epi8(outside));  // 2 bits per token
      for (; candidates; candidates &= candidates - 1, candidates &= candidates - 1) {
        const int64_t i = j + (__builtin_ctz(candidates) >> 1);
        if (e[i] > e_below && e[i] <= e_above) window.push_back({e[i], i});
      }
      for (int q = 0; q < 4; q += 2) {
        const __m256d v0 = _mm256_loadu_pd(e + j + 4 * q), v1 = _mm256_loadu_pd(e + j + 4 * q + 4);
        acc0 = _mm256_add_pd(acc0, _mm256_and_pd(v0, _mm256_cmp_pd(v0, above_v, _CMP_GT_OQ)));
        acc1 = _mm256_add_pd(acc1, _mm256_and_pd(v1, _mm256_cmp_pd(v1, above_v, _CMP_GT_OQ)));
      }
    }
    sum = hsum(_mm256_add_pd(acc0, acc1));
#else
    for (int64_t j = start; j < start + BLOCK; ++j) {
      if (bucket[j] >= first && bucket[j] <= last && e[j] > e_below && e[j] <= e_above) window.push_back({e[j], j});
      sum += e[j] > e_above ? e[j] : 0.0;
    }
#endif
    block_mass[start / BLOCK] = sum;
    mass_above += sum;
  }
  return mass_above;
}

void block_sums(const Workspace& ws, int64_t padded, const Cut& cut, double* block_mass) {
  const double* e = ws.e.data();
  for (int64_t start = 0; start < padded; start += BLOCK) {
    double sum = 0.0;
    if (start <= cut.id && cut.id < start + BLOCK - 1) {  // the block where ties stop being kept
      for (int64_t j = start; j < start + BLOCK; ++j) sum += is_kept(e[j], j, cut) ? e[j] : 0.0;
      block_mass[start / BLOCK] = sum;
      continue;
    }
    const bool ties_kept = cut.id >= start;  // then e >= cut.e keeps the block, else e > cut.e
#ifdef FASTGPT2_AVX2
    const __m256d cut_v = _mm256_set1_pd(cut.e);
    __m256d acc0 = _mm256_setzero_pd(), acc1 = _mm256_setzero_pd();
    for (int64_t j = start; j < start + BLOCK; j += 8) {
      const __m256d v0 = _mm256_loadu_pd(e + j), v1 = _mm256_loadu_pd(e + j + 4);
      const __m256d k0 = ties_kept ? _mm256_cmp_pd(v0, cut_v, _CMP_GE_OQ) : _mm256_cmp_pd(v0, cut_v, _CMP_GT_OQ);
      const __m256d k1 = ties_kept ? _mm256_cmp_pd(v1, cut_v, _CMP_GE_OQ) : _mm256_cmp_pd(v1, cut_v, _CMP_GT_OQ);
      acc0 = _mm256_add_pd(acc0, _mm256_and_pd(v0, k0));
      acc1 = _mm256_add_pd(acc1, _mm256_and_pd(v1, k1));
    }
    sum = hsum(_mm256_add_pd(acc0, acc1));
#else
    for (int64_t j = start; j < start + BLOCK; ++j) {
      sum += (ties_kept ? e[j] >= cut.e : e[j] > cut.e) ? e[j] : 0.0;
    }
#endif
    block_mass[start / BLOCK] = sum;
  }
}

}  // namespace sampling_detail
}  // namespace fastgpt2
