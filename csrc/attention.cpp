// Paged attention on CPU: per (query, head), scores over the context read through the block table, one softmax, and
// the weighted sum of V rows. Memory traffic: a lone query reads seq_len * D * 2 floats per head; a group of queries
// of one sequence (a prefill chunk) reads each K/V block once for the whole group while it is in L1.
//
// Every query's operations, wherever it is computed (attend_one_head or attend_queries):
//  - score t = dot(q, k_t) * scale for t = 0, 1, ...; dot is, with AVX-512 and head_dim a multiple of 16, 16 lanes of
//    FMA chains over d = lane, lane + 16, ... then reduce16's fixed halving tree; else with AVX2 and head_dim a
//    multiple of 8 simd.h's dot (8 FMA lanes then hsum); else its portable loop;
//  - max = the largest score (exact in any order); exp_and_sum: p_t = exp(score t - max) and their sum in 16 (AVX-512)
//    or 8 (AVX2) lanes over t, then a fixed horizontal sum;
//  - out = 0, out += p_t * v_t (one FMA per element) for t = 0, 1, ..., out *= 1 / sum.
// The kernels share work across keys or queries without changing any of this: reduce16 finishes 16 dot products at
// once (sum4 four with AVX2), but lane t of its result depends only on vector t's lanes; score_pair8 loads each K row
// once for two queries, score_query_lanes runs 16 queries' chains and halving trees side by side in the lanes of one
// vector (a group's queries transposed), and accumulate_context loads each V row once for up to 6, but every score
// and output element keeps its own chain.
#include "attention.h"

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "simd.h"
#include "thread_pool.h"

namespace fastgpt2 {
namespace {

#ifdef FASTGPT2_AVX512
// One halving step of two vectors at once: in every 2W-lane segment, the lower W lanes get x[i] + x[i + W] and the
// upper W lanes y[i] + y[i - W] (= y[i - W] + y[i]: float addition is commutative), so each segment of x and of y is
// folded the same way and the two results share one vector.
template <int W>
inline __m512 fold(__m512 x, __m512 y) {
  constexpr __mmask16 kUpper = W == 8 ? 0xff00 : W == 4 ? 0xf0f0 : W == 2 ? 0xcccc : 0xaaaa;
  __m512i from;  // lower lanes: x's lane i + W; upper lanes: y's lane i - W (indices 16.. name y's lanes)
  if constexpr (W == 8) from = _mm512_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23);
  else if constexpr (W == 4) from = _mm512_setr_epi32(4, 5, 6, 7, 16, 17, 18, 19, 12, 13, 14, 15, 24, 25, 26, 27);
  else if constexpr (W == 2) from = _mm512_setr_epi32(2, 3, 16, 17, 6, 7, 20, 21, 10, 11, 24, 25, 14, 15, 28, 29);
  else from = _mm512_setr_epi32(1, 16, 3, 18, 5, 20, 7, 22, 9, 24, 11, 26, 13, 28, 15, 30);
  return _mm512_add_ps(_mm512_mask_blend_ps(kUpper, x, y), _mm512_permutex2var_ps(x, from, y));
}

// Lane t: the sum of a[t]'s 16 lanes as s8[i] = a[i] + a[i + 8], s4[i] = s8[i] + s8[i + 4], s2[i] = s4[i] + s4[i + 2],
// s2[0] + s2[1] (pairing vectors m and m + 8, then m and m + 4, ... leaves key t in lane t). Clobbers a.
inline __m512 reduce16(__m512* a) {
#pragma GCC unroll 8
  for (int m = 0; m < 8; ++m) a[m] = fold<8>(a[m], a[m + 8]);
  for (int m = 0; m < 4; ++m) a[m] = fold<4>(a[m], a[m + 4]);
  for (int m = 0; m < 2; ++m) a[m] = fold<2>(a[m], a[m + 2]);
  return fold<1>(a[0], a[1]);
}

// a[t] = the 16 lanes of FMA chains of q * k_t over d = lane, lane + 16, ... (head_dim = 16 C, q in registers when
// C > 0; C = 0: any multiple of 16, q read per use); keys t >= n repeat key n - 1, a row the sequence owns (kFull:
// n is 16).
template <int C, bool kFull>
inline void score_keys(const float* q, const float* k, int64_t n, int64_t stride, int64_t head_dim, __m512* a) {
  __m512 qv[C > 0 ? C : 1];
  for (int c = 0; c < C; ++c) qv[c] = _mm512_loadu_ps(q + 16 * c);
#pragma GCC unroll 16
  for (int t = 0; t < 16; ++t) {
    const float* kt = k + (kFull ? t : std::min<int64_t>(t, n - 1)) * stride;
    a[t] = _mm512_setzero_ps();
    if constexpr (C > 0) {
      for (int c = 0; c < C; ++c) a[t] = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(kt + 16 * c), a[t]);
    } else {
      for (int64_t d = 0; d < head_dim; d += 16)
        a[t] = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), _mm512_loadu_ps(kt + d), a[t]);
    }
  }
}

