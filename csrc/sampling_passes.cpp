// See sampling_passes.h. Each pass has an AVX-512 loop, an AVX2 loop and a portable loop for other targets (and for
// the tails).
#include "sampling_passes.h"

#include <algorithm>
#include <limits>
#include <type_traits>

#include "sampling_histogram.h"

namespace fastgpt2 {
namespace sampling_detail {

namespace {

// max and min over the row (NaN compares false and changes neither), whether a NaN is present; FINITE_ONLY leaves
// -inf out of the min.
template <bool FINITE_ONLY>
bool min_max(const float* x, int64_t vocab_size, float* min_out, float* max_out) {
  MinMaxScan<FINITE_ONLY> acc;
  const int64_t from = acc.steps(x, vocab_size);
  return acc.finish(x, from, vocab_size, min_out, max_out);
}

}  // namespace

RowScan finish_scan(const MinMaxScan<false>& acc, const float* x, int64_t from, int64_t vocab_size) {
  RowScan scan{};
  scan.has_nan = acc.finish(x, from, vocab_size, &scan.min_finite, &scan.max);
  scan.has_neg_inf = scan.min_finite == -std::numeric_limits<float>::infinity();
  if (scan.has_neg_inf) min_max<true>(x, vocab_size, &scan.min_finite, &scan.max);
  return scan;
}

RowScan scan_row(const float* x, int64_t vocab_size) {
  MinMaxScan<false> acc;
  const int64_t from = acc.steps(x, vocab_size);
  return finish_scan(acc, x, from, vocab_size);
}

namespace {

#if defined(FASTGPT2_AVX2) && !defined(FASTGPT2_AVX512)
// The AVX2 loop of exp_pass over whole groups of 8 tokens; returns the number of tokens done. Each group's buckets
// are stored, and counted COUNT_LAG tokens later (from memory, into two sub-histograms): the counting's scalar loads
// and increments then run beside the exp's vector work instead of after it (measured per row of 50257: 8-12 us less
// than counting after the loop; the histogram adds ~17 us to the exp's ~36).
template <bool HIST, bool CLAMP>
int64_t exp_loop(const float* x, int64_t vocab_size, float max, float bucket_scale, const float* next_row,
                 Workspace& ws, int32_t* odd, ExpSums* sums) {
  double* e = ws.e.data();
  uint16_t* bucket = ws.bucket.data();
  int32_t* count = ws.count.data();
  const __m256d max_v = _mm256_set1_pd(max);
  const __m256 max_f = _mm256_set1_ps(max), scale_f = _mm256_set1_ps(bucket_scale);
  const __m256i tiny_lanes = tiny_lanes8();
  __m256d sum0 = _mm256_setzero_pd(), sum1 = _mm256_setzero_pd();
  __m256i valid_count = _mm256_setzero_si256();
  // G groups of 8 tokens from j: their e (the exp's constants shared by the 2G vectors), sums and buckets.
  auto step = [&](int64_t j, auto groups) {
    constexpr int G = decltype(groups)::value;
    // The next row's logits come from memory while this compute-bound loop runs (its scan then reads them from L2).
    if (next_row != nullptr && (j & 15) == 0) _mm_prefetch(reinterpret_cast<const char*>(next_row + j), _MM_HINT_T1);
    __m256 xv[G];
    __m256d d[2 * G], ev[2 * G], valid[2 * G];
    for (int g = 0; g < G; ++g) {
      xv[g] = _mm256_loadu_ps(x + j + 8 * g);  // for the buckets
      // Each half converted from memory rather than extracted from xv: one shuffle less per 8 tokens, 5-7% faster
      // per row (alternated runs).
      d[2 * g] = _mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(x + j + 8 * g)), max_v);
      d[2 * g + 1] = _mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(x + j + 8 * g + 4)), max_v);
    }
    exp_nonpositive4<CLAMP>(d, ev, valid);
    for (int g = 0; g < G; ++g) {
      _mm256_storeu_pd(e + j + 8 * g, ev[2 * g]);
      _mm256_storeu_pd(e + j + 8 * g + 4, ev[2 * g + 1]);
      sum0 = _mm256_add_pd(sum0, ev[2 * g]);
      sum1 = _mm256_add_pd(sum1, ev[2 * g + 1]);
      if (CLAMP) {
        valid_count = _mm256_sub_epi64(valid_count, _mm256_castpd_si256(valid[2 * g]));
        valid_count = _mm256_sub_epi64(valid_count, _mm256_castpd_si256(valid[2 * g + 1]));
      }
    }
    if (HIST) {
      for (int g = 0; g < G; ++g) store_buckets8(bucket + j + 8 * g, _mm256_sub_ps(max_f, xv[g]), scale_f, tiny_lanes);
      if (j >= COUNT_LAG) count_buckets(bucket + j - COUNT_LAG, 8 * G, count, odd);
    }
  };
  int64_t j = 0;
  for (; j + 16 <= vocab_size; j += 16) step(j, std::integral_constant<int, 2>{});
  if (j + 8 <= vocab_size) step(j, std::integral_constant<int, 1>{}), j += 8;
  if (HIST) {
    const int64_t uncounted = std::max<int64_t>(j - COUNT_LAG, 0);
    count_buckets(bucket + uncounted, j - uncounted, count, odd);
  }
  sums->total = hsum(_mm256_add_pd(sum0, sum1));
  if (CLAMP) {
    alignas(32) int64_t valid_lanes[4];
    _mm256_store_si256(reinterpret_cast<__m256i*>(valid_lanes), valid_count);
    sums->num_zero = j - (valid_lanes[0] + valid_lanes[1] + valid_lanes[2] + valid_lanes[3]);
  }
  return j;
}
#endif

