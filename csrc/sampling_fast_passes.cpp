// See sampling_fast.h: the fast top-p path's passes over a row (AVX-512 or AVX2 loops, and a portable loop for other
// targets and for the tails).
#include "sampling_fast.h"

#include <algorithm>
#include <type_traits>

#include "sampling_histogram.h"

namespace fastgpt2 {
namespace sampling_detail {

namespace {

// How far ahead of its scan the exp loop asks for the next row (floats): the scan's loads then find their lines on
// the way from memory instead of waiting for them.
constexpr int64_t kScanAhead = 512;

#if defined(FASTGPT2_AVX2) && !defined(FASTGPT2_AVX512)
// AVX2's stand-in for a compress: for each 8-bit mask, the lanes it selects in order (then zeros), for
// _mm256_permutevar8x32_epi32.
struct Compress8 {
  alignas(32) int32_t lanes[256][8];
  constexpr Compress8() : lanes() {
    for (int m = 0; m < 256; ++m) {
      int k = 0;
      for (int b = 0; b < 8; ++b)
        if (m >> b & 1) lanes[m][k++] = b;
    }
  }
};
constexpr Compress8 kCompress8{};
#endif

#if defined(FASTGPT2_AVX2) && !defined(FASTGPT2_AVX512)
// The AVX2 loop of fast_exp_pass over whole groups of 16 tokens (the bucket and, with COUNT, the count steps as in
// exp_loop); returns the number of tokens done and adds the sum of e32 to *total.
template <bool CLAMP, bool COUNT>
int64_t fast_exp_loop(const float* x, int64_t vocab_size, float max, float bucket_scale, const float* next_row,
                      MinMaxScan<false>* next_scan, Workspace& ws, int32_t* odd, double* total) {
  static_assert(MinMaxScan<false>::kStep == 16, "the next row is scanned in this loop's steps");
  float* e32 = ws.e32.data();
  uint16_t* bucket = ws.bucket.data();
  int32_t* count = ws.count.data();
  const __m256 max_f = _mm256_set1_ps(max), scale_f = _mm256_set1_ps(bucket_scale);
  const __m256i tiny_lanes = tiny_lanes8();
  __m256d sum0 = _mm256_setzero_pd(), sum1 = _mm256_setzero_pd();
  int64_t j = 0;
  for (; j + 16 <= vocab_size; j += 16) {
    if (next_row != nullptr) {
      _mm_prefetch(reinterpret_cast<const char*>(next_row + j + kScanAhead), _MM_HINT_T0);
      next_scan->step(next_row + j);
    }
    __m256 e[2];
    for (int g = 0; g < 2; ++g) {
      const __m256 t = _mm256_sub_ps(max_f, _mm256_loadu_ps(x + j + 8 * g));  // the gap, >= 0 (+inf for -inf)
      e[g] = exp32_of_gap8<CLAMP>(t);
      _mm256_storeu_ps(e32 + j + 8 * g, e[g]);
      store_buckets8(bucket + j + 8 * g, t, scale_f, tiny_lanes);
    }
    // The total: the two groups added in float32 (one rounding, see fast_exp_pass), then in float64.
    const __m256 pair = _mm256_add_ps(e[0], e[1]);
    sum0 = _mm256_add_pd(sum0, _mm256_cvtps_pd(_mm256_castps256_ps128(pair)));
    sum1 = _mm256_add_pd(sum1, _mm256_cvtps_pd(_mm256_extractf128_ps(pair, 1)));
    if (COUNT && j >= COUNT_LAG) count_buckets(bucket + j - COUNT_LAG, 16, count, odd);
  }
  if (COUNT) {
    const int64_t uncounted = std::max<int64_t>(j - COUNT_LAG, 0);
    count_buckets(bucket + uncounted, j - uncounted, count, odd);
  }
  *total += hsum(_mm256_add_pd(sum0, sum1));
  return j;
}
#endif

#ifdef FASTGPT2_AVX512
// The AVX-512 loop of fast_exp_pass over whole groups of 16 tokens, 32 per step: the exp and the buckets on 16 lanes,
// the same counting as the AVX2 loop.
// kAll counts every token, kAfter none; with kBelowLimit (LIMIT), only the tokens of buckets < count_limit are
// counted: their buckets are packed (a compress per 16 tokens) into ws.listed and counted from there, so that the far
// tail costs no increment (the increments' stores bound this loop: ~9 of its ~20 us per row of 50257 when every token
// is counted).
template <bool CLAMP, CountMode MODE>
int64_t fast_exp_loop512(const float* x, int64_t vocab_size, float max, float bucket_scale, const float* next_row,
                         MinMaxScan<false>* next_scan, int64_t* next_scan_end, Workspace& ws, int32_t* odd,
                         uint32_t count_limit, double* total) {
  static_assert(MinMaxScan<false>::kStep == 32, "the next row is scanned in this loop's steps");
  constexpr bool LIMIT = MODE == CountMode::kBelowLimit;
  float* e32 = ws.e32.data();
  uint16_t* bucket = ws.bucket.data();
  int32_t* count = ws.count.data();
  const __m512 max_f = _mm512_set1_ps(max), scale_f = _mm512_set1_ps(bucket_scale);
  const __m512i tiny_lanes = tiny_lanes16();
  __m512d sum[2] = {_mm512_setzero_pd(), _mm512_setzero_pd()};
  const __m512i limit_v = _mm512_set1_epi32(static_cast<int32_t>(count_limit));
  uint32_t* listed = ws.listed.data();
  int64_t num_listed = 0, num_counted = 0;
  auto list16 = [&](__m512i b) {
    const __mmask16 k = _mm512_cmplt_epu32_mask(b, limit_v);
    _mm512_storeu_si512(listed + num_listed, _mm512_maskz_compress_epi32(k, b));
    num_listed += __builtin_popcount(k);
  };
  auto count_listed = [&](int64_t upto) {  // the listed buckets [num_counted, upto), in pairs
    for (; num_counted + 2 <= upto; num_counted += 2) ++count[listed[num_counted]], ++odd[listed[num_counted + 1]];
  };
  int64_t j = 0;
  for (; j + 32 <= vocab_size; j += 32) {
    if (next_row != nullptr) {
      _mm_prefetch(reinterpret_cast<const char*>(next_row + j + kScanAhead), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(next_row + j + kScanAhead + 16), _MM_HINT_T0);
      next_scan->step(next_row + j);
    }
    const __m512 t0 = _mm512_sub_ps(max_f, _mm512_loadu_ps(x + j));  // the gaps, >= 0 (+inf for -inf)
    const __m512 t1 = _mm512_sub_ps(max_f, _mm512_loadu_ps(x + j + 16));
    const __m512 e0 = exp32_of_gap16<CLAMP>(t0), e1 = exp32_of_gap16<CLAMP>(t1);
    _mm512_storeu_ps(e32 + j, e0);
    _mm512_storeu_ps(e32 + j + 16, e1);
    const __m512i b0 = bucket16(t0, scale_f, tiny_lanes), b1 = bucket16(t1, scale_f, tiny_lanes);
    store_buckets32(bucket + j, b0, b1);
    const __m512 pair = _mm512_add_ps(e0, e1);  // the total: one float32 rounding (see fast_exp_pass), then float64
    sum[0] = _mm512_add_pd(sum[0], low_pd(pair));
    sum[1] = _mm512_add_pd(sum[1], high_pd(pair));
    if (LIMIT) {
      list16(b0);
      list16(b1);
      // 32 listed buckets at a time, once that many wait past the lag: a count of however many there are took a
      // loop whose trip count changed every step, and its exits were mispredicted (on an Intel Xeon, AVX-512, 64
      // different rows each: Gumbel(0, 2) logits 30.6 -> 27.3 us per row, N(0, 4) at top-p 0.9 47.9 -> 35.8,
      // N(0, 3) at 0.5 40.1 -> 34.8; rows that count every token unchanged).
      if (num_listed - COUNT_LAG - num_counted >= 32) {
#pragma GCC unroll 16
        for (int q = 0; q < 32; q += 2) ++count[listed[num_counted + q]], ++odd[listed[num_counted + q + 1]];
        num_counted += 32;
      }
    } else if (MODE == CountMode::kAll && j >= COUNT_LAG) {
      count_buckets(bucket + j - COUNT_LAG, 32, count, odd);
    }
  }
  *next_scan_end = j;
  if (j + 16 <= vocab_size) {
    const __m512 t = _mm512_sub_ps(max_f, _mm512_loadu_ps(x + j));
    const __m512 e = exp32_of_gap16<CLAMP>(t);
    _mm512_storeu_ps(e32 + j, e);
    const __m512i b = bucket16(t, scale_f, tiny_lanes);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(bucket + j), _mm512_cvtepi32_epi16(b));
    if (LIMIT) list16(b);
    sum[0] = _mm512_add_pd(sum[0], low_pd(e));
    sum[1] = _mm512_add_pd(sum[1], high_pd(e));
    j += 16;
  }
  if (LIMIT) {
    count_listed(num_listed);
    if (num_counted < num_listed) ++count[listed[num_counted]];
  } else if (MODE == CountMode::kAll) {
    const int64_t uncounted = std::max<int64_t>(j - COUNT_LAG, 0);
    count_buckets(bucket + uncounted, j - uncounted, count, odd);
  }
  *total += _mm512_reduce_add_pd(_mm512_add_pd(sum[0], sum[1]));
  return j;
}
#endif

}  // namespace

double fast_exp_pass(const float* x, int64_t vocab_size, const RowScan& scan, float bucket_scale, CountMode mode,
                     int count_limit, const float* next_row, Workspace& ws) {
  float* e32 = ws.e32.data();
  uint16_t* bucket = ws.bucket.data();
  int32_t* count = ws.count.data();
  int32_t odd[NUM_BUCKETS];
  const bool counting = mode != CountMode::kAfter;
  if (counting) {
    std::fill(count, count + NUM_BUCKETS, 0);
    std::fill(odd, odd + NUM_BUCKETS, 0);
  }
  // The next row's scan (scan_row's values), made on the way by the vector loops and handed over in ws (the row loop
  // clears ws.next_scanned before each row).
  MinMaxScan<false> next_scan;
  int64_t next_scan_end = 0;
  const float max = scan.max;
  double total = 0.0;
  int64_t j = 0;
  const bool clamp = scan.has_neg_inf || static_cast<double>(scan.max) - scan.min_finite > EXP32_GAP_MAX;
#if defined(FASTGPT2_AVX512)
  if (mode == CountMode::kBelowLimit) ws.listed_at_least(vocab_size + 16);
  auto loop = [&](auto clamp_c, auto mode_c) {
    return fast_exp_loop512<decltype(clamp_c)::value, decltype(mode_c)::value>(
        x, vocab_size, max, bucket_scale, next_row, &next_scan, &next_scan_end, ws, odd,
        static_cast<uint32_t>(count_limit), &total);
  };
  using T = std::true_type;
  using F = std::false_type;
  using All = std::integral_constant<CountMode, CountMode::kAll>;
  using Below = std::integral_constant<CountMode, CountMode::kBelowLimit>;
  using After = std::integral_constant<CountMode, CountMode::kAfter>;
  if (mode == CountMode::kAll) j = clamp ? loop(T{}, All{}) : loop(F{}, All{});
  else if (mode == CountMode::kBelowLimit) j = clamp ? loop(T{}, Below{}) : loop(F{}, Below{});
  else j = clamp ? loop(T{}, After{}) : loop(F{}, After{});
#elif defined(FASTGPT2_AVX2)
  auto loop = [&](auto clamp_c, auto count_c) {
    return fast_exp_loop<decltype(clamp_c)::value, decltype(count_c)::value>(x, vocab_size, max, bucket_scale,
                                                                             next_row, &next_scan, ws, odd, &total);
  };
  using T = std::true_type;
  using F = std::false_type;
  j = counting ? (clamp ? loop(T{}, T{}) : loop(F{}, T{})) : (clamp ? loop(T{}, F{}) : loop(F{}, F{}));
  next_scan_end = j;
#endif
#if defined(FASTGPT2_AVX2)
  if (next_row != nullptr) {
    ws.next_scan = finish_scan(next_scan, next_row, next_scan_end, vocab_size);
    ws.next_scanned = next_row;
  }
#endif
  static_cast<void>(next_scan_end);
  static_cast<void>(clamp), static_cast<void>(count_limit);
  for (; j < vocab_size; ++j) {
    e32[j] = exp32_of_gap(max - x[j]);
    total += e32[j];
    store_bucket(x, j, max, bucket_scale, bucket);
    if (counting) ++count[bucket[j]];
  }
  const int64_t padded = (vocab_size + BLOCK - 1) / BLOCK * BLOCK;
  if (counting) {
    finish_histogram(count, odd, bucket, vocab_size);  // the padding's buckets too
  } else {
    std::fill(bucket + vocab_size, bucket + padded, static_cast<uint16_t>(BUCKET_PAD));
  }
  std::fill(e32 + vocab_size, e32 + padded, 0.0f);
  return total;
}

void fast_count_pass(Workspace& ws, int64_t vocab_size, int count_limit) {
  uint16_t* bucket = ws.bucket.data();
  int32_t* count = ws.count.data();
  int32_t odd[NUM_BUCKETS];
  std::fill(count, count + NUM_BUCKETS, 0);
  std::fill(odd, odd + NUM_BUCKETS, 0);
  // The buckets below the limit listed (the padding's and the tiny bucket's are past it), then counted in pairs.
  const int64_t padded = (vocab_size + BLOCK - 1) / BLOCK * BLOCK;
  uint32_t* ids = ws.listed_at_least(padded + 16);
  int64_t n = 0, j = 0;
#if defined(FASTGPT2_AVX2) && !defined(FASTGPT2_AVX512)
  const __m256i limit_v = _mm256_set1_epi32(count_limit);
  for (; j < padded; j += 8) {
    const __m256i b = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bucket + j)));
    const int m = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(limit_v, b)));
    const __m256i order = _mm256_load_si256(reinterpret_cast<const __m256i*>(kCompress8.lanes[m]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(ids + n), _mm256_permutevar8x32_epi32(b, order));
    n += __builtin_popcount(m);
  }
