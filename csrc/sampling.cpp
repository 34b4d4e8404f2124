// Top-k / top-p / min-p truncation and sampling on CPU; see sampling.h for the semantics and the method.
#include "sampling.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <exception>
#include <limits>
#include <system_error>
#include <thread>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define FASTGPT2_AVX2 1
#endif

namespace fastgpt2 {
namespace {

constexpr int NUM_LINEAR_BUCKETS = 2046;  // buckets 0..2045 split max - x in [0, range] evenly
constexpr int BUCKET_TINY = 2046;  // x < max - range, p == 0 included
constexpr int BUCKET_PAD = 2047;  // the padding past the vocab, in no bucket range
constexpr int NUM_BUCKETS = 2048;
constexpr double RANGE_MAX = 64.0;  // the linear buckets cover at most e^-64 .. 1 relative to p_max
constexpr double EXP_MIN = -708.0;  // e = 0 below this (exp(-708) is still a normal double)
constexpr int64_t BLOCK = 64;  // tokens per draw partial sum; buffers are padded to a multiple of it
constexpr int RADIX_BUCKETS = 256;
constexpr size_t RADIX_SMALL = 32;  // lists this short are sorted instead of split
constexpr size_t MAX_RADIX_DEPTH = 16;  // 8 bits of the 64-bit key per level, so 9 levels at most

// exp(r) = 1 + r * q(r) for |r| <= ln 2 / 2; q is a degree-8 Chebyshev fit (relative error of exp < 4e-14, far
// below the gaps that truncation decisions compare; exp(0) is exactly 1).
constexpr int EXP_POLY_LEN = 9;
constexpr double EXP_POLY[EXP_POLY_LEN] = {2.762511557828763e-06, 2.4876178959085513e-05, 0.00019841208732536384,
                                           0.001388882165071769,  0.008333333353729397,   0.0416666668910917,
                                           0.1666666666664829,    0.49999999999797773,    1.0};
constexpr double LOG2E = 1.4426950408889634;
constexpr double LN2 = 0.6931471805599453;
constexpr double ROUND_SHIFT = 6755399441055744.0;  // 1.5 * 2^52: adding it rounds to an integer kept in the low bits

inline uint64_t bits_of(double x) {
  uint64_t u;
  std::memcpy(&u, &x, sizeof(double));
  return u;
}

inline double double_of(uint64_t u) {
  double x;
  std::memcpy(&x, &u, sizeof(double));
  return x;
}

// exp(d) for d <= 0 or -inf, 0 below EXP_MIN. The AVX2 version below performs the same IEEE operations in the same
// order, so both give bit-identical results; equal logits therefore always get equal e.
inline double exp_nonpositive(double d) {
  const double dc = d > EXP_MIN ? d : EXP_MIN;
  const double shifted = std::fma(dc, LOG2E, ROUND_SHIFT);
  const double k = shifted - ROUND_SHIFT;  // round(dc / ln 2), in [-1021, 0]
  const double r = std::fma(-k, LN2, dc);  // one-step reduction: the error k * 2e-17 is below 1 ulp of exp
  double q = EXP_POLY[0];
  for (int i = 1; i < EXP_POLY_LEN; ++i) q = std::fma(q, r, EXP_POLY[i]);
  const double p = std::fma(q, r, 1.0);
  const uint64_t bits = bits_of(p) + (bits_of(shifted) << 52);  // p * 2^k via the exponent field (k is in the low bits)
  return d >= EXP_MIN ? double_of(bits) : 0.0;
}

// The histogram bucket of d = x - max: floor(-d * scale), monotone in d; NaN (-inf * 0) and overflow go to
// BUCKET_TINY. Matches the AVX2 path (truncating conversion, then an unsigned min).
inline uint32_t bucket_of(double d, double bucket_scale) {
  const double t = -d * bucket_scale;
  return t < double(BUCKET_TINY) ? static_cast<uint32_t>(t) : uint32_t{BUCKET_TINY};
}

#ifdef FASTGPT2_AVX2
// exp_nonpositive on 4 lanes; `valid` gets the lanes with d >= EXP_MIN (all ones) or p == 0 (zero).
inline __m256d exp_nonpositive4(__m256d d, __m256d* valid) {
  const __m256d dc = _mm256_max_pd(d, _mm256_set1_pd(EXP_MIN));
  const __m256d shifted = _mm256_fmadd_pd(dc, _mm256_set1_pd(LOG2E), _mm256_set1_pd(ROUND_SHIFT));
  const __m256d k = _mm256_sub_pd(shifted, _mm256_set1_pd(ROUND_SHIFT));
  const __m256d r = _mm256_fnmadd_pd(k, _mm256_set1_pd(LN2), dc);
  __m256d q = _mm256_set1_pd(EXP_POLY[0]);
  for (int i = 1; i < EXP_POLY_LEN; ++i) q = _mm256_fmadd_pd(q, r, _mm256_set1_pd(EXP_POLY[i]));
  const __m256d p = _mm256_fmadd_pd(q, r, _mm256_set1_pd(1.0));
  const __m256i bits = _mm256_add_epi64(_mm256_castpd_si256(p), _mm256_slli_epi64(_mm256_castpd_si256(shifted), 52));
  *valid = _mm256_cmp_pd(d, _mm256_set1_pd(EXP_MIN), _CMP_GE_OQ);
  return _mm256_and_pd(_mm256_castsi256_pd(bits), *valid);
}

inline double hsum(__m256d v) {
  const __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
  return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}
#endif

// A cut in rank order: token i is kept iff e_i > e or (e_i == e and i <= id). {0, -1} keeps every token with e > 0.
struct Cut {
  double e;
  int64_t id;
};
constexpr Cut KEEP_ALL_POSITIVE{0.0, -1};

inline bool is_kept(double e, int64_t i, const Cut& cut) { return e > cut.e || (e == cut.e && i <= cut.id); }

// min-p keeps e >= min_p (e_max is exactly 1); the kept set is the intersection, itself a cut.
inline Cut with_min_p(const Cut& cut, double min_p) { return min_p > cut.e ? Cut{min_p, INT64_MAX} : cut; }

struct RankedToken {
  double e;
  int64_t id;
};

inline bool ranks_before(const RankedToken& a, const RankedToken& b) {
  return a.e > b.e || (a.e == b.e && a.id < b.id);
}

// Per-thread scratch, reused across rows and calls (thread_local) so that a row allocates nothing in steady state.
struct Workspace {
  std::vector<double> e;  // (padded V,) exp(x - max), 0 in the padding
  std::vector<uint16_t> bucket;  // (padded V,) histogram bucket, BUCKET_PAD in the padding
  std::vector<int32_t> count;  // (NUM_BUCKETS,) tokens per bucket
  std::vector<double> block_mass;  // (padded V / BLOCK,) kept mass per block of the draw
  std::vector<RankedToken> list;  // tokens of a bucket range, id order
  std::vector<RankedToken> kept;  // the top-k set, id order
  std::vector<std::vector<RankedToken>> levels;  // radix sub-lists, one per depth
  std::vector<RankedToken> sorted;