// scores[t] = dot(q, k_t) * scale for t < n <= 16 (head_dim a multiple of 16); lanes t >= n are not stored. Not
// inlined: inlined in a loop over queries, gcc hoists the 16 row addresses and spills them (measured 7% slower).
__attribute__((noinline)) void score16(const float* q, const float* k, int64_t n, int64_t stride, int64_t head_dim, float scale,
                    float* scores) {
  __m512 a[16];  // kept in registers: every loop over it is unrolled
  if (head_dim == 64 && n == 16)  // GPT-2's heads, a whole block: no clamping of the key index
    score_keys<4, true>(q, k, n, stride, head_dim, a);
  else if (head_dim == 64)
    score_keys<4, false>(q, k, n, stride, head_dim, a);
  else
    score_keys<0, false>(q, k, n, stride, head_dim, a);
  const __m512 s = _mm512_mul_ps(reduce16(a), _mm512_set1_ps(scale));
  _mm512_mask_storeu_ps(scores, static_cast<__mmask16>((1u << n) - 1), s);
}

// Two queries' scores of keys t < 8 (head_dim 64): key t's rows are loaded once for both, and each score is
// score16's (the same FMA chains, then reduce16 with query 0's keys in lanes 0..7 and query 1's in 8..15); keys
// t >= n repeat key n - 1, and each query stores its own first n0 or n1 <= n scores.
template <bool kFull>
inline void score_pair8(const float* q0, const float* q1, const float* k, int64_t n, int64_t stride, float scale,
                        int64_t n0, int64_t n1, float* s0, float* s1) {
  __m512 a[16], qv0[4], qv1[4];
  for (int c = 0; c < 4; ++c) qv0[c] = _mm512_loadu_ps(q0 + 16 * c), qv1[c] = _mm512_loadu_ps(q1 + 16 * c);
#pragma GCC unroll 8
  for (int t = 0; t < 8; ++t) {
    const float* kt = k + (kFull ? t : std::min<int64_t>(t, n - 1)) * stride;
    a[t] = a[t + 8] = _mm512_setzero_ps();
    for (int c = 0; c < 4; ++c) {
      const __m512 kv = _mm512_loadu_ps(kt + 16 * c);
      a[t] = _mm512_fmadd_ps(qv0[c], kv, a[t]);
      a[t + 8] = _mm512_fmadd_ps(qv1[c], kv, a[t + 8]);
    }
  }
  const __m512 s = _mm512_mul_ps(reduce16(a), _mm512_set1_ps(scale));
  _mm512_mask_storeu_ps(s0, static_cast<__mmask16>((1u << std::max<int64_t>(n0, 0)) - 1), s);
  _mm256_mask_storeu_ps(s1, static_cast<__mmask8>((1u << std::max<int64_t>(n1, 0)) - 1), _mm512_extractf32x8_ps(s, 1));
}