#endif
  for (; j < padded; ++j)
    if (bucket[j] < count_limit) ids[n++] = bucket[j];
  int64_t i = 0;
  for (; i + 2 <= n; i += 2) ++count[ids[i]], ++odd[ids[i + 1]];
  if (i < n) ++count[ids[i]];
  finish_histogram(count, odd, bucket, vocab_size);
}

FastWindow fast_window_pass(Workspace& ws, const float* x, float max, float bucket_scale, int64_t vocab_size,
                            int first, int last, std::vector<RankedToken>& window, double* block_mass) {
  const float* e32 = ws.e32.data();
  const uint16_t* bucket = ws.bucket.data();
  const int64_t padded = (vocab_size + BLOCK - 1) / BLOCK * BLOCK;
  FastWindow sums{0.0, 0.0};
  static_cast<void>(bucket_scale);  // the AVX2 loop's recomputed bucket index only
  // One pass: per block, the e32 mass of the tokens in buckets < first (pairs added in float32, then float64), and
  // the ids of the window's tokens (buckets [first, last]; the padding's buckets are past `last`) into ws.listed (the
  // exp pass is done with it). The vector loops take a group of blocks at a time: their sums are reduced together (a
  // transposing tree instead of a horizontal sum per block) and the group's window masks are turned into ids after
  // it, so that the loops keep their constants in registers (a push_back inside made the compiler spill them).
  // Measured per top-p row of 50257 N(0, 3) logits on an Intel Xeon, the whole row: ~37 -> ~34 us (AVX-512), ~45.5 ->
  // ~43.4 us (AVX2 build).
  uint32_t* ids = ws.listed_at_least(padded);
  int64_t num_ids = 0;
  int64_t start = 0;
#if defined(FASTGPT2_AVX512)
  {
    static_assert(BLOCK == 64, "two steps of 32 tokens per block");
    constexpr int kGroup = 8;  // blocks per reduction: one double lane each
    const __m512i first_v = _mm512_set1_epi16(static_cast<int16_t>(first));
    const __m512i last_v = _mm512_set1_epi16(static_cast<int16_t>(last));
    __m512d above_acc = _mm512_setzero_pd();
    for (; start < padded; start += kGroup * BLOCK) {
      const int blocks = static_cast<int>(std::min<int64_t>(kGroup, (padded - start) / BLOCK));
      __m512d acc[kGroup];
      uint32_t in_masks[2 * kGroup];  // per 32 tokens, a bit per window token
#pragma GCC unroll 8
      for (int b = 0; b < kGroup; ++b) {
        acc[b] = _mm512_setzero_pd();
        if (b >= blocks) continue;
        for (int h = 0; h < 2; ++h) {
          const int64_t j = start + b * BLOCK + 32 * h;
          const __m512i bk = _mm512_loadu_si512(bucket + j);
          const __mmask32 above = _mm512_cmplt_epu16_mask(bk, first_v);
          in_masks[2 * b + h] = _mm512_mask_cmple_epu16_mask(~above, bk, last_v);
          const __m512 v = _mm512_add_ps(_mm512_maskz_loadu_ps(static_cast<__mmask16>(above), e32 + j),
                                         _mm512_maskz_loadu_ps(static_cast<__mmask16>(above >> 16), e32 + j + 16));
          acc[b] = _mm512_add_pd(acc[b], _mm512_add_pd(low_pd(v), high_pd(v)));
        }
      }
      const __m512d group = reduce8_pd(acc);  // lane b: block b's mass
      _mm512_mask_storeu_pd(block_mass + start / BLOCK, static_cast<__mmask8>((1u << blocks) - 1), group);
      above_acc = _mm512_add_pd(above_acc, group);
      for (int m = 0; m < 2 * blocks; ++m) {
        for (uint32_t in = in_masks[m]; in; in &= in - 1) ids[num_ids++] = start + 32 * m + __builtin_ctz(in);
      }
    }
    sums.above = _mm512_reduce_add_pd(above_acc);
  }
#elif defined(FASTGPT2_AVX2)
  {
    static_assert(BLOCK == 64, "four steps of 16 tokens per block");
    constexpr int kGroup = 4;  // blocks per reduction: one double lane each
    // bucket < first recomputed from x in the float lanes: (max - x) * scale < first, the same float32 operations
    // as the stored bucket index (cheaper than widening a 16-bit compare to the float lanes); the window from the
    // stored buckets' 16-bit compares (2 mask bits per token).
    const __m256 max_f = _mm256_set1_ps(max), scale_f = _mm256_set1_ps(bucket_scale);
    const __m256 first_f = _mm256_set1_ps(static_cast<float>(first));
    const __m256i first_v = _mm256_set1_epi16(static_cast<int16_t>(first));
    const __m256i last_v = _mm256_set1_epi16(static_cast<int16_t>(last));
    __m256d above_acc = _mm256_setzero_pd();
    for (; start + kGroup * BLOCK <= vocab_size; start += kGroup * BLOCK) {  // whole groups: x ends at vocab_size
      __m256d acc[kGroup];
      uint32_t in_masks[4 * kGroup];
      for (int b = 0; b < kGroup; ++b) {
        __m256d acc0 = _mm256_setzero_pd(), acc1 = _mm256_setzero_pd();
        for (int q = 0; q < 4; ++q) {
          const int64_t j = start + b * BLOCK + 16 * q;
          const __m256 m0 = _mm256_mul_ps(_mm256_sub_ps(max_f, _mm256_loadu_ps(x + j)), scale_f);
          const __m256 m1 = _mm256_mul_ps(_mm256_sub_ps(max_f, _mm256_loadu_ps(x + j + 8)), scale_f);
          const __m256 v0 = _mm256_and_ps(_mm256_loadu_ps(e32 + j), _mm256_cmp_ps(m0, first_f, _CMP_LT_OQ));
          const __m256 v1 = _mm256_and_ps(_mm256_loadu_ps(e32 + j + 8), _mm256_cmp_ps(m1, first_f, _CMP_LT_OQ));
          // One float32 addition (relative error <= 2^-24 < FAST_BLOCK_SUM_ERROR), then float64.
          const __m256 v = _mm256_add_ps(v0, v1);
          acc0 = _mm256_add_pd(acc0, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
          acc1 = _mm256_add_pd(acc1, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
          const __m256i bk = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bucket + j));
          const __m256i outside = _mm256_or_si256(_mm256_cmpgt_epi16(first_v, bk), _mm256_cmpgt_epi16(bk, last_v));
          in_masks[4 * b + q] = ~static_cast<uint32_t>(_mm256_movemask_epi8(outside));
        }
        acc[b] = _mm256_add_pd(acc0, acc1);
      }
      const __m256d group = reduce4_pd(acc);  // lane b: block b's mass
      _mm256_storeu_pd(block_mass + start / BLOCK, group);
      above_acc = _mm256_add_pd(above_acc, group);
      for (int m = 0; m < 4 * kGroup; ++m) {
        for (uint32_t in = in_masks[m]; in; in &= in - 1, in &= in - 1) {
          ids[num_ids++] = start + 16 * m + (__builtin_ctz(in) >> 1);
        }
      }
    }
    sums.above = hsum(above_acc);
  }
#endif
  for (; start < padded; start += BLOCK) {  // the padding's e32 is 0
    double block = 0.0;
    for (int64_t j = start; j < start + BLOCK; ++j) {
      block += bucket[j] < first ? e32[j] : 0.0f;
      if (bucket[j] >= first && bucket[j] <= last) ids[num_ids++] = j;
    }
    block_mass[start / BLOCK] = block;
    sums.above += block;
  }
  // The window in id order, then its tokens' exact e, the same as exp_pass's (bit-identical scalar and AVX2 exp).
  window.resize(num_ids);
  for (int64_t k = 0; k < num_ids; ++k) window[k] = {0.0, ids[k]};
  const double max_d = max;
  RankedToken* w = window.data();
  const size_t n = window.size();
  size_t i = 0;
#ifdef FASTGPT2_AVX2
  // 8 at a time: the window's tokens are finite and within RANGE_MAX of the max, so no clamp (~3 us less per row of
  // 50257 than the scalar exp's latency-bound loop).
  const __m256d max_v = _mm256_set1_pd(max_d);
  for (; i + 8 <= n; i += 8) {
    __m256d d[2], ev[2], valid[2];
    for (int u = 0; u < 2; ++u) {
      const RankedToken* t = w + i + 4 * u;
      d[u] = _mm256_sub_pd(_mm256_setr_pd(x[t[0].id], x[t[1].id], x[t[2].id], x[t[3].id]), max_v);
    }
    exp_nonpositive4<false>(d, ev, valid);
    alignas(32) double lanes[8];
    _mm256_store_pd(lanes, ev[0]);
    _mm256_store_pd(lanes + 4, ev[1]);
    for (int l = 0; l < 8; ++l) w[i + l].e = lanes[l];
  }
#endif
  for (; i < n; ++i) w[i].e = exp_nonpositive(static_cast<double>(x[w[i].id]) - max_d);
  for (const RankedToken& t : window) sums.window_e32 += e32[t.id];
  return sums;
}