  void reserve(int64_t padded) {
    if (static_cast<int64_t>(e.size()) < padded) {
      e.resize(padded);
      bucket.resize(padded);
      block_mass.resize(padded / BLOCK);
    }
    count.resize(NUM_BUCKETS);
    levels.resize(MAX_RADIX_DEPTH);  // never resized inside resolve(), which holds references into it
  }
};

struct RowScan {
  float max;
  float min_finite;
  bool has_nan;
};

// read V floats; lane-wise accumulators so that gcc vectorises the loop.
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

struct ExpSums {
  double total;  // sum of e
  int64_t num_zero;  // tokens with e == 0
};

// e = exp(x - max), its sum and its zeros; with HIST also each token's bucket and the tokens per bucket.
// read V floats; write V doubles (+ V uint16 and a 2048-entry count histogram).
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
  alignas(32) int32_t lanes[8];
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
      _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), b);
      for (int l = 0; l < 8; ++l) ++count[lanes[l]];
    }
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

// Tokens with bucket <= last, appended to `out` in id order (the top-k candidates). read padded V uint16.
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

// The top-p pass: returns the mass of the tokens with e > e_above and writes it per block into block_mass; appends
// the tokens with e_below < e <= e_above to `window` in id order. Window tokens are looked for only in buckets
// [first, last], which must hold all of them, so that most of the pass is a masked sum.
// read padded V doubles + padded V uint16.
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