// out_j = the sum of p[j][t] v_t over t < n[j], for j < R queries of one sequence and head_dim 64, the V rows read
// through the block table (block b's at v_cache + table[b] * block_size * stride + head_offset): each V row is loaded
// once for the R queries, and each output element gets the FMAs of t = 0, 1, ... in turn from 0 (masked past a
// query's own count), kept in registers across the blocks rather than loaded and stored per block (one Intel Xeon
// core: a 512-token prompt's attention about 1.06x faster, 64 decode queries 1.02-1.04x at context 48 and 1.09-1.18x
// at 200; the same bits). Prefill's groups and a lone decode query both run it, so they agree by construction.
template <int R>
inline void accumulate_context(const float* const* p, const int64_t* n, const float* v_cache, const int32_t* table,
                               int64_t block_size, int64_t stride, int64_t head_offset, float* const* out) {
  __m512 o[R][4];
  int64_t hi = 0, lo = n[0];  // keys [0, lo) every query attends to
  for (int j = 0; j < R; ++j) {
    hi = std::max(hi, n[j]), lo = std::min(lo, n[j]);
    for (int i = 0; i < 4; ++i) o[j][i] = _mm512_setzero_ps();
  }
  for (int64_t start = 0; start < hi; start += block_size) {
    const float* v = v_cache + static_cast<int64_t>(table[start / block_size]) * block_size * stride + head_offset;
    const int64_t end = std::min(hi, start + block_size);
    // Key t's FMAs; masked past each query's own count only where the counts differ: keys every query attends to
    // need no masks (their scalar compares and mask moves share ports with the FMAs: 6 queries over 512 keys of a
    // prompt on one Intel Xeon core, 3.2 -> 2.9 cycles per query and key).
    auto key = [&](int64_t t, auto masked) {
      __m512 vt[4];
      for (int i = 0; i < 4; ++i) vt[i] = _mm512_loadu_ps(v + (t - start) * stride + 16 * i);
      for (int j = 0; j < R; ++j) {
        const __m512 w = _mm512_set1_ps(p[j][t]);
        const __mmask16 live = !decltype(masked)::value || t < n[j] ? 0xffff : 0;
        for (int i = 0; i < 4; ++i)
          o[j][i] = decltype(masked)::value ? _mm512_mask3_fmadd_ps(w, vt[i], o[j][i], live)
                                            : _mm512_fmadd_ps(w, vt[i], o[j][i]);
      }
    };
    int64_t t = start;
    for (const int64_t stop = std::min(end, lo); t < stop; ++t) key(t, std::false_type{});
    for (; t < end; ++t) key(t, std::true_type{});
  }
  for (int j = 0; j < R; ++j)
    for (int i = 0; i < 4; ++i) _mm512_storeu_ps(out[j] + 16 * i, o[j][i]);
}

// r[i] = row i of a 16 x 16 tile -> r[j] = its column j.
inline void transpose16(__m512* r) {
  __m512 t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4)  // u[i + c]: column 4m + c of rows i..i+3, in each 128-bit chunk m
    for (int h = 0; h < 2; ++h) {
      const __m512d a = _mm512_castps_pd(t[i + h]), b = _mm512_castps_pd(t[i + h + 2]);
      u[i + 2 * h] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
      u[i + 2 * h + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    }
  for (int i = 0; i < 16; i += 8)
    for (int c = 0; c < 4; ++c) {
      t[i + c] = _mm512_shuffle_f32x4(u[i + c], u[i + c + 4], 0x88);
      t[i + c + 4] = _mm512_shuffle_f32x4(u[i + c], u[i + c + 4], 0xdd);
    }
  for (int c = 0; c < 8; ++c) {
    r[c] = _mm512_shuffle_f32x4(t[c], t[c + 8], 0x88);
    r[c + 8] = _mm512_shuffle_f32x4(t[c], t[c + 8], 0xdd);
  }
}

// A group's queries in the lanes (head_dim 64; up to 16 queries): qt holds Q^T, vector d the queries' element d (lane
// j: query j; lanes past the group zero). For NK keys, lane(l) is every query's FMA chain of score16's lane l (d = l,
// l + 16, l + 32, l + 48, from zero), key k[t]'s elements broadcast; node<W> adds two subtrees as reduce16 pairs lanes:
// (l, l + 8), then (l, l + 4), (l, l + 2) and (0, 1). So each (query, key) score is score16's value bit for bit, with
// no horizontal folds: 3.5 cycles per score against score_pair8's 5.9 on one Intel Xeon core (keys in L1).
template <int NK>
struct QueryLanes {
  static inline void lane(const float* qt, const float* const* k, int l, __m512* a) {
    for (int t = 0; t < NK; ++t) a[t] = _mm512_setzero_ps();
    for (int c = 0; c < 4; ++c) {
      const __m512 q = _mm512_loadu_ps(qt + 16 * (l + 16 * c));
      for (int t = 0; t < NK; ++t) a[t] = _mm512_fmadd_ps(q, _mm512_set1_ps(k[t][l + 16 * c]), a[t]);
    }
  }
  template <int W>
  static inline void node(const float* qt, const float* const* k, int l, __m512* s) {
    __m512 a[NK], b[NK];
    if constexpr (W == 8) {
      lane(qt, k, l, a), lane(qt, k, l + 8, b);
    } else {
      node<W * 2>(qt, k, l, a), node<W * 2>(qt, k, l + W, b);
    }
    for (int t = 0; t < NK; ++t) s[t] = _mm512_add_ps(a[t], b[t]);
  }
};