#ifdef FASTGPT2_AVX512
// The AVX-512 loop of exp_pass over whole groups of 16 tokens: the exp on 8 float64 lanes, the buckets on 16 float32
// lanes, the same counting as the AVX2 loop.
template <bool HIST, bool CLAMP>
int64_t exp_loop512(const float* x, int64_t vocab_size, float max, float bucket_scale, const float* next_row,
                    Workspace& ws, int32_t* odd, ExpSums* sums) {
  double* e = ws.e.data();
  uint16_t* bucket = ws.bucket.data();
  int32_t* count = ws.count.data();
  const __m512d max_v = _mm512_set1_pd(max);
  const __m512 max_f = _mm512_set1_ps(max), scale_f = _mm512_set1_ps(bucket_scale);
  const __m512i tiny_lanes = tiny_lanes16();
  __m512d sum0 = _mm512_setzero_pd(), sum1 = _mm512_setzero_pd();
  int64_t num_valid = 0;
  int64_t j = 0;
  for (; j + 16 <= vocab_size; j += 16) {
    if (next_row != nullptr) _mm_prefetch(reinterpret_cast<const char*>(next_row + j), _MM_HINT_T1);
    __m512d d[2], ev[2];
    __mmask8 valid[2];
    d[0] = _mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(x + j)), max_v);
    d[1] = _mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(x + j + 8)), max_v);
    exp_nonpositive8<CLAMP>(d, ev, valid);
    _mm512_storeu_pd(e + j, ev[0]);
    _mm512_storeu_pd(e + j + 8, ev[1]);
    sum0 = _mm512_add_pd(sum0, ev[0]);
    sum1 = _mm512_add_pd(sum1, ev[1]);
    if (CLAMP) num_valid += __builtin_popcount(valid[0] | (static_cast<unsigned>(valid[1]) << 8));
    if (HIST) {
      const __m512i b = bucket16(_mm512_sub_ps(max_f, _mm512_loadu_ps(x + j)), scale_f, tiny_lanes);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(bucket + j), _mm512_cvtepi32_epi16(b));
      if (j >= COUNT_LAG) count_buckets(bucket + j - COUNT_LAG, 16, count, odd);
    }
  }
  if (HIST) {
    const int64_t uncounted = std::max<int64_t>(j - COUNT_LAG, 0);
    count_buckets(bucket + uncounted, j - uncounted, count, odd);
  }
  sums->total = _mm512_reduce_add_pd(_mm512_add_pd(sum0, sum1));
  if (CLAMP) sums->num_zero = j - num_valid;
  return j;
}
#endif

}  // namespace