// Per block, the mass of the tokens kept by `cut`. read padded V doubles.
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

// Where a rank-order walk stands: tokens and mass ranked before (or, in Hit::incl, up to and including) a token.
struct Walk {
  int64_t count;
  double mass;
};

struct Hit {
  bool found;
  RankedToken token;
  Walk incl;
};

// Walks `tokens` (id order, e > 0) in rank order starting after `before` and returns the first token at which the
// walk holds need_count tokens (need_count > 0) or at least need_mass mass. An MSB-first radix select on the bits of
// e (monotone for e >= 0): each level histograms (count, mass) over 256 buckets of the remaining key range and
// descends into the one bucket where the criterion is met; short or all-tied lists are walked directly.
Hit resolve(const std::vector<RankedToken>& tokens, Walk before, int64_t need_count, double need_mass, size_t depth,
            Workspace& ws) {
  auto reached = [&](const Walk& w) { return need_count > 0 ? w.count >= need_count : w.mass >= need_mass; };
  auto walk = [&](const std::vector<RankedToken>& ordered) -> Hit {
    for (const RankedToken& t : ordered) {
      before.count += 1;
      before.mass += t.e;
      if (reached(before)) return {true, t, before};
    }
    return {false, {}, before};
  };
  uint64_t key_min = ~uint64_t{0}, key_max = 0;
  for (const RankedToken& t : tokens) {
    key_min = std::min(key_min, bits_of(t.e));
    key_max = std::max(key_max, bits_of(t.e));
  }
  if (tokens.size() <= RADIX_SMALL || key_min == key_max) {  // all tied: id order is rank order
    if (key_min == key_max) return walk(tokens);
    ws.sorted.assign(tokens.begin(), tokens.end());
    std::sort(ws.sorted.begin(), ws.sorted.end(), ranks_before);
    return walk(ws.sorted);
  }
  int shift = 0;
  while (((key_max - key_min) >> shift) >= RADIX_BUCKETS) ++shift;
  std::array<int64_t, RADIX_BUCKETS> count{};
  std::array<double, RADIX_BUCKETS> mass{};
  for (const RankedToken& t : tokens) {
    const size_t b = (key_max - bits_of(t.e)) >> shift;
    count[b] += 1;
    mass[b] += t.e;
  }
  for (int b = 0; b < RADIX_BUCKETS; ++b) {
    const Walk next{before.count + count[b], before.mass + mass[b]};
    if (count[b] == 0 || !reached(next)) {
      before = next;
      continue;
    }
    std::vector<RankedToken>& sub = ws.levels[depth];
    sub.clear();
    for (const RankedToken& t : tokens) {
      if (static_cast<int>((key_max - bits_of(t.e)) >> shift) == b) sub.push_back(t);
    }
    const Hit hit = resolve(sub, before, need_count, need_mass, depth + 1, ws);
    if (hit.found) return hit;
    before = hit.incl;  // rounding left the bucket short of the target: go on with the next one
  }
  return {false, {}, before};
}

// Bucket range [first, last] that must contain the top-p boundary, from rigorous bounds on each bucket's mass:
// a token of linear bucket b has e in [exp(-(b+1)/scale), exp(-b/scale)] up to rounding (relative slack).
struct Bracket {
  int first, last;
  double e_above;  // upper bound of e in bucket `first`: tokens above it are all in buckets < first
  double e_below;  // below the lower bound of e in bucket `last`: tokens at or below it are in buckets > last
};

