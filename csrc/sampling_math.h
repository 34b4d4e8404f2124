// Shared internals of the CPU sampler (sampling*.cpp, not part of sampling.h's API): the bucket and radix constants,
// the bit-exact exp of a non-positive float64 (scalar and AVX2), the rank-order cut, and the per-thread workspace.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

// gcc 12's AVX-512 headers trip -W(maybe-)uninitialized on their own undefined-vector arguments (GCC bug 105593,
// fixed in 12.3 and 13): silenced for the sampler's translation units, which include this header before intrinsics.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ == 12
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include "simd.h"  // FASTGPT2_AVX2, FASTGPT2_AVX512, in_register, hsum

namespace fastgpt2 {
namespace sampling_detail {

constexpr int NUM_LINEAR_BUCKETS = 2046;  // buckets 0..2045 split max - x in [0, range] evenly
constexpr int BUCKET_TINY = 2046;  // x < max - range, p == 0 included; stored as one of 8 copies (<= id % 8 above)
constexpr int NUM_TINY_LANES = 8;  // the tiny bucket's stored copies (so that counting them forms no chain)
constexpr int BUCKET_TINY_LAST = BUCKET_TINY + NUM_TINY_LANES - 1;
constexpr int BUCKET_PAD = BUCKET_TINY_LAST + 1;  // the padding past the vocab, in no bucket range
constexpr int NUM_BUCKETS = BUCKET_PAD + 1;  // entries of a count histogram
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

// The histogram bucket of x: floor((max - x) * scale) in float32 arithmetic (monotone in x, as are both roundings);
// +-inf, NaN and values past the last linear bucket go to BUCKET_TINY. The AVX2 path does the same float32
// operations (truncating conversion, then an unsigned min with BUCKET_TINY + id % 8), so it stores a tiny token as
// one of the tiny bucket's copies.
// The two roundings move a token by at most 2 * 2^-24 * (max - x) * scale, which the bracket's bounds allow for.
inline uint32_t bucket_of(float x, float max, float scale) {
  const float t = (max - x) * scale;
  return t < float(BUCKET_TINY) ? static_cast<uint32_t>(t) : uint32_t{BUCKET_TINY};
}

#ifdef FASTGPT2_AVX2
// exp_nonpositive on U vectors of 4 lanes, each step's constant loaded once for all U; valid[u] gets the lanes with
// d >= EXP_MIN (all ones) or p == 0 (zero). Without CLAMP the caller guarantees EXP_MIN <= d <= 0 in every lane
// (no -inf), and the clamp and the mask are skipped. Every lane goes through the same IEEE operations as
// exp_nonpositive, so the results are bit-identical to it.
template <bool CLAMP, int U>
inline void exp_nonpositive4(const __m256d (&d)[U], __m256d (&e)[U], __m256d (&valid)[U]) {
  __m256d dc[U], shifted[U], r[U], q[U];
  const __m256d log2e = in_register(_mm256_set1_pd(LOG2E));
  const __m256d round_shift = in_register(_mm256_set1_pd(ROUND_SHIFT));
  for (int u = 0; u < U; ++u) {
    dc[u] = CLAMP ? _mm256_max_pd(d[u], _mm256_set1_pd(EXP_MIN)) : d[u];
    shifted[u] = _mm256_fmadd_pd(dc[u], log2e, round_shift);
  }
  const __m256d ln2 = in_register(_mm256_set1_pd(LN2));
  for (int u = 0; u < U; ++u) r[u] = _mm256_fnmadd_pd(_mm256_sub_pd(shifted[u], round_shift), ln2, dc[u]);
  {
    const __m256d c0 = in_register(_mm256_set1_pd(EXP_POLY[0]));
    const __m256d c1 = in_register(_mm256_set1_pd(EXP_POLY[1]));
    for (int u = 0; u < U; ++u) q[u] = _mm256_fmadd_pd(c0, r[u], c1);
  }
  for (int i = 2; i < EXP_POLY_LEN; ++i) {
    const __m256d c = in_register(_mm256_set1_pd(EXP_POLY[i]));
    for (int u = 0; u < U; ++u) q[u] = _mm256_fmadd_pd(q[u], r[u], c);
  }
  const __m256d one = in_register(_mm256_set1_pd(1.0));
  for (int u = 0; u < U; ++u) {
    const __m256d p = _mm256_fmadd_pd(q[u], r[u], one);
    const __m256i bits = _mm256_add_epi64(_mm256_castpd_si256(p), _mm256_slli_epi64(_mm256_castpd_si256(shifted[u]), 52));
    if (CLAMP) {
      valid[u] = _mm256_cmp_pd(d[u], _mm256_set1_pd(EXP_MIN), _CMP_GE_OQ);
      e[u] = _mm256_and_pd(_mm256_castsi256_pd(bits), valid[u]);
    } else {
      e[u] = _mm256_castsi256_pd(bits);
    }
  }
}

#endif

#ifdef FASTGPT2_AVX512
// exp_nonpositive4 on U vectors of 8 lanes (the same IEEE operations, so bit-identical to exp_nonpositive); with CLAMP,
// valid[u] gets the lanes with d >= EXP_MIN and the others get e = 0.
template <bool CLAMP, int U>
inline void exp_nonpositive8(const __m512d (&d)[U], __m512d (&e)[U], __mmask8 (&valid)[U]) {
  __m512d dc[U], shifted[U], r[U], q[U];
  const __m512d log2e = _mm512_set1_pd(LOG2E), round_shift = _mm512_set1_pd(ROUND_SHIFT);
  for (int u = 0; u < U; ++u) {
    dc[u] = CLAMP ? _mm512_max_pd(d[u], _mm512_set1_pd(EXP_MIN)) : d[u];
    shifted[u] = _mm512_fmadd_pd(dc[u], log2e, round_shift);
  }
  const __m512d ln2 = _mm512_set1_pd(LN2);
  for (int u = 0; u < U; ++u) r[u] = _mm512_fnmadd_pd(_mm512_sub_pd(shifted[u], round_shift), ln2, dc[u]);
  for (int u = 0; u < U; ++u) q[u] = _mm512_fmadd_pd(_mm512_set1_pd(EXP_POLY[0]), r[u], _mm512_set1_pd(EXP_POLY[1]));
  for (int i = 2; i < EXP_POLY_LEN; ++i) {
    const __m512d c = _mm512_set1_pd(EXP_POLY[i]);
    for (int u = 0; u < U; ++u) q[u] = _mm512_fmadd_pd(q[u], r[u], c);
  }
  for (int u = 0; u < U; ++u) {
    const __m512d p = _mm512_fmadd_pd(q[u], r[u], _mm512_set1_pd(1.0));
    const __m512i bits = _mm512_add_epi64(_mm512_castpd_si512(p), _mm512_slli_epi64(_mm512_castpd_si512(shifted[u]), 52));
    if (CLAMP) {
      valid[u] = _mm512_cmp_pd_mask(d[u], _mm512_set1_pd(EXP_MIN), _CMP_GE_OQ);
      e[u] = _mm512_maskz_mov_pd(valid[u], _mm512_castsi512_pd(bits));
    } else {
      e[u] = _mm512_castsi512_pd(bits);
    }
  }
}
#endif

// The float32 exp of the fast top-p path (sampling_fast.cpp): e32 = exp(-t) for the gap t = max - x computed
// in float32, as the bucket index uses it. k = round(-t / ln 2) via the 1.5 * 2^23 shift; r' = t + k ln 2 with ln 2
// split so that k * LN2_HI_F is exact (|k| <= 124); exp(-r') = 1 - r' q(r') with q a degree-5 fit of (1 - exp(-r'))
// / r' (signs folded into the coefficients). Error against the exact exp(x - max): the rounding of t (at most
// 2^-24 t, a proven bound) plus the polynomial and float32 rounding (measured <= 9e-8 relative over 4.7e7 gaps in
// [0, 86]); EXP32_REL_ERROR + t * EXP32_GAP_ERROR bounds the sum (the measured worst case reaches 0.89 of it).
// Gaps above EXP32_GAP_MAX (and -inf logits) give 0, as the exact e of such a token is below EXP32_TINY.
constexpr float EXP32_GAP_MAX = 86.0f;  // exp(-86) * 0.7 is still a normal float32
constexpr double EXP32_TINY = 4.5e-38;  // > exp(-86)
constexpr double EXP32_REL_ERROR = 2e-7;  // > 2x the measured 9e-8
constexpr double EXP32_GAP_ERROR = 6.5e-8;  // per unit of t: the 2^-24 rounding of t, with a margin
constexpr int EXP32_POLY_LEN = 6;  // q(r') = sum_i (-1)^i c_i r'^i, highest degree first
constexpr float EXP32_POLY[EXP32_POLY_LEN] = {-0.0013763699680566788f, 0.008371913805603981f, -0.041669417172670364f,
                                              0.1666647046804428f,    -0.49999988079071045f, 1.0f};
constexpr float LOG2E_F = 1.44269502162933349609375f;
constexpr float LN2_HI_F = 0.693145751953125f;  // 8 trailing zero bits in its significand
constexpr float LN2_LO_F = 1.428606765330187045e-06f;
constexpr float ROUND_SHIFT_F = 12582912.0f;  // 1.5 * 2^23

// exp32 of one gap t >= 0 (or +inf), the same operations as the vector version below.
inline float exp32_of_gap(float t) {
  if (!(t <= EXP32_GAP_MAX)) return 0.0f;
  const float shifted = std::fma(-t, LOG2E_F, ROUND_SHIFT_F);
  const float k = shifted - ROUND_SHIFT_F;  // round(-t / ln 2), in [-124, 0]
  const float r = std::fma(k, LN2_LO_F, std::fma(k, LN2_HI_F, t));  // t + k ln 2, in about [-0.35, 0.35]
  float q = EXP32_POLY[0];
  for (int i = 1; i < EXP32_POLY_LEN; ++i) q = std::fma(q, r, EXP32_POLY[i]);
  const float p = std::fma(-q, r, 1.0f);
  uint32_t p_bits, shift_bits;
  std::memcpy(&p_bits, &p, sizeof p);
  std::memcpy(&shift_bits, &shifted, sizeof shifted);
  const uint32_t bits = p_bits + (shift_bits << 23);  // p * 2^k via the exponent field
  float e;
  std::memcpy(&e, &bits, sizeof e);
  return e;
}

#ifdef FASTGPT2_AVX2
// exp32_of_gap on 8 lanes. Without CLAMP every t is in [0, EXP32_GAP_MAX].
template <bool CLAMP>
inline __m256 exp32_of_gap8(__m256 t) {
  const __m256 shifted = _mm256_fnmadd_ps(t, _mm256_set1_ps(LOG2E_F), _mm256_set1_ps(ROUND_SHIFT_F));
  const __m256 k = _mm256_sub_ps(shifted, _mm256_set1_ps(ROUND_SHIFT_F));
  const __m256 r = _mm256_fmadd_ps(k, _mm256_set1_ps(LN2_LO_F), _mm256_fmadd_ps(k, _mm256_set1_ps(LN2_HI_F), t));
  __m256 q = _mm256_set1_ps(EXP32_POLY[0]);
  for (int i = 1; i < EXP32_POLY_LEN; ++i) q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(EXP32_POLY[i]));
  const __m256 p = _mm256_fnmadd_ps(q, r, _mm256_set1_ps(1.0f));
  const __m256 e = _mm256_castsi256_ps(
      _mm256_add_epi32(_mm256_castps_si256(p), _mm256_slli_epi32(_mm256_castps_si256(shifted), 23)));
  return CLAMP ? _mm256_and_ps(e, _mm256_cmp_ps(t, _mm256_set1_ps(EXP32_GAP_MAX), _CMP_LE_OQ)) : e;
}
#endif

#ifdef FASTGPT2_AVX512
// exp32_of_gap on 16 lanes (the same operations as exp32_of_gap8). Without CLAMP every t is in [0, EXP32_GAP_MAX].
template <bool CLAMP>
inline __m512 exp32_of_gap16(__m512 t) {
  const __m512 shifted = _mm512_fnmadd_ps(t, _mm512_set1_ps(LOG2E_F), _mm512_set1_ps(ROUND_SHIFT_F));
  const __m512 k = _mm512_sub_ps(shifted, _mm512_set1_ps(ROUND_SHIFT_F));
  const __m512 r = _mm512_fmadd_ps(k, _mm512_set1_ps(LN2_LO_F), _mm512_fmadd_ps(k, _mm512_set1_ps(LN2_HI_F), t));
  __m512 q = _mm512_set1_ps(EXP32_POLY[0]);
  for (int i = 1; i < EXP32_POLY_LEN; ++i) q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(EXP32_POLY[i]));
  const __m512 p = _mm512_fnmadd_ps(q, r, _mm512_set1_ps(1.0f));
  const __m512 e = _mm512_castsi512_ps(
      _mm512_add_epi32(_mm512_castps_si512(p), _mm512_slli_epi32(_mm512_castps_si512(shifted), 23)));
  return CLAMP ? _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(t, _mm512_set1_ps(EXP32_GAP_MAX), _CMP_LE_OQ), e) : e;
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
struct RowScan {
  float max;
  float min_finite;
  bool has_nan;
  bool has_neg_inf;
};

