// See packed_gemm.h: the int8 (W8A8) kernels. Per call, every token's activations are quantised in blocks of 32
// (its row alone decides its q and scales), then register tiles of MR tokens x NP panels run per block of 32 k: an
// integer dot product per (token, output) started at -128 * sum(q_x) (the weights are stored as q_w + 128, so the
// sum of (q_w + 128) * q_x minus that is the signed dot product, exactly), then c = fma(dw * dx, float(dot), c).
// With AVX512-VNNI the block's dot products are 8 vpdpbusd per (token, panel), with AVX-VNNI (AVX2 + the VEX
// vpdpbusd) 16 on 8 rows at a time; with AVX2 or AVX-512 alone, vpmaddwd
// on the even and the odd bytes of each 4-k group (16-bit products summed in pairs into int32, exact); the portable
// build uses float32 FMAs over the exact integers (every partial sum is an integer below 2^24, so exact as well). The
// same values on every variant.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "packed_gemm.h"
#include "packed_gemm_tiles.h"

namespace fastgpt2 {
namespace {

#if defined(FASTGPT2_AVX512) && defined(__AVX512VNNI__)
#define FASTGPT2_Q8_VNNI 1
#elif defined(FASTGPT2_AVX2) && !defined(FASTGPT2_AVX512) && defined(__AVXVNNI__)
#define FASTGPT2_Q8_VNNI256 1  // AVX-VNNI (AVX2-only Intel clients since Alder Lake): the VEX vpdpbusd on 8 rows
#elif defined(FASTGPT2_AVX2)
#define FASTGPT2_Q8_MADD 1
// Integer vectors of kLanes int32 (one per output row) for the vpmaddwd kernel.
#if defined(FASTGPT2_AVX512)
using IVec = __m512i;
inline IVec iload(const uint8_t* p) { return _mm512_loadu_si512(p); }
inline IVec iset1(int32_t v) { return _mm512_set1_epi32(v); }
inline IVec ieven_bytes(IVec v) { return _mm512_and_si512(v, _mm512_set1_epi32(0x00FF00FF)); }
inline IVec iodd_bytes(IVec v) { return _mm512_srli_epi16(v, 8); }
inline IVec imadd(IVec a, IVec b) { return _mm512_madd_epi16(a, b); }
inline IVec iadd(IVec a, IVec b) { return _mm512_add_epi32(a, b); }
inline Vec itof(IVec v) { return _mm512_cvtepi32_ps(v); }
#else
using IVec = __m256i;
inline IVec iload(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline IVec iset1(int32_t v) { return _mm256_set1_epi32(v); }
inline IVec ieven_bytes(IVec v) { return _mm256_and_si256(v, _mm256_set1_epi32(0x00FF00FF)); }
inline IVec iodd_bytes(IVec v) { return _mm256_srli_epi16(v, 8); }
inline IVec imadd(IVec a, IVec b) { return _mm256_madd_epi16(a, b); }
inline IVec iadd(IVec a, IVec b) { return _mm256_add_epi32(a, b); }
inline Vec itof(IVec v) { return _mm256_cvtepi32_ps(v); }
#endif
#endif

// Tokens per tile and (integer, float) accumulator pairs per tile: each (token, vector of 16 or 8 rows) keeps the
// block's dot product and the output's chain in registers.
#if defined(FASTGPT2_AVX512)
constexpr int kQ8Tile = 6;
constexpr int kQ8Pairs = 12;
#elif defined(FASTGPT2_AVX2)
constexpr int kQ8Tile = 3;
constexpr int kQ8Pairs = 6;
#else
constexpr int kQ8Tile = 4;
constexpr int kQ8Pairs = 64;
#endif
constexpr int64_t kGroupsPerBlock = kQ8Block / 4;  // 4-k groups per scale block
constexpr int64_t kQ8AccFloats = kQ8Tile * 8 * kPanelRows;

constexpr int q8_panels_for(int mr) { return std::max(1, std::min(8, kQ8Pairs / (mr * kVecsPerPanel))); }

// 32 activations (or weights) -> q (32 int8), *sum = the sum of the q, and the returned scale d, bitwise
// quantize_q8_block. The q leave in one 32-byte store and their sum is taken from the registers: stored as two halves
// and summed from memory, every reload waited for both stores (a failed store forward). The quantisation's share of a
// 512-token int8 GEMM on one Intel Xeon core went from 10.5% to 8.7%.
inline float quantize_block(const float* v, int8_t* q, int32_t* sum) {
#if defined(FASTGPT2_AVX512)
  const __m512 a = _mm512_loadu_ps(v), b = _mm512_loadu_ps(v + 16);
  const __m512 big = _mm512_set1_ps(std::numeric_limits<float>::max());
  if (_mm512_cmp_ps_mask(_mm512_abs_ps(a), big, _CMP_NLE_UQ) | _mm512_cmp_ps_mask(_mm512_abs_ps(b), big, _CMP_NLE_UQ)) {
    *sum = 0;  // NaN or inf: q all zero
    return quantize_q8_block(v, q);
  }
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
  const float d = amax / 127.0f;
  const __m512 id = _mm512_set1_ps(d != 0.0f ? 1.0f / d : 0.0f);
  __m512i r[2];
  for (int h = 0; h < 2; ++h) {
    const __m512 y = _mm512_mul_ps(h ? b : a, id);
    const __m512 t = _mm512_roundscale_ps(y, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    // roundf: away from zero at .5 (y - t is exact).
    const __mmask16 up = _mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_sub_ps(y, t)), _mm512_set1_ps(0.5f), _CMP_GE_OQ);
    const __m512 one = _mm512_or_ps(_mm512_set1_ps(1.0f), _mm512_and_ps(y, _mm512_set1_ps(-0.0f)));
    r[h] = _mm512_cvttps_epi32(_mm512_mask_add_ps(t, up, t, one));
  }
  const __m256i bytes = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm512_cvtepi32_epi8(r[0])),
                                                _mm512_cvtepi32_epi8(r[1]), 1);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), bytes);
  *sum = _mm512_reduce_add_epi32(_mm512_add_epi32(r[0], r[1]));
  return d;