Bracket bracket_mass(const int32_t* count, double target, double inv_scale, double slack) {
  const double ratio = std::exp(-inv_scale);
  double e_top = 1.0;  // exp(-b / scale)
  double upper = 0.0, lower = 0.0;  // bounds on the mass of buckets < b
  Bracket bracket{0, BUCKET_TINY, 1.0 + slack, 0.0};
  for (int b = 0; b <= BUCKET_TINY; ++b) {
    const double e_hi = e_top * (1.0 + slack);
    const double e_lo = b == BUCKET_TINY ? 0.0 : e_top * ratio * (1.0 - slack);
    if (upper < target) bracket = {b, BUCKET_TINY, e_hi, 0.0};
    upper += count[b] * e_hi;
    lower += count[b] * e_lo;
    if (lower >= target) {
      bracket.last = b;
      bracket.e_below = e_lo * (1.0 - slack);
      break;
    }
    e_top *= ratio;
  }
  return bracket;
}

// How the draw (or the candidate list) finds the kept tokens once the cut is known.
enum class KeptSource {
  kScan,  // scan the row with the cut
  kBlocks,  // ws.block_mass already holds each block's kept mass
  kList,  // the kept tokens are the entries of ws.kept that the cut keeps (id order)
};

struct RowPlan {
  Cut cut;  // kept set, min-p included
  KeptSource source;
};

// Steps 1-6 of sampling.h for one row: fills ws.e and returns how to find the kept set.
RowStatus plan_row(const float* x, int64_t vocab_size, int64_t top_k, double top_p, double min_p,
                   const float* next_row, Workspace& ws, RowPlan* plan) {
  const RowScan scan = scan_row(x, vocab_size);
  if (scan.has_nan) return kNaN;
  if (scan.max == std::numeric_limits<float>::infinity()) return kPosInf;
  if (scan.max == -std::numeric_limits<float>::infinity()) return kNoFinite;
  const int64_t padded = (vocab_size + BLOCK - 1) / BLOCK * BLOCK;
  ws.reserve(padded);
  const Cut min_p_only = with_min_p(KEEP_ALL_POSITIVE, min_p);
  const bool topk_requested = top_k > 0 && top_k < vocab_size;
  if (top_p >= 1.0 && !topk_requested) {  // min-p at most: a threshold, no histogram
    exp_pass<false>(x, vocab_size, scan.max, 0.0, next_row, ws);
    *plan = {min_p_only, KeptSource::kScan};
    return kOk;
  }

  // 1. e, its sum and the bucket histogram over max - x in [0, range].
  const double range = std::min(static_cast<double>(scan.max) - scan.min_finite, RANGE_MAX);
  const double bucket_scale = range > 1e-300 ? NUM_LINEAR_BUCKETS / range : 0.0;
  const double inv_scale = bucket_scale > 0.0 ? 1.0 / bucket_scale : std::numeric_limits<double>::infinity();
  constexpr double slack = 1e-12;  // rounding of the bucket index, the exp and the bound recurrence (< 3e-13)
  const ExpSums sums = exp_pass<true>(x, vocab_size, scan.max, bucket_scale, next_row, ws);
  const int32_t* count = ws.count.data();
  const int64_t num_positive = vocab_size - sums.num_zero;

  // 2. top-k: counts are exact, so the k-th token's bucket is known; every token up to that bucket is collected and
  // the top-k set, its mass and the top-p cut inside it are resolved on that list.
  if (top_k > 0 && top_k < num_positive) {
    int last = 0;
    for (int64_t seen = count[0]; seen < top_k; seen += count[++last]) {
    }
    bucket_prefix_pass(ws, padded, last, ws.list);
    const Hit kth = resolve(ws.list, {0, 0.0}, top_k, 0.0, 0, ws);
    Cut cut = kth.found ? Cut{kth.token.e, kth.token.id} : KEEP_ALL_POSITIVE;
    ws.kept.clear();
    for (const RankedToken& t : ws.list) {
      if (is_kept(t.e, t.id, cut)) ws.kept.push_back(t);
    }
    if (top_p < 1.0) {
      const Hit boundary = resolve(ws.kept, {0, 0.0}, 0, top_p * kth.incl.mass, 0, ws);
      if (boundary.found) cut = {boundary.token.e, boundary.token.id};
    }
    *plan = {with_min_p(cut, min_p), KeptSource::kList};
    return kOk;
  }
  if (top_p >= 1.0) {
    *plan = {min_p_only, KeptSource::kScan};
    return kOk;
  }

  // 3. top-p: the bounds bracket the boundary in a few buckets; one pass sums the exact mass above them (and each
  // block's kept mass for the draw) and collects their tokens, on which the boundary is resolved exactly.
  const double target = top_p * sums.total;
  const Bracket bracket = bracket_mass(count, target, inv_scale, slack);
  if (min_p > bracket.e_above) {  // min-p cuts above every token the top-p boundary could fall on
    *plan = {min_p_only, KeptSource::kScan};
    return kOk;
  }
  // Tokens between e_below and e_above sit in buckets [first - 1, last + 1] (bounds overlap by the slack only), or
  // anywhere when the buckets are too narrow for that to hold.
  const bool narrow = inv_scale < 1e-10;
  const int first = narrow ? 0 : std::max(bracket.first - 1, 0);
  const int last = narrow ? BUCKET_TINY : std::min(bracket.last + 1, BUCKET_TINY);
  double* block_mass = ws.block_mass.data();
  const double mass_above =
      window_pass(ws, padded, bracket.e_above, bracket.e_below, first, last, ws.list, block_mass);
  if (mass_above < target) {
    const Hit boundary = resolve(ws.list, {0, mass_above}, 0, target, 0, ws);
    if (boundary.found) {
      const Cut cut = with_min_p({boundary.token.e, boundary.token.id}, min_p);
      for (const RankedToken& t : ws.list) {
        if (is_kept(t.e, t.id, cut)) block_mass[t.id / BLOCK] += t.e;
      }
      *plan = {cut, KeptSource::kBlocks};
      return kOk;
    }
  }
  // Rounding defeated the bounds (never seen in practice): resolve over every token with p > 0.
  bucket_prefix_pass(ws, padded, BUCKET_TINY, ws.list);
  const Hit boundary = resolve(ws.list, {0, 0.0}, 0, target, 0, ws);
  const Cut cut = boundary.found ? Cut{boundary.token.e, boundary.token.id} : KEEP_ALL_POSITIVE;
  *plan = {with_min_p(cut, min_p), KeptSource::kScan};
  return kOk;
}