// s[t] (lanes: the queries of qt) = the scores of keys t < m <= 16 at k + t * stride; keys t >= m repeat key m - 1 (a
// row the sequence owns) and their lanes are not meant to be stored.
__attribute__((noinline)) void score_query_lanes(const float* qt, const float* k, int64_t m, int64_t stride,
                                                 float scale, __m512* s) {
  for (int t = 0; t < 16; t += 4) {
    const float* rows[4];
    for (int u = 0; u < 4; ++u) rows[u] = k + std::min<int64_t>(t + u, m - 1) * stride;
    QueryLanes<4>::node<1>(qt, rows, 0, s + t);
    for (int u = 0; u < 4; ++u) s[t + u] = _mm512_mul_ps(s[t + u], _mm512_set1_ps(scale));
  }
}
#endif

// y += w x, one fused multiply-add per element (spelled out so that no compiler choice about contraction can make
// two copies of it round differently).
inline void axpy(float w, const float* x, float* y, int64_t n) {
  int64_t i = 0;
#ifdef FASTGPT2_AVX2
  const __m256 wv = _mm256_set1_ps(w);
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
#endif
  for (; i < n; ++i) y[i] = std::fma(w, x[i], y[i]);
}

// out += p[t] v_t for t = 0..n-1 (v_t at v + t * stride), the axpy of every t in turn; with GPT-2's head_dim of 64 the
// output stays in registers across the n keys (the same FMAs, without a load and store of out per key).
inline void accumulate(const float* p, const float* v, int64_t n, int64_t stride, float* out, int64_t head_dim) {
#ifdef FASTGPT2_AVX2
  if (head_dim == 64) {
    __m256 o[8];
    for (int i = 0; i < 8; ++i) o[i] = _mm256_loadu_ps(out + 8 * i);
    for (int64_t t = 0; t < n; ++t) {
      const __m256 w = _mm256_set1_ps(p[t]);
      for (int i = 0; i < 8; ++i) o[i] = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + t * stride + 8 * i), o[i]);
    }
    for (int i = 0; i < 8; ++i) _mm256_storeu_ps(out + 8 * i, o[i]);
    return;
  }
#endif
  for (int64_t t = 0; t < n; ++t) axpy(p[t], v + t * stride, out, head_dim);
}

#ifdef FASTGPT2_AVX2
// The horizontal sums of a[0..3] (lane u: hsum(a[u]), bit for bit: hsum's order ((x0 + x4) + (x2 + x6)) + ((x1 + x5) +
// (x3 + x7)) in each lane), in one tree: 9 shuffles and 4 additions where four hsums take 12 and 12 (the prefill's
// attention on one Intel Xeon core with the AVX2 kernels forced: 1.03-1.08x).
inline __m128 sum4(const __m256* a) {
  // s01: a[0]'s and a[1]'s x_i + x_(i+4) in the low and high halves; s23 likewise.
  const __m256 s01 =
      _mm256_add_ps(_mm256_permute2f128_ps(a[0], a[1], 0x20), _mm256_permute2f128_ps(a[0], a[1], 0x31));
  const __m256 s23 =
      _mm256_add_ps(_mm256_permute2f128_ps(a[2], a[3], 0x20), _mm256_permute2f128_ps(a[2], a[3], 0x31));
  // Per half: (s[0] + s[2], s[1] + s[3]) of key 0 (low half) or 1 (high), then of key 2 or 3.
  const __m256 t = _mm256_add_ps(_mm256_shuffle_ps(s01, s23, _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm256_shuffle_ps(s01, s23, _MM_SHUFFLE(3, 2, 3, 2)));
  // Per half: key 0 or 1, key 2 or 3 (twice).
  const __m256 r = _mm256_add_ps(_mm256_shuffle_ps(t, t, _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm256_shuffle_ps(t, t, _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm_unpacklo_ps(_mm256_castps256_ps128(r), _mm256_extractf128_ps(r, 1));
}
#endif

// scores[t] = dot(q, k_t) * scale for t = 0..n-1 (k_t at k + t * stride), each score the dot product of the header.
// With AVX2 (no AVX-512 path) four keys' chains run interleaved (independent, so the same values) for FMA latency.
inline void score_block(const float* q, const float* k, int64_t n, int64_t stride, int64_t head_dim, float scale,
                        float* scores) {
  int64_t t = 0;
#ifdef FASTGPT2_AVX512
  if (head_dim % 16 == 0) {
    for (; t < n; t += 16) score16(q, k + t * stride, std::min<int64_t>(16, n - t), stride, head_dim, scale, scores + t);
    return;
  }
#endif
#ifdef FASTGPT2_AVX2
  if (head_dim % 8 == 0) {
    for (; t + 4 <= n; t += 4) {
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      const float* k0 = k + t * stride;
      for (int64_t i = 0; i < head_dim; i += 8) {
        const __m256 qv = _mm256_loadu_ps(q + i);
        a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + i), a0);
        a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + stride + i), a1);
        a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + 2 * stride + i), a2);
        a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + 3 * stride + i), a3);
      }
      const __m256 a[4] = {a0, a1, a2, a3};
      _mm_storeu_ps(scores + t, _mm_mul_ps(sum4(a), _mm_set1_ps(scale)));
    }
  }