#elif defined(FASTGPT2_AVX2)
  // The same operations on 4 vectors of 8, where a scalar loop called roundf per value: the four int8 GEMMs of a
  // 124M layer 1.09x faster at 64 and at 512 tokens (one Intel Xeon, 2 threads, AVX2 kernels forced; the same bits).
  const __m256 sign = _mm256_set1_ps(-0.0f), big = _mm256_set1_ps(std::numeric_limits<float>::max());
  __m256 a[4], m = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
  for (int h = 0; h < 4; ++h) {
    a[h] = _mm256_loadu_ps(v + 8 * h);
    const __m256 abs = _mm256_andnot_ps(sign, a[h]);
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(abs, big, _CMP_NLE_UQ));
    m = _mm256_max_ps(m, abs);
  }
  if (_mm256_movemask_ps(bad)) {
    *sum = 0;  // NaN or inf: q all zero
    return quantize_q8_block(v, q);
  }
  const float amax = _mm_cvtss_f32(_mm256_castps256_ps128(hmax_all(m)));
  const float d = amax / 127.0f;
  const __m256 id = _mm256_set1_ps(d != 0.0f ? 1.0f / d : 0.0f);
  __m256i r[4];
  for (int h = 0; h < 4; ++h) {
    const __m256 y = _mm256_mul_ps(a[h], id);
    const __m256 t = _mm256_round_ps(y, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    // roundf: away from zero at .5 (y - t is exact).
    const __m256 up = _mm256_cmp_ps(_mm256_andnot_ps(sign, _mm256_sub_ps(y, t)), _mm256_set1_ps(0.5f), _CMP_GE_OQ);
    const __m256 one = _mm256_or_ps(_mm256_set1_ps(1.0f), _mm256_and_ps(y, sign));
    r[h] = _mm256_cvttps_epi32(_mm256_add_ps(t, _mm256_and_ps(up, one)));
  }
  // int32 -> int8 in token order: the packs interleave 128-bit lanes, one permutation restores the order.
  const __m256i words = _mm256_packs_epi16(_mm256_packs_epi32(r[0], r[1]), _mm256_packs_epi32(r[2], r[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q),
                      _mm256_permutevar8x32_epi32(words, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  const __m256i total = _mm256_add_epi32(_mm256_add_epi32(r[0], r[1]), _mm256_add_epi32(r[2], r[3]));
  __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, _MM_SHUFFLE(1, 0, 3, 2)));
  *sum = _mm_cvtsi128_si32(_mm_add_epi32(s4, _mm_shuffle_epi32(s4, _MM_SHUFFLE(2, 3, 0, 1))));
  return d;
#else
  const float d = quantize_q8_block(v, q);
  int32_t total = 0;
  for (int64_t k = 0; k < kQ8Block; ++k) total += q[k];
  *sum = total;
  return d;
#endif
}

// Every token's quantised activations, tile by tile (tile i of mr tokens from t0 at offset t0 * per-token size):
// per (block, token) the scale d and comp = -128 * sum(q); the q of each 4-k group as one 4-byte word ((K / 4, mr):
// VNNI), as two words of int16 pairs (q0, q2) and (q1, q3) ((K / 4, mr, 2): vpmaddwd), or as (K, mr) floats (the
// exact integers: portable).
struct Q8Activations {
  std::vector<int32_t> words;
  std::vector<float> values, d;
  std::vector<int32_t> comp;
};

// A tile's view of them.
struct Q8Tile {
  const int32_t* words;
  const float* values;
  const float* d;
  const int32_t* comp;
};

// Words per token and 4-k group.
#if defined(FASTGPT2_Q8_MADD)
constexpr int64_t kWordsPerGroup = 2;
#else
constexpr int64_t kWordsPerGroup = 1;
#endif

void quantize_tile(const float* x, int64_t ldx, int64_t t0, int mr, int64_t K, Q8Activations& a) {
  const int64_t blocks = K / kQ8Block;
  float* d = a.d.data() + t0 * blocks;
  int32_t* comp = a.comp.data() + t0 * blocks;
  for (int i = 0; i < mr; ++i)
    for (int64_t b = 0; b < blocks; ++b) {
      alignas(64) int8_t q[kQ8Block];
      int32_t sum;
      d[b * mr + i] = quantize_block(x + (t0 + i) * ldx + b * kQ8Block, q, &sum);
      comp[b * mr + i] = -128 * sum;
#if defined(FASTGPT2_Q8_VNNI) || defined(FASTGPT2_Q8_VNNI256)
      int32_t* words = a.words.data() + t0 * (K / 4);
      for (int64_t g = 0; g < kGroupsPerBlock; ++g)
        std::memcpy(&words[(b * kGroupsPerBlock + g) * mr + i], q + 4 * g, 4);
#elif defined(FASTGPT2_Q8_MADD)
      int32_t* words = a.words.data() + t0 * (K / 4) * 2;
      auto pair = [](int8_t lo, int8_t hi) {
        return static_cast<int32_t>(static_cast<uint32_t>(static_cast<uint16_t>(lo)) |
                                    static_cast<uint32_t>(static_cast<uint16_t>(hi)) << 16);
      };
      for (int64_t g = 0; g < kGroupsPerBlock; ++g) {
        int32_t* w = &words[((b * kGroupsPerBlock + g) * mr + i) * 2];
        w[0] = pair(q[4 * g], q[4 * g + 2]), w[1] = pair(q[4 * g + 1], q[4 * g + 3]);
      }
#else
      float* values = a.values.data() + t0 * K;
      for (int64_t k = 0; k < kQ8Block; ++k) values[(b * kQ8Block + k) * mr + i] = q[k];
#endif
    }
}

Q8Tile tile_view(const Q8Activations& a, int64_t t0, int64_t K) {
#if defined(FASTGPT2_Q8_VNNI) || defined(FASTGPT2_Q8_VNNI256) || defined(FASTGPT2_Q8_MADD)
  const int32_t* words = a.words.data() + t0 * (K / 4) * kWordsPerGroup;
  const float* values = nullptr;
#else
  const int32_t* words = nullptr;
  const float* values = a.values.data() + t0 * K;
#endif
  return {words, values, a.d.data() + t0 * (K / kQ8Block), a.comp.data() + t0 * (K / kQ8Block)};
}

// The NP panels from `panel` (panel stride pstride bytes; scales per panel (K / 32, 16), stride sstride).
struct Q8Panels {
  const uint8_t* b;
  int64_t pstride;
  const float* s;
  int64_t sstride;
};

// acc (MR x NP*16) continued over the blocks of k in [k_begin, k_end) (multiples of 32; from zero when k_begin == 0,
// else from acc's stored values).
#if defined(FASTGPT2_Q8_VNNI256)
// AVX-VNNI: vpdpbusd has a latency of several cycles, so each (token, vector) gets two integer accumulators (even and
// odd 4-k groups; integer sums, so the split changes no value) and the float chains wait in acc between blocks: 12
// independent chains in the 16 ymm registers instead of 6 (the float chains' operations are unchanged).
template <int MR, int NP>
inline void q8_microkernel(const Q8Panels& w, const Q8Tile& x, int64_t k_begin, int64_t k_end, float* acc,
                           const Ahead& ahead) {
  constexpr int NV = NP * kVecsPerPanel;
  static_assert(kGroupsPerBlock % 2 == 0, "the two accumulator sets take the block's 4-k groups in pairs");
  if (k_begin == 0)
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NV; ++j) vstore(acc + i * NP * kPanelRows + j * kLanes, vzero());
  auto weights = [&](int j, int64_t g) {
    return reinterpret_cast<const __m256i*>(w.b + (j / kVecsPerPanel) * w.pstride + g * kPanelRows * 4 +
                                            (j % kVecsPerPanel) * kLanes * 4);
  };
  for (int64_t b = k_begin / kQ8Block; b < k_end / kQ8Block; ++b) {
    ahead.load(b - k_begin / kQ8Block);
    __m256i s[MR][NV], t[MR][NV];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NV; ++j) s[i][j] = _mm256_set1_epi32(x.comp[b * MR + i]), t[i][j] = _mm256_setzero_si256();
#pragma GCC unroll 4
    for (int64_t gg = 0; gg < kGroupsPerBlock; gg += 2) {
      const int64_t g = b * kGroupsPerBlock + gg;  // a constant trip count, as in the AVX-512 VNNI loop
      __m256i wv[NV];
      for (int j = 0; j < NV; ++j) wv[j] = _mm256_load_si256(weights(j, g));
      for (int i = 0; i < MR; ++i) {
        const __m256i xv = _mm256_set1_epi32(x.words[g * MR + i]);
        for (int j = 0; j < NV; ++j) s[i][j] = _mm256_dpbusd_avx_epi32(s[i][j], wv[j], xv);
      }
      for (int j = 0; j < NV; ++j) wv[j] = _mm256_load_si256(weights(j, g + 1));
      for (int i = 0; i < MR; ++i) {
        const __m256i xv = _mm256_set1_epi32(x.words[(g + 1) * MR + i]);
        for (int j = 0; j < NV; ++j) t[i][j] = _mm256_dpbusd_avx_epi32(t[i][j], wv[j], xv);
      }
    }
    for (int j = 0; j < NV; ++j) {
      const Vec dw = vload(w.s + (j / kVecsPerPanel) * w.sstride + b * kPanelRows + (j % kVecsPerPanel) * kLanes);
      for (int i = 0; i < MR; ++i) {
        float* c = acc + i * NP * kPanelRows + j * kLanes;
        const Vec dot = _mm256_cvtepi32_ps(_mm256_add_epi32(s[i][j], t[i][j]));
        vstore(c, vfma(vmul(dw, vset1(x.d[b * MR + i])), dot, vload(c)));
      }
    }
  }
}
#else
template <int MR, int NP>
inline void q8_microkernel(const Q8Panels& w, const Q8Tile& x, int64_t k_begin, int64_t k_end, float* acc,
                           const Ahead& ahead) {
  constexpr int NV = NP * kVecsPerPanel;
  Vec c[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) c[i][j] = k_begin == 0 ? vzero() : vload(acc + i * NP * kPanelRows + j * kLanes);
  auto weights = [&](int j, int64_t g) {
    return w.b + (j / kVecsPerPanel) * w.pstride + g * kPanelRows * 4 + (j % kVecsPerPanel) * kLanes * 4;
  };
  for (int64_t b = k_begin / kQ8Block; b < k_end / kQ8Block; ++b) {
    ahead.load(b - k_begin / kQ8Block);
#if defined(FASTGPT2_Q8_VNNI)
    __m512i s[MR][NV];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NV; ++j) s[i][j] = _mm512_set1_epi32(x.comp[b * MR + i]);
    // A loop of a constant trip count, unrolled: with the bounds computed from b, GCC kept the loop and copied every
    // accumulator between registers on each iteration (the constant count: 1.05-1.15x at 64 and 512 tokens).
#pragma GCC unroll 8
    for (int64_t gg = 0; gg < kGroupsPerBlock; ++gg) {
      const int64_t g = b * kGroupsPerBlock + gg;
      __m512i wv[NV];
      for (int j = 0; j < NV; ++j) wv[j] = _mm512_load_si512(weights(j, g));
      for (int i = 0; i < MR; ++i) {
        const __m512i xv = _mm512_set1_epi32(x.words[g * MR + i]);
        for (int j = 0; j < NV; ++j) s[i][j] = _mm512_dpbusd_epi32(s[i][j], wv[j], xv);
      }
    }
    auto dot = [&](int i, int j) { return _mm512_cvtepi32_ps(s[i][j]); };
#elif defined(FASTGPT2_Q8_MADD)
    IVec s[MR][NV];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NV; ++j) s[i][j] = iset1(x.comp[b * MR + i]);
    // Bounds from b here: the constant trip count that speeds up the VNNI loops made this one 1.4x slower (AVX2 and
    // AVX-512 alike, one Intel Xeon core).