// Step 7: the smallest kept id whose running kept mass in id order exceeds uniform * (kept mass).
int64_t draw_row(Workspace& ws, int64_t vocab_size, const RowPlan& plan, double uniform) {
  const double* e = ws.e.data();
  const Cut& cut = plan.cut;
  if (plan.source == KeptSource::kList) {
    double total = 0.0;
    int64_t last_kept = -1;
    for (const RankedToken& t : ws.kept) {
      if (is_kept(t.e, t.id, cut)) total += t.e, last_kept = t.id;
    }
    const double target = uniform * total;
    double running = 0.0;
    for (const RankedToken& t : ws.kept) {
      if (is_kept(t.e, t.id, cut) && (running += t.e) > target) return t.id;
    }
    return last_kept;
  }
  const int64_t padded = (vocab_size + BLOCK - 1) / BLOCK * BLOCK;
  const int64_t num_blocks = padded / BLOCK;
  double* block_mass = ws.block_mass.data();
  if (plan.source == KeptSource::kScan) block_sums(ws, padded, cut, block_mass);
  double total = 0.0;
  for (int64_t blk = 0; blk < num_blocks; ++blk) total += block_mass[blk];
  const double target = uniform * total;
  double running = 0.0;
  int64_t blk = 0;
  while (blk < num_blocks && !(running + block_mass[blk] > target)) running += block_mass[blk++];
  for (int64_t i = blk * BLOCK; i < vocab_size; ++i) {  // rescan the hit block (and on, if rounding says so)
    if (is_kept(e[i], i, cut) && (running += e[i]) > target) return i;
  }
  for (int64_t i = vocab_size - 1; i > 0; --i) {  // rounding left no hit: the last kept id
    if (is_kept(e[i], i, cut)) return i;
  }
  return 0;
}