#endif
  for (; t < n; ++t) scores[t] = dot(q, k + t * stride, head_dim) * scale;
}

// scores[t] = exp(scores[t] - max) over n >= 1 scores, max their largest; returns the sum of the exps.
float exp_and_sum(float* scores, int64_t n) {
  int64_t t = 0;
#ifdef FASTGPT2_AVX512
  const __mmask16 tail = static_cast<__mmask16>((1u << (n % 16)) - 1);
  const int64_t full = n - n % 16;
  __m512 m = _mm512_set1_ps(-INFINITY);
  for (; t < full; t += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(scores + t));
  if (tail) m = _mm512_mask_max_ps(m, tail, m, _mm512_maskz_loadu_ps(tail, scores + full));
  const __m512 max_v = _mm512_set1_ps(_mm512_reduce_max_ps(m));
  __m512 acc = _mm512_setzero_ps();
  for (t = 0; t < full; t += 16) {
    const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(scores + t), max_v));
    _mm512_storeu_ps(scores + t, e);
    acc = _mm512_add_ps(acc, e);
  }
  if (tail) {
    const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, scores + full), max_v));
    _mm512_mask_storeu_ps(scores + full, tail, e);
    acc = _mm512_mask_add_ps(acc, tail, acc, e);
  }
  return hsum(_mm256_add_ps(_mm512_castps512_ps256(acc), _mm512_extractf32x8_ps(acc, 1)));
#elif defined(FASTGPT2_AVX2)
  // As the AVX-512 loop on 8 lanes: the max in vectors (exact in any order), the last n % 8 scores in masked lanes
  // of the same exp. A scalar max waited on each compare, and the last scores took std::exp one by one: the AVX2
  // attention of a 512-token prompt on one Intel Xeon core (AVX2 kernels forced) 1.20x faster.
  const int64_t full = n - n % 8;
  const __m256i tail = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(n % 8)),
                                          _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  const __m256 tail_f = _mm256_castsi256_ps(tail);
  const __m256 neg_inf = _mm256_set1_ps(-INFINITY);
  __m256 m = neg_inf;
  for (; t < full; t += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(scores + t));
  const __m256 last = _mm256_blendv_ps(neg_inf, _mm256_maskload_ps(scores + full, tail), tail_f);
  const __m256 max_v = hmax_all(_mm256_max_ps(m, last));
  __m256 acc = _mm256_setzero_ps();
  for (t = 0; t < full; t += 8) {
    const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(scores + t), max_v));
    _mm256_storeu_ps(scores + t, e);
    acc = _mm256_add_ps(acc, e);
  }
  if (full < n) {
    const __m256 e = _mm256_and_ps(exp256(_mm256_sub_ps(last, max_v)), tail_f);
    _mm256_maskstore_ps(scores + full, tail, e);
    acc = _mm256_add_ps(acc, e);
  }
  return hsum(acc);
#else
  float max_score = -INFINITY, sum = 0.0f;
  for (int64_t i = 0; i < n; ++i) max_score = std::max(max_score, scores[i]);
  for (; t < n; ++t) sum += (scores[t] = std::exp(scores[t] - max_score));
  return sum;
#endif
}

// The PV pass of attend_queries for one block: out_j += p_j[t] v_t over the block's keys each query attends to.
void accumulate_queries(const float* scores, int64_t score_stride, const int64_t* seq_lens, int64_t num_queries,
                        int64_t start, const float* v, int64_t n_block, int64_t stride, float* out,
                        int64_t out_stride, int64_t head_dim) {
  for (int64_t j = 0; j < num_queries; ++j) {
    const int64_t n = std::min(n_block, seq_lens[j] - start);
    if (n > 0) accumulate(scores + j * score_stride + start, v, n, stride, out + j * out_stride, head_dim);
  }
}

}  // namespace