#pragma GCC unroll 8
    for (int64_t g = b * kGroupsPerBlock; g < (b + 1) * kGroupsPerBlock; ++g)
      for (int j = 0; j < NV; ++j) {
        const IVec v = iload(weights(j, g));
        const IVec even = ieven_bytes(v), odd = iodd_bytes(v);  // (u0, u2) and (u1, u3) as int16 pairs
        for (int i = 0; i < MR; ++i) {
          const int32_t* xw = x.words + (g * MR + i) * 2;
          s[i][j] = iadd(s[i][j], iadd(imadd(even, iset1(xw[0])), imadd(odd, iset1(xw[1]))));
        }
      }
    auto dot = [&](int i, int j) { return itof(s[i][j]); };
#else
    Vec s[MR][NV];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NV; ++j) s[i][j] = vset1(static_cast<float>(x.comp[b * MR + i]));
    for (int64_t g = b * kGroupsPerBlock; g < (b + 1) * kGroupsPerBlock; ++g)
      for (int h = 0; h < 4; ++h) {
        Vec wv[NV];
        for (int j = 0; j < NV; ++j) wv[j] = vbyte(weights(j, g), h);
        const float* xk = x.values + (4 * g + h) * MR;
        for (int i = 0; i < MR; ++i) {
          const Vec xv = vset1(xk[i]);
          for (int j = 0; j < NV; ++j) s[i][j] = vfma(xv, wv[j], s[i][j]);
        }
      }
    auto dot = [&](int i, int j) { return s[i][j]; };