// The kept tokens in id order with p = e / (kept mass).
void collect_row(const Workspace& ws, int64_t vocab_size, const RowPlan& plan, RowCandidates& out) {
  out.ids.clear();
  out.probs.clear();
  double total = 0.0;
  if (plan.source == KeptSource::kList) {
    for (const RankedToken& t : ws.kept) {
      if (is_kept(t.e, t.id, plan.cut)) out.ids.push_back(t.id), total += t.e;
    }
  } else {
    const double* e = ws.e.data();
    for (int64_t i = 0; i < vocab_size; ++i) {
      if (is_kept(e[i], i, plan.cut)) out.ids.push_back(i), total += e[i];
    }
  }
  out.probs.resize(out.ids.size());
  for (size_t n = 0; n < out.ids.size(); ++n) out.probs[n] = static_cast<float>(ws.e[out.ids[n]] / total);
}

// Runs row_fn(row, is_last_of_range, workspace) over [0, num_rows), rows split into contiguous ranges over up to
// num_threads threads.
template <typename RowFn>
void parallel_rows(int64_t num_rows, int num_threads, const RowFn& row_fn) {
  const int64_t num_workers = std::max<int64_t>(1, std::min<int64_t>(num_threads, num_rows));
  auto run_range = [&](int64_t begin, int64_t end) {
    thread_local Workspace ws;
    for (int64_t row = begin; row < end; ++row) row_fn(row, row + 1 == end, ws);
  };
  auto range_begin = [&](int64_t w) { return num_rows * w / num_workers; };
  std::vector<std::thread> threads;
  std::vector<std::exception_ptr> errors(num_workers);
  int64_t spawned = 1;
  for (; spawned < num_workers; ++spawned) {
    try {
      threads.emplace_back([&, spawned] {
        try {
          run_range(range_begin(spawned), range_begin(spawned + 1));
        } catch (...) {
          errors[spawned] = std::current_exception();
        }
      });
    } catch (const std::system_error&) {
      break;  // no more threads: the calling thread takes the remaining rows
    }
  }
  try {
    run_range(range_begin(0), range_begin(1));
    if (spawned < num_workers) run_range(range_begin(spawned), num_rows);
  } catch (...) {
    errors[0] = std::current_exception();
  }
  for (std::thread& t : threads) t.join();
  for (const std::exception_ptr& error : errors) {
    if (error) std::rethrow_exception(error);
  }
}

}  // namespace

void topk_topp_minp_sample(const float* logits_ptr, int64_t num_rows, int64_t vocab_size, int64_t stride_row,
                           const int64_t* top_k_ptr, const double* top_p_ptr, const double* min_p_ptr,
                           const double* uniform_ptr, int64_t* out_ptr, int32_t* status_ptr, int num_threads) {
  parallel_rows(num_rows, num_threads, [&](int64_t row, bool last, Workspace& ws) {
    RowPlan plan;
    const float* x = logits_ptr + row * stride_row;
    status_ptr[row] = plan_row(x, vocab_size, top_k_ptr[row], top_p_ptr[row], min_p_ptr[row],
                               last ? nullptr : x + stride_row, ws, &plan);
    out_ptr[row] = status_ptr[row] == kOk ? draw_row(ws, vocab_size, plan, uniform_ptr[row]) : -1;
  });
}

void topk_topp_minp_select(const float* logits_ptr, int64_t num_rows, int64_t vocab_size, int64_t stride_row,
                           const int64_t* top_k_ptr, const double* top_p_ptr, const double* min_p_ptr,
                           std::vector<RowCandidates>& candidates, int32_t* status_ptr, int num_threads) {
  candidates.resize(num_rows);
  parallel_rows(num_rows, num_threads, [&](int64_t row, bool last, Workspace& ws) {
    RowPlan plan;
    const float* x = logits_ptr + row * stride_row;
    status_ptr[row] = plan_row(x, vocab_size, top_k_ptr[row], top_p_ptr[row], min_p_ptr[row],
                               last ? nullptr : x + stride_row, ws, &plan);
    if (status_ptr[row] == kOk) collect_row(ws, vocab_size, plan, candidates[row]);
  });
}

}  // namespace fastgpt2