double fast_mass_below(const Workspace& ws, int64_t padded, int last) {
  const float* e32 = ws.e32.data();
  const uint16_t* bucket = ws.bucket.data();
  double total = 0.0;
  int64_t j = 0;
#if defined(FASTGPT2_AVX512)
  const __m512i last_v = _mm512_set1_epi16(static_cast<int16_t>(last));
  __m512d acc0 = _mm512_setzero_pd(), acc1 = _mm512_setzero_pd();
  for (; j < padded; j += 32) {  // padded is a multiple of 32
    const __mmask32 below = _mm512_cmpgt_epu16_mask(_mm512_loadu_si512(bucket + j), last_v);
    const __m512 v = _mm512_add_ps(_mm512_maskz_loadu_ps(static_cast<__mmask16>(below), e32 + j),
                                   _mm512_maskz_loadu_ps(static_cast<__mmask16>(below >> 16), e32 + j + 16));
    acc0 = _mm512_add_pd(acc0, low_pd(v));
    acc1 = _mm512_add_pd(acc1, high_pd(v));
  }
  total = _mm512_reduce_add_pd(_mm512_add_pd(acc0, acc1));
#elif defined(FASTGPT2_AVX2)
  // Intrinsics on purpose: gcc 12.2 at -O3 -mavx2 miscompiles the plain loop that selects e32 by a uint16 compare
  // and adds the pairs in float32 (a wrong sum; reproduced in a 15-line program).
  const __m256i last_v = _mm256_set1_epi16(static_cast<int16_t>(last));
  __m256d acc0 = _mm256_setzero_pd(), acc1 = _mm256_setzero_pd();
  for (; j < padded; j += 16) {
    const __m256i below = _mm256_cmpgt_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bucket + j)), last_v);
    const __m256 v0 = _mm256_and_ps(_mm256_loadu_ps(e32 + j),
                                    _mm256_castsi256_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(below))));
    const __m256 v1 = _mm256_and_ps(_mm256_loadu_ps(e32 + j + 8),
                                    _mm256_castsi256_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(below, 1))));
    const __m256 v = _mm256_add_ps(v0, v1);  // one float32 addition per pair, then float64
    acc0 = _mm256_add_pd(acc0, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
    acc1 = _mm256_add_pd(acc1, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
  }
  total = hsum(_mm256_add_pd(acc0, acc1));
#endif
  for (; j < padded; ++j) {  // float64 throughout (within the same bound)
    if (bucket[j] > last) total += e32[j];
  }
  return total;
}

}  // namespace sampling_detail
}  // namespace fastgpt2