#endif
    Vec dw[NV];
    for (int j = 0; j < NV; ++j)
      dw[j] = vload(w.s + (j / kVecsPerPanel) * w.sstride + b * kPanelRows + (j % kVecsPerPanel) * kLanes);
    for (int i = 0; i < MR; ++i) {
      const Vec dx = vset1(x.d[b * MR + i]);
      for (int j = 0; j < NV; ++j) c[i][j] = vfma(vmul(dw[j], dx), dot(i, j), c[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) vstore(acc + i * NP * kPanelRows + j * kLanes, c[i][j]);
}
#endif

// Whether a decode step's tiles load the next panel slice ahead (run_panels_q8): the VNNI kernels outrun memory and
// gain, the vpmaddwd ones are bound by their arithmetic and lose to the loads' instructions. Same-time A/B on one Intel
// Xeon, 2 threads, 16 concurrent int8 decode steps with the loads: avx512_vnni 13.0 -> 10.9 ms, avx2_vnni (forced)
// 22.0 -> 20.9 ms, avx2 (forced) 31.0 -> 32.9 ms; 64 concurrent, avx512_vnni 38.9 -> 37.0 ms. A 512-token prefill
// (several token blocks) with them: avx512_vnni 133 -> 142 ms, hence one block only.
#if defined(FASTGPT2_Q8_VNNI) || defined(FASTGPT2_Q8_VNNI256)
constexpr bool kLoadAhead = true;
#else
constexpr bool kLoadAhead = false;
#endif

// Panels [p_begin, p_end) for tokens [0, num_tokens), blocked by sweep_panels.
void run_panels_q8(const PackedMatrix<q8>& w, const float* bias, const Q8Activations& a, int64_t num_tokens, float* y,
                   int64_t ldy, int64_t p_begin, int64_t p_end, Epilogue epilogue,
                   const ArgmaxParts* argmax = nullptr, const KVDestination* kv = nullptr) {
  const int64_t K = w.cols;
  const Output out{bias, w.rows, K, y, ldy, epilogue, argmax, kv, ask_output_ahead(num_tokens, w.rows)};
  const Tiling tiling(num_tokens, kQ8Tile);
  const int group = q8_panels_for(tiling.max_size());
  const int64_t block_tiles = std::max<int64_t>(1, kL2Floats / K / tiling.max_size());
  const int64_t kc = tiling.num_tiles == 1
                         ? K
                         : std::min(K, std::max(kQ8Block, kL1Bytes / (group * kPanelRows) / kQ8Block * kQ8Block));
  sweep_panels(tiling, group, K, kc, block_tiles, kQ8AccFloats, p_begin, p_end,
               [&](int64_t i, int64_t p, int np, int64_t k0, int64_t k1, float* acc, const NextSlice& next) {
                 const Q8Panels panels{&w.panel(p)->v, K * kPanelRows, w.panel_scales(p), K / kQ8Block * kPanelRows};
                 const int64_t t0 = tiling.start(i);
                 const Q8Tile x = tile_view(a, t0, K);
                 // The next slice's weights (kPanelRows bytes per k) and scales (4 bytes per 32 k per row), when the
                 // tokens make one block: each slice is then read once, from memory (a decode step). With several
                 // token blocks (a long prefill) the slices are read again from cache, and the loads ahead only cost
                 // instructions; likewise with the slower vpmaddwd kernels (kLoadAhead). Until 7aafbda a loop of
                 // __builtin_prefetch alone, which gcc deleted (see prefetch_line).
                 Ahead ahead((k1 - k0) / kQ8Block);
                 for (int j = 0; kLoadAhead && tiling.num_tiles <= block_tiles && j < next.np; ++j) {
                   ahead.add(next, &w.panel(next.panel + j)->v, kPanelRows);
                   ahead.add(next, w.panel_scales(next.panel + j), kPanelRows * 4 / kQ8Block);
                 }
                 if (k1 == K) prefetch_tile_output(out, tiling.size(i), np, p, t0);  // stored at the end of this call
                 dispatch_tile<kQ8Tile, q8_panels_for>(tiling.size(i), np, [&](auto mr, auto nr) {
                   q8_microkernel<decltype(mr)::value, decltype(nr)::value>(panels, x, k0, k1, acc, ahead);
                   if (k1 == K) store_tile(acc, decltype(mr)::value, decltype(nr)::value, out, p, t0);
                 });
               });
}

// The calling thread's quantised activations for x (num_tokens, K), on the pool when it is large.
const Q8Activations& quantize_all(ThreadPool* pool, const float* x, int64_t ldx, int64_t num_tokens, int64_t K) {
  thread_local Q8Activations buffers;
  Q8Activations& a = buffers;  // (a lambda naming the thread_local would see the executing thread's own copy)
  if (K % kQ8Block != 0)
    throw std::invalid_argument("int8 weights need in_features to be a multiple of 32, got " + std::to_string(K));
  const int64_t n = num_tokens * K;
#if defined(FASTGPT2_Q8_VNNI) || defined(FASTGPT2_Q8_VNNI256) || defined(FASTGPT2_Q8_MADD)
  at_least(a.words, n / 4 * kWordsPerGroup);
#else
  at_least(a.values, n);
#endif
  at_least(a.d, n / kQ8Block), at_least(a.comp, n / kQ8Block);
  const Tiling tiling(num_tokens, kQ8Tile);
  auto tile = [&](int64_t i) { quantize_tile(x, ldx, tiling.start(i), tiling.size(i), K, a); };
  if (pool && num_tokens * K >= (int64_t{1} << 16))
    pool->parallel_for(tiling.num_tiles, tile);
  else
    for (int64_t i = 0; i < tiling.num_tiles; ++i) tile(i);
  return a;
}

}  // namespace

