// SIMD helpers shared by the CPU kernels. FASTGPT2_AVX2 is defined when the compiler targets AVX2 + FMA, and
// FASTGPT2_AVX512 as well when it also targets AVX-512 F/BW/VL/DQ (16-lane loops where a kernel has them); setup.py
// builds one module per ISA variant, each with its own flags. Every kernel keeps a portable path for other targets.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace fastgpt2 {

// A bfloat16 value (the top 16 bits of a float32), storage only.
struct bf16 {
  uint16_t bits;
};

inline float to_float(float v) { return v; }
inline float to_float(bf16 v) {
  const uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Round to nearest even, as torch's float32 -> bfloat16 conversion (NaN stays a quiet NaN).
inline bf16 to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{static_cast<uint16_t>((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16{static_cast<uint16_t>(u >> 16)};
}

// A software prefetch of the cache line holding p into L1 (kLocality 3) or L2 (2) that the compiler keeps. gcc (12,
// -O2 and up) deletes a loop whose only effect is __builtin_prefetch: C++ lets it assume that such a loop ends, and
// the prefetch does not count as an effect (the int8 GEMM's loads ahead, a loop of prefetches, had been compiled to
// nothing). Never faults, whatever p.
template <int kLocality>
inline void prefetch_line(const void* p) {
  static_assert(kLocality == 2 || kLocality == 3, "L1 (3) or L2 (2)");
#if defined(__x86_64__) || defined(__i386__)
  if constexpr (kLocality == 3)
    asm volatile("prefetcht0 %0" : : "m"(*static_cast<const char*>(p)));
  else
    asm volatile("prefetcht1 %0" : : "m"(*static_cast<const char*>(p)));
#else
  __builtin_prefetch(p, 0, kLocality);
#endif
}

}  // namespace fastgpt2

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define FASTGPT2_AVX2 1

namespace fastgpt2 {

// 8 weights as float32: bf16 is widened by a 16-bit shift (exact).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const bf16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// The horizontal sums of 4 vectors at once: lane b of the result is the sum of a[b]'s lanes.
inline __m256d reduce4_pd(const __m256d a[4]) {
  const __m256d h01 = _mm256_hadd_pd(a[0], a[1]), h23 = _mm256_hadd_pd(a[2], a[3]);  // (a0 01, a1 01, a0 23, a1 23)
  return _mm256_add_pd(_mm256_permute2f128_pd(h01, h23, 0x20), _mm256_permute2f128_pd(h01, h23, 0x31));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The largest of v's 8 lanes, in every lane (each step _mm256_max_ps(m, shuffled m)).
inline __m256 hmax_all(__m256 m) {
  m = _mm256_max_ps(m, _mm256_permute2f128_ps(m, m, 1));
  m = _mm256_max_ps(m, _mm256_permute_ps(m, 0x4e));
  return _mm256_max_ps(m, _mm256_permute_ps(m, 0xb1));
}

inline double hsum(__m256d v) {
  const __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
  return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}

// v, opaque to the optimiser so that it stays in a register: gcc otherwise folds a constant or a reused vector into
// every instruction that reads it as a memory operand, and loops of FMAs become bound by the load ports (measured:
// the sampler's exp 41 -> 36 us per row of 50257; the GEMM microkernel's B panel row).
template <typename V>
inline V in_register(V v) {
  asm("" : "+x"(v));
  return v;
}

// exp(x) for x in [-87, 88], Cephes' degree-5 polynomial on x - n ln2; relative error about 2e-7.
inline __m256 exp256(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// gelu_tanh(v) = v - v / (1 + exp(2u)), u = sqrt(2/pi) (v + 0.044715 v^3): the same value as
// 0.5 v (1 + tanh(u)) without the cancellation of 1 + tanh(u) for negative u.
inline __m256 gelu256(__m256 v) {
  const __m256 v3 = _mm256_mul_ps(_mm256_mul_ps(v, v), v);
  const __m256 u2 = _mm256_mul_ps(_mm256_set1_ps(2.0f * 0.7978845608028654f),
                                  _mm256_fmadd_ps(_mm256_set1_ps(0.044715f), v3, v));
  const __m256 d = _mm256_add_ps(_mm256_set1_ps(1.0f), exp256(u2));
  return _mm256_sub_ps(v, _mm256_div_ps(v, d));
}

}  // namespace fastgpt2
#endif

#if defined(FASTGPT2_AVX2) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512DQ__)
#define FASTGPT2_AVX512 1

namespace fastgpt2 {

// exp256 on 16 lanes (the same operations, so the same results lane for lane).
inline __m512 exp512(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

// The two 8-lane float64 halves of 16 float32 lanes (exact).
inline __m512d low_pd(__m512 v) { return _mm512_cvtps_pd(_mm512_castps512_ps256(v)); }
inline __m512d high_pd(__m512 v) { return _mm512_cvtps_pd(_mm512_extractf32x8_ps(v, 1)); }

// The horizontal sums of 8 vectors at once: lane b of the result is the sum of a[b]'s lanes (a transposing tree of
// 7 additions, in an order other than _mm512_reduce_add_pd's).
inline __m512d reduce8_pd(const __m512d a[8]) {
  __m512d pairs[4];  // per 128-bit lane k: (a[2i] lanes 2k + 2k+1, a[2i+1] lanes 2k + 2k+1)
  for (int i = 0; i < 4; ++i) {
    pairs[i] = _mm512_add_pd(_mm512_unpacklo_pd(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_pd(a[2 * i], a[2 * i + 1]));
  }
  // 128-bit lanes (0, 2) + (1, 3) of two pair vectors: (pairs 0-1 of x, 2-3 of x, 0-1 of y, 2-3 of y).
  auto fold = [](__m512d x, __m512d y) {
    return _mm512_add_pd(_mm512_shuffle_f64x2(x, y, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f64x2(x, y, _MM_SHUFFLE(3, 1, 3, 1)));
  };
  return fold(fold(pairs[0], pairs[1]), fold(pairs[2], pairs[3]));
}

}  // namespace fastgpt2
#endif

namespace fastgpt2 {

// tanh-GELU, torch's approximate="tanh".
inline float gelu_scalar(float v) {
  return 0.5f * v * (1.0f + std::tanh(0.7978845608028654f * (v + 0.044715f * v * v * v)));
}

// dot(a, b) over n values (a float32 or bf16, widened): AVX2 FMAs when n is a multiple of 8, else eight independent
// lanes that gcc vectorises without -ffast-math.
template <typename A>
inline float dot(const A* a, const float* b, int64_t n) {
#ifdef FASTGPT2_AVX2
  if (n % 8 == 0) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += 8) acc = _mm256_fmadd_ps(load8(a + i), _mm256_loadu_ps(b + i), acc);
    return hsum(acc);
  }
#endif
  float lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) lane[j] += to_float(a[i + j]) * b[i + j];
  float s = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
  for (; i < n; ++i) s += to_float(a[i]) * b[i];
  return s;
}

}  // namespace fastgpt2