void attend_one_head(const float* q, const float* k_cache, const float* v_cache, const int32_t* table,
                     int64_t seq_len, int64_t block_size, int64_t token_stride, int64_t head_offset,
                     int64_t head_dim, float scale, float* out, std::vector<float>& scores) {
  // Walks the table block by block (no division per token); the softmax's exps are vectorised.
  scores.resize(seq_len);
  for (int64_t start = 0; start < seq_len; start += block_size) {
    const float* k = k_cache + static_cast<int64_t>(table[start / block_size]) * block_size * token_stride + head_offset;
    score_block(q, k, std::min(block_size, seq_len - start), token_stride, head_dim, scale, scores.data() + start);
  }
  const float denom = exp_and_sum(scores.data(), seq_len);
#ifdef FASTGPT2_AVX512
  if (head_dim == 64) {
    const float* p = scores.data();
    accumulate_context<1>(&p, &seq_len, v_cache, table, block_size, token_stride, head_offset, &out);
  } else
#endif
  {
    std::fill(out, out + head_dim, 0.0f);
    for (int64_t start = 0; start < seq_len; start += block_size) {
      const float* v =
          v_cache + static_cast<int64_t>(table[start / block_size]) * block_size * token_stride + head_offset;
      accumulate(scores.data() + start, v, std::min(block_size, seq_len - start), token_stride, out, head_dim);
    }
  }
  const float inv = 1.0f / denom;
  for (int64_t d = 0; d < head_dim; ++d) out[d] *= inv;
}