template <bool HIST>
ExpSums exp_pass(const float* x, int64_t vocab_size, const RowScan& scan, float bucket_scale, const float* next_row,
                 Workspace& ws) {
  double* e = ws.e.data();
  uint16_t* bucket = ws.bucket.data();
  int32_t* count = ws.count.data();
  int32_t odd[NUM_BUCKETS];  // the second sub-histogram; the first is count itself
  if (HIST) {
    std::fill(count, count + NUM_BUCKETS, 0);
    std::fill(odd, odd + NUM_BUCKETS, 0);
  }
  static_cast<void>(next_row);  // a prefetch hint, used by the AVX2 loop only
  const float max = scan.max;
  ExpSums sums{0.0, 0};
  int64_t j = 0;
  // Without -inf and with every d >= EXP_MIN, the exp needs no clamp and no zero count (~6 us less per row).
  const bool clamp = scan.has_neg_inf || static_cast<double>(scan.min_finite) - max < EXP_MIN;
  static_cast<void>(clamp);
#if defined(FASTGPT2_AVX512)
  j = clamp ? exp_loop512<HIST, true>(x, vocab_size, max, bucket_scale, next_row, ws, odd, &sums)
            : exp_loop512<HIST, false>(x, vocab_size, max, bucket_scale, next_row, ws, odd, &sums);
#elif defined(FASTGPT2_AVX2)
  j = clamp ? exp_loop<HIST, true>(x, vocab_size, max, bucket_scale, next_row, ws, odd, &sums)
            : exp_loop<HIST, false>(x, vocab_size, max, bucket_scale, next_row, ws, odd, &sums);
#endif
  for (; j < vocab_size; ++j) {
    const double d = static_cast<double>(x[j]) - static_cast<double>(max);
    e[j] = exp_nonpositive(d);
    sums.total += e[j];
    sums.num_zero += !(d >= EXP_MIN);
    if (HIST) bucket_and_count(x, j, max, bucket_scale, bucket, count);
  }
  if (HIST) finish_histogram(count, odd, bucket, vocab_size);
  const int64_t padded = (vocab_size + BLOCK - 1) / BLOCK * BLOCK;
  std::fill(e + vocab_size, e + padded, 0.0);
  if (!HIST) std::fill(bucket + vocab_size, bucket + padded, static_cast<uint16_t>(BUCKET_PAD));
  return sums;
}

template ExpSums exp_pass<false>(const float*, int64_t, const RowScan&, float, const float*, Workspace&);
template ExpSums exp_pass<true>(const float*, int64_t, const RowScan&, float, const float*, Workspace&);

void bucket_range_pass(Workspace& ws, int64_t padded, int last, std::vector<RankedToken>& out) {
  const uint16_t* bucket = ws.bucket.data();
  // The ids first, into scratch (a push_back of a {e, id} temporary per token stalls on store forwarding), then the
  // list in one resize.
  uint32_t* ids = ws.listed_at_least(padded);
  int64_t n = 0, j = 0;
#if defined(FASTGPT2_AVX512)
  const __m512i last_v = _mm512_set1_epi16(static_cast<int16_t>(last));
  for (; j < padded; j += 32) {  // padded is a multiple of 32
    uint32_t in = _mm512_cmple_epu16_mask(_mm512_loadu_si512(bucket + j), last_v);
    for (; in; in &= in - 1) ids[n++] = static_cast<uint32_t>(j + __builtin_ctz(in));
  }
#elif defined(FASTGPT2_AVX2)
  const __m256i last_v = _mm256_set1_epi16(static_cast<int16_t>(last));
  for (; j < padded; j += 16) {
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bucket + j));
    uint32_t in = ~static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_cmpgt_epi16(b, last_v)));  // 2 bits per token
    for (; in; in &= in - 1, in &= in - 1) ids[n++] = static_cast<uint32_t>(j + (__builtin_ctz(in) >> 1));
  }