float quantize_q8_block(const float* w, int8_t* q) {
  float amax = 0.0f;
  bool finite = true;
  for (int64_t i = 0; i < kQ8Block; ++i) amax = std::max(amax, std::fabs(w[i])), finite = finite && std::isfinite(w[i]);
  if (!finite) {  // NaN or inf: the block's products are NaN, as float32's would be
    std::memset(q, 0, kQ8Block);
    return std::numeric_limits<float>::quiet_NaN();
  }
  const float d = amax / 127.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  for (int64_t i = 0; i < kQ8Block; ++i) q[i] = static_cast<int8_t>(std::roundf(w[i] * id));
  return d;
}

void dequantize_q8(const float* w, int64_t rows, int64_t cols, float* out) {
  if (cols % kQ8Block != 0)
    throw std::invalid_argument("int8 weights need in_features to be a multiple of 32, got " + std::to_string(cols));
  int8_t q[kQ8Block];
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k0 = 0; k0 < cols; k0 += kQ8Block) {
      const float d = quantize_q8_block(w + r * cols + k0, q);
      for (int64_t i = 0; i < kQ8Block; ++i) out[r * cols + k0 + i] = static_cast<float>(q[i]) * d;
    }
}

template <>
PackedMatrix<q8> pack_matrix<q8>(const float* w, int64_t rows, int64_t cols) {
  if (cols % kQ8Block != 0)
    throw std::invalid_argument("int8 weights need in_features to be a multiple of 32, got " + std::to_string(cols));
  PackedMatrix<q8> m;
  m.rows = rows, m.cols = cols;
  const int64_t n = m.num_panels() * cols * kPanelRows;
  m.data = std::shared_ptr<q8>(static_cast<q8*>(aligned_bytes(n)), std::free);
  m.scales = std::shared_ptr<float>(static_cast<float*>(aligned_bytes(n / kQ8Block * sizeof(float))), std::free);
  const float zeros[kQ8Block] = {};
  for (int64_t p = 0; p < m.num_panels(); ++p) {
    q8* panel = m.data.get() + p * cols * kPanelRows;
    float* scales = m.scales.get() + p * (cols / kQ8Block) * kPanelRows;
    for (int64_t j = 0; j < kPanelRows; ++j) {
      const int64_t r = p * kPanelRows + j;
      int8_t q[kQ8Block];
      for (int64_t k0 = 0; k0 < cols; k0 += kQ8Block) {  // the padding rows quantise to zeros with scale 0
        scales[k0 / kQ8Block * kPanelRows + j] = quantize_q8_block(r < rows ? w + r * cols + k0 : zeros, q);
        for (int64_t i = 0; i < kQ8Block; ++i) {
          const int64_t k = k0 + i;
          panel[(k / 4 * kPanelRows + j) * 4 + k % 4] = q8{static_cast<uint8_t>(q[i] + 128)};
        }
      }
    }
  }
  return m;
}