struct Workspace {
  std::vector<double> e;  // (padded V,) exp(x - max), 0 in the padding
  std::vector<float> e32;  // (padded V,) the fast path's float32 exp(x - max), 0 in the padding
  std::vector<uint16_t> bucket;  // (padded V,) histogram bucket, BUCKET_PAD in the padding
  std::vector<uint32_t> listed;  // the passes' scratch: the fast exp pass's buckets to count (AVX-512), token ids
  std::vector<int32_t> count;  // (NUM_BUCKETS,) tokens per bucket
  std::vector<double> block_mass;  // (padded V / BLOCK,) kept mass per block of the draw
  std::vector<RankedToken> list;  // tokens of a bucket range, id order
  std::vector<RankedToken> kept;  // the top-k set, id order
  std::vector<std::vector<RankedToken>> levels;  // radix sub-lists, one per depth
  std::vector<RankedToken> sorted;
  // The scan of the row at next_scanned, when a pass over the row before it made it on the way (else null).
  RowScan next_scan{};
  const float* next_scanned = nullptr;

  // listed with room for at least n entries (grown, never shrunk; its contents kept).
  uint32_t* listed_at_least(int64_t n) {
    if (static_cast<int64_t>(listed.size()) < n) listed.resize(n);
    return listed.data();
  }

  void reserve(int64_t padded) {
    if (static_cast<int64_t>(e.size()) < padded) {
      e.resize(padded);
      e32.resize(padded);
      bucket.resize(padded);
      block_mass.resize(padded / BLOCK);
    }
    count.resize(NUM_BUCKETS);
    levels.resize(MAX_RADIX_DEPTH);  // never resized inside resolve(), which holds references into it
  }
};

}  // namespace sampling_detail
}  // namespace fastgpt2