void attend_queries(const float* q, int64_t q_stride, const int64_t* seq_lens, int64_t num_queries,
                    const float* k_cache, const float* v_cache, const int32_t* table, int64_t block_size,
                    int64_t token_stride, int64_t head_offset, int64_t head_dim, float scale, float* out,
                    int64_t out_stride, std::vector<float>& scores) {
  // attend_one_head's three passes, each over the blocks in order and, per block, over the queries: a query's scores,
  // max, exps, sum and PV accumulation see the same values in the same order as attend_one_head's.
  int64_t max_len = 0;
  for (int64_t j = 0; j < num_queries; ++j) max_len = std::max(max_len, seq_lens[j]);
  const int64_t stride = (max_len + 15) / 16 * 16;  // floats per query's scores
  // Queries [0, lanes_end) take score_query_lanes, 16 at a time (a last chunk of 12-15 too): below 12, its 16 lanes
  // cost more than score_pair8's pairs.
  int64_t lanes_end = 0;
#ifdef FASTGPT2_AVX512
  if (head_dim == 64) lanes_end = num_queries / 16 * 16 + (num_queries % 16 >= 12 ? num_queries % 16 : 0);
#endif
  const int64_t num_chunks = (lanes_end + 15) / 16;
  constexpr int64_t kQtFloats = 64 * 16;  // a chunk's Q^T: head_dim 64 vectors of 16 lanes
  scores.resize(num_queries * (stride + 1) + num_chunks * kQtFloats);
  float* sums = scores.data() + num_queries * stride;  // per query: its softmax denominator
  [[maybe_unused]] float* const qt = sums + num_queries;  // per chunk of 16 queries: Q^T (64 vectors of 16 lanes)
#ifdef FASTGPT2_AVX512
  for (int64_t c = 0; c < num_chunks; ++c) {
    const int64_t nq = std::min<int64_t>(16, lanes_end - 16 * c);
    for (int64_t d = 0; d < 64; d += 16) {
      __m512 r[16];
      for (int64_t j = 0; j < 16; ++j)
        r[j] = j < nq ? _mm512_loadu_ps(q + (16 * c + j) * q_stride + d) : _mm512_setzero_ps();
      transpose16(r);
      for (int i = 0; i < 16; ++i) _mm512_storeu_ps(qt + c * kQtFloats + (d + i) * 16, r[i]);
    }
  }
#endif
  for (int64_t start = 0; start < max_len; start += block_size) {
    const float* k =
        k_cache + static_cast<int64_t>(table[start / block_size]) * block_size * token_stride + head_offset;
#ifdef FASTGPT2_AVX512
    for (int64_t c = 0; c < num_chunks; ++c) {
      const int64_t first = 16 * c, nq = std::min<int64_t>(16, lanes_end - first);
      int64_t n = 0;  // keys of this block that some query of the chunk attends to
      for (int64_t j = first; j < first + nq; ++j) n = std::max(n, std::min(block_size, seq_lens[j] - start));
      for (int64_t t0 = 0; t0 < n; t0 += 16) {
        __m512 s[16];
        const int64_t m = std::min<int64_t>(16, n - t0);  // keys of this tile
        score_query_lanes(qt + c * kQtFloats, k + t0 * token_stride, m, token_stride, scale, s);
        transpose16(s);  // s[j]: query first + j's scores of the 16 keys
        for (int64_t j = 0; j < nq; ++j) {
          const int64_t nj = std::min<int64_t>(m, seq_lens[first + j] - start - t0);
          if (nj > 0)
            _mm512_mask_storeu_ps(scores.data() + (first + j) * stride + start + t0,
                                  static_cast<__mmask16>((1u << nj) - 1), s[j]);
        }
      }
    }
#endif
    int64_t j = lanes_end;
#ifdef FASTGPT2_AVX512
    for (; head_dim == 64 && j + 2 <= num_queries; j += 2) {  // two queries at a time share the K rows' loads
      const int64_t n0 = std::min(block_size, seq_lens[j] - start), n1 = std::min(block_size, seq_lens[j + 1] - start);
      float* s0 = scores.data() + j * stride + start;
      for (int64_t t = 0; t < std::max(n0, n1); t += 8) {
        const int64_t n = std::min<int64_t>(8, std::max(n0, n1) - t);
        // Two direct calls rather than one through a chosen function pointer, which kept both out of line (a
        // 512-token prompt's attention 1.02-1.05x faster on one Intel Xeon core).
        if (n == 8)
          score_pair8<true>(q + j * q_stride, q + (j + 1) * q_stride, k + t * token_stride, n, token_stride, scale,
                            std::min<int64_t>(8, n0 - t), std::min<int64_t>(8, n1 - t), s0 + t, s0 + stride + t);
        else
          score_pair8<false>(q + j * q_stride, q + (j + 1) * q_stride, k + t * token_stride, n, token_stride, scale,
                             std::min<int64_t>(8, n0 - t), std::min<int64_t>(8, n1 - t), s0 + t, s0 + stride + t);
      }
    }
#endif
    for (; j < num_queries; ++j) {
      const int64_t n = std::min(block_size, seq_lens[j] - start);
      if (n > 0) score_block(q + j * q_stride, k, n, token_stride, head_dim, scale, scores.data() + j * stride + start);
    }
  }
  for (int64_t j = 0; j < num_queries; ++j) sums[j] = exp_and_sum(scores.data() + j * stride, seq_lens[j]);
#ifdef FASTGPT2_AVX512
  if (head_dim == 64) {
    // Up to 6 queries per V row read (24 accumulators, the 4 V vectors and a weight in 29 registers): a 16-query
    // group reads V 3 times instead of 4 (a 512-token prompt's attention 1.04x faster on one Intel Xeon core than
    // with 4; the same bits, each output element keeping its own chain).
    for (int64_t j = 0; j < num_queries; j += 6) {
      const float* p[6];
      int64_t n[6];
      float* o[6];
      const int r = static_cast<int>(std::min<int64_t>(6, num_queries - j));
      for (int i = 0; i < r; ++i)
        p[i] = scores.data() + (j + i) * stride, n[i] = seq_lens[j + i], o[i] = out + (j + i) * out_stride;
      if (r == 6) accumulate_context<6>(p, n, v_cache, table, block_size, token_stride, head_offset, o);
      if (r == 5) accumulate_context<5>(p, n, v_cache, table, block_size, token_stride, head_offset, o);
      if (r == 4) accumulate_context<4>(p, n, v_cache, table, block_size, token_stride, head_offset, o);
      if (r == 3) accumulate_context<3>(p, n, v_cache, table, block_size, token_stride, head_offset, o);
      if (r == 2) accumulate_context<2>(p, n, v_cache, table, block_size, token_stride, head_offset, o);
      if (r == 1) accumulate_context<1>(p, n, v_cache, table, block_size, token_stride, head_offset, o);
    }
  } else
#endif
  {
    for (int64_t j = 0; j < num_queries; ++j) std::fill(out + j * out_stride, out + j * out_stride + head_dim, 0.0f);
    for (int64_t start = 0; start < max_len; start += block_size) {
      const float* v =
          v_cache + static_cast<int64_t>(table[start / block_size]) * block_size * token_stride + head_offset;
      accumulate_queries(scores.data(), stride, seq_lens, num_queries, start, v,
                         std::min(block_size, max_len - start), token_stride, out, out_stride, head_dim);
    }
  }
  for (int64_t j = 0; j < num_queries; ++j) {
    const float inv = 1.0f / sums[j];
    float* oj = out + j * out_stride;
    for (int64_t d = 0; d < head_dim; ++d) oj[d] *= inv;
  }
}