template <>
void packed_linear<q8>(ThreadPool& pool, const PackedMatrix<q8>& w, const float* bias, const float* x, int64_t ldx,
                       float* y, int64_t ldy, int64_t num_tokens, Epilogue epilogue, const KVDestination* kv) {
  check_kv_destination(kv, w.rows, epilogue);
  if (num_tokens <= 0) return;
  const Q8Activations& a = quantize_all(&pool, x, ldx, num_tokens, w.cols);
  for_panel_tasks(pool, w.num_panels(), q8_panels_for(Tiling(num_tokens, kQ8Tile).max_size()),
                  [&](int64_t p0, int64_t p1) {
                    run_panels_q8(w, bias, a, num_tokens, y, ldy, p0, p1, epilogue, nullptr, kv);
                  });
}

template <>
void packed_linear_serial<q8>(const PackedMatrix<q8>& w, const float* bias, const float* x, int64_t ldx, float* y,
                              int64_t ldy, int64_t num_tokens, Epilogue epilogue) {
  if (num_tokens <= 0) return;
  const Q8Activations& a = quantize_all(nullptr, x, ldx, num_tokens, w.cols);
  run_panels_q8(w, bias, a, num_tokens, y, ldy, 0, w.num_panels(), epilogue);
}

template <>
void packed_argmax<q8>(ThreadPool& pool, const PackedMatrix<q8>& w, const float* bias, const float* x, int64_t ldx,
                       int64_t num_tokens, int64_t limit, int64_t* index) {
  if (num_tokens <= 0) return;
  const Q8Activations& a = quantize_all(&pool, x, ldx, num_tokens, w.cols);
  argmax_sweep(pool, w.num_panels(), q8_panels_for(Tiling(num_tokens, kQ8Tile).max_size()), num_tokens,
               std::min(limit, w.rows), index, [&](int64_t p0, int64_t p1, const ArgmaxParts* parts) {
                 run_panels_q8(w, bias, a, num_tokens, nullptr, 0, p0, p1, Epilogue::kArgmax, parts);
               });
}

const char* packed_gemm_q8_isa() {
#if defined(FASTGPT2_Q8_VNNI)
  return "avx512_vnni";
#elif defined(FASTGPT2_Q8_VNNI256)
  return "avx2_vnni";
#else
  return kIsa;
#endif
}

}  // namespace fastgpt2