#endif
  for (; j < padded; ++j) {
    if (bucket[j] <= last) ids[n++] = static_cast<uint32_t>(j);
  }
  const double* e = ws.e.data();
  out.resize(n);
  for (int64_t k = 0; k < n; ++k) out[k] = {e[ids[k]], ids[k]};
}

double window_pass(const Workspace& ws, int64_t padded, double e_above, double e_below, int first, int last,
                   std::vector<RankedToken>& window, double* block_mass) {
  const double* e = ws.e.data();
  const uint16_t* bucket = ws.bucket.data();
  window.clear();
  double mass_above = 0.0;
  for (int64_t start = 0; start < padded; start += BLOCK) {
    double sum = 0.0;
#if defined(FASTGPT2_AVX512)
    const __m512i first_v = _mm512_set1_epi16(static_cast<int16_t>(first));
    const __m512i last_v = _mm512_set1_epi16(static_cast<int16_t>(last));
    const __m512d above_v = _mm512_set1_pd(e_above);
    __m512d acc0 = _mm512_setzero_pd(), acc1 = _mm512_setzero_pd();
    for (int64_t j = start; j < start + BLOCK; j += 32) {
      const __m512i b = _mm512_loadu_si512(bucket + j);
      uint32_t candidates = _mm512_mask_cmple_epu16_mask(_mm512_cmpge_epu16_mask(b, first_v), b, last_v);
      for (; candidates; candidates &= candidates - 1) {
        const int64_t i = j + __builtin_ctz(candidates);
        if (e[i] > e_below && e[i] <= e_above) window.push_back({e[i], i});
      }
      for (int q = 0; q < 4; q += 2) {
        const __m512d v0 = _mm512_loadu_pd(e + j + 8 * q), v1 = _mm512_loadu_pd(e + j + 8 * q + 8);
        acc0 = _mm512_mask_add_pd(acc0, _mm512_cmp_pd_mask(v0, above_v, _CMP_GT_OQ), acc0, v0);
        acc1 = _mm512_mask_add_pd(acc1, _mm512_cmp_pd_mask(v1, above_v, _CMP_GT_OQ), acc1, v1);
      }
    }
    sum = _mm512_reduce_add_pd(_mm512_add_pd(acc0, acc1));
#elif defined(FASTGPT2_AVX2)
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
#if defined(FASTGPT2_AVX512)
    const __m512d cut_v = _mm512_set1_pd(cut.e);
    __m512d acc0 = _mm512_setzero_pd(), acc1 = _mm512_setzero_pd();
    for (int64_t j = start; j < start + BLOCK; j += 16) {
      const __m512d v0 = _mm512_loadu_pd(e + j), v1 = _mm512_loadu_pd(e + j + 8);
      const __mmask8 k0 = ties_kept ? _mm512_cmp_pd_mask(v0, cut_v, _CMP_GE_OQ) : _mm512_cmp_pd_mask(v0, cut_v, _CMP_GT_OQ);
      const __mmask8 k1 = ties_kept ? _mm512_cmp_pd_mask(v1, cut_v, _CMP_GE_OQ) : _mm512_cmp_pd_mask(v1, cut_v, _CMP_GT_OQ);
      acc0 = _mm512_mask_add_pd(acc0, k0, acc0, v0);
      acc1 = _mm512_mask_add_pd(acc1, k1, acc1, v1);
    }
    sum = _mm512_reduce_add_pd(_mm512_add_pd(acc0, acc1));
#elif defined(FASTGPT2_AVX2)
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
