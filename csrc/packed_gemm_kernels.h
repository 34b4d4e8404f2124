// The packed GEMM's vector layer (included through packed_gemm_tiles.h only): one set of inline operations per ISA,
// AVX-512 (16 lanes), AVX2 (8 lanes) or portable (one float). vload widens a panel row's weights to float32 exactly
// (bf16 by a 16-bit shift); vmul, vfma and vadd are one IEEE float32 operation per lane, so the three ISAs compute the same linear chains (only the GELU epilogue differs
// with the vector width).
#pragma once

#include <cmath>

#include "packed_gemm.h"
#include "simd.h"

namespace fastgpt2 {
namespace {

#if defined(FASTGPT2_AVX512)
using Vec = __m512;
constexpr int kLanes = 16;
constexpr int kTileTokens = 8;
constexpr int kMaxAccumulators = 24;  // of 32 zmm registers
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vset1(float v) { return _mm512_set1_ps(v); }
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline Vec vload(const bf16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline Vec vmul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec vadd(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline void vstore(float* p, Vec v) { _mm512_storeu_ps(p, v); }

// gelu256 of simd.h on 16 lanes (exp512: exp256's operations), so the same values lane for lane.
inline Vec vgelu(Vec v) {
  const Vec v3 = _mm512_mul_ps(_mm512_mul_ps(v, v), v);
  const Vec u2 = _mm512_mul_ps(_mm512_set1_ps(2.0f * 0.7978845608028654f),
                               _mm512_fmadd_ps(_mm512_set1_ps(0.044715f), v3, v));
  const Vec d = _mm512_add_ps(_mm512_set1_ps(1.0f), exp512(u2));
  return _mm512_sub_ps(v, _mm512_div_ps(v, d));
}
constexpr const char* kIsa = "avx512";
#elif defined(FASTGPT2_AVX2)
using Vec = __m256;
constexpr int kLanes = 8;
constexpr int kTileTokens = 6;
constexpr int kMaxAccumulators = 12;  // of 16 ymm registers
inline Vec vzero() { return _mm256_setzero_ps(); }
inline Vec vset1(float v) { return _mm256_set1_ps(v); }
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline Vec vload(const bf16* p) { return load8(p); }
inline Vec vmul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec vadd(Vec a, Vec b) { return _mm256_add_ps(a, b); }
inline void vstore(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline Vec vgelu(Vec v) { return gelu256(v); }
constexpr const char* kIsa = "avx2";
#else
// Portable: one float per "vector", std::fma, the same chains.
using Vec = float;
constexpr int kLanes = 1;
constexpr int kTileTokens = 4;
constexpr int kMaxAccumulators = 64;
inline Vec vzero() { return 0.0f; }
inline Vec vset1(float v) { return v; }
inline Vec vload(const float* p) { return *p; }
inline Vec vload(const bf16* p) { return to_float(*p); }
inline Vec vmul(Vec a, Vec b) { return a * b; }
inline Vec vfma(Vec a, Vec b, Vec c) { return std::fma(a, b, c); }
inline Vec vadd(Vec a, Vec b) { return a + b; }
inline void vstore(float* p, Vec v) { *p = v; }
// The int8 layout's byte j of a row's 4-byte group, as float32 (the portable int8 kernel; the SIMD ones multiply
// the bytes as integers).
inline Vec vbyte(const uint8_t* p, int j) { return static_cast<float>(p[j]); }
inline Vec vgelu(Vec v) { return gelu_scalar(v); }
constexpr const char* kIsa = "portable";
#endif

}  // namespace
}  // namespace fastgpt2