void paged_decode_attention_f32(const float* q, const float* k_cache, const float* v_cache,
                                const int32_t* block_tables, const int32_t* seq_lens, float* out, int64_t batch_size,
                                int64_t num_heads, int64_t head_dim, int64_t block_size, int64_t max_blocks,
                                float scale, int num_threads) {
  const int64_t token_stride = num_heads * head_dim;  // floats between consecutive tokens in the pool
  auto pair = [&](int64_t p) {
    thread_local std::vector<float> scores;
    const int64_t b = p / num_heads, h = p % num_heads;
    attend_one_head(q + p * head_dim, k_cache, v_cache, block_tables + b * max_blocks, seq_lens[b], block_size,
                    token_stride, h * head_dim, head_dim, scale, out + p * head_dim, scores);
  };
  // This entry point runs between torch's OpenMP regions, whose threads keep spinning for a while afterwards: a pool
  // worker then waits for a core, and the caller for it (measured: 1.9 ms per call at 64 short sequences instead of
  // 0.2 ms alone). Small contexts therefore stay on the calling thread.
  int64_t total_tokens = 0;
  for (int64_t b = 0; b < batch_size; ++b) total_tokens += seq_lens[b];
  if (num_threads <= 1 || total_tokens * num_heads * head_dim < (int64_t{1} << 22)) {
    for (int64_t p = 0; p < batch_size * num_heads; ++p) pair(p);
    return;
  }
  ThreadPool::with_pool(num_threads, /*linger=*/false,
                        [&](ThreadPool& pool) { pool.parallel_for(batch_size * num_heads, pair); });
}

void paged_packed_attention(ThreadPool& pool, const float* q, int64_t q_stride, const float* k_cache,
                            const float* v_cache, const int32_t* block_tables, int64_t max_blocks,
                            const int32_t* seq_index, const int64_t* seq_lens, int64_t num_queries, int64_t num_heads,
                            int64_t head_dim, int64_t block_size, float scale, float* out, int64_t out_stride) {
  std::vector<int64_t> starts;  // group g is queries [starts[g], starts[g + 1])
  for (int64_t i = 0; i < num_queries; ++i)
    if (i == 0 || seq_index[i] != seq_index[i - 1] || i - starts.back() == kQueryTile) starts.push_back(i);
  starts.push_back(num_queries);
  const int64_t num_groups = static_cast<int64_t>(starts.size()) - 1;
  const int64_t token_stride = num_heads * head_dim;  // floats between consecutive tokens in the pool
  // Tasks (group, head). With a group of several queries somewhere (a prefill chunk) they go head-major, so that a
  // thread's consecutive tasks reread one head's K/V (a 512-token prompt's: 256 KB) from its L2 rather than every
  // head's; within a head the longest contexts first, to end the region on short tasks. When every group is a lone
  // query (a decode step) nothing is reread, and they go group-major: the heads of one sequence one after another,
  // so that its K/V blocks are read front to back instead of 256 bytes per token row 12 times over (64 decode queries
  // on one Intel Xeon core: 1.5x faster at context 48, 1.65x at 200 with the K/V in cache, 1.25x at 48 from memory;
  // end to end, 64 requests at context ~300 decode 1.08x faster, at context 16-48 no change measured). The order
  // changes no output.
  const bool group_major = num_groups == num_queries;
  pool.parallel_for(num_groups * num_heads, [&](int64_t p) {
    thread_local std::vector<float> scores;
    const int64_t h = group_major ? p % num_heads : p / num_groups;
    const int64_t g = num_groups - 1 - (group_major ? p / num_heads : p % num_groups);
    const int64_t first = starts[g], n = starts[g + 1] - first;
    const int32_t* table = block_tables + static_cast<int64_t>(seq_index[first]) * max_blocks;
    const float* qg = q + first * q_stride + h * head_dim;
    float* og = out + first * out_stride + h * head_dim;
    if (n == 1)
      attend_one_head(qg, k_cache, v_cache, table, seq_lens[first], block_size, token_stride, h * head_dim, head_dim,
                      scale, og, scores);
    else
      attend_queries(qg, q_stride, seq_lens + first, n, k_cache, v_cache, table, block_size, token_stride,
                     h * head_dim, head_dim, scale, og, out_stride, scores);
  });
}

}  // namespace fastgpt2
