// The bucket-histogram steps shared by the exact and the fast exp passes of the CPU sampler (sampling_passes.cpp,
// sampling_fast_passes.cpp): storing each token's bucket (AVX2, AVX-512 or portable) and counting the stored buckets.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "sampling_math.h"

namespace fastgpt2 {
namespace sampling_detail {

constexpr int64_t COUNT_LAG = 64;  // the exp loops count the buckets they stored this many tokens earlier

// Counts n stored buckets (n a multiple of 4) into the two sub-histograms, 4 per 64-bit load (as fast as 16-bit loads
// in alternated runs, fewer loads).
inline void count_buckets(const uint16_t* bucket, int64_t n, int32_t* count, int32_t* odd) {
  for (int64_t t = 0; t < n; t += 4) {
    uint64_t four;
    std::memcpy(&four, bucket + t, sizeof(four));
    ++count[four & 0xffff], ++odd[(four >> 16) & 0xffff], ++count[(four >> 32) & 0xffff], ++odd[four >> 48];
  }
}

// The portable loops' bucket of token j, stored (a tiny token as one of the tiny bucket's copies).
inline void store_bucket(const float* x, int64_t j, float max, float bucket_scale, uint16_t* bucket) {
  const uint32_t b = bucket_of(x[j], max, bucket_scale);
  bucket[j] = static_cast<uint16_t>(b == BUCKET_TINY ? BUCKET_TINY + (j % NUM_TINY_LANES) : b);
}

// The same, and counted.
inline void bucket_and_count(const float* x, int64_t j, float max, float bucket_scale, uint16_t* bucket,
                             int32_t* count) {
  store_bucket(x, j, max, bucket_scale, bucket);
  ++count[bucket[j]];
}

// Folds the second sub-histogram and the tiny bucket's copies into count; the padding's buckets get BUCKET_PAD.
inline void finish_histogram(int32_t* count, const int32_t* odd, uint16_t* bucket, int64_t vocab_size) {
  for (int b = 0; b < NUM_BUCKETS; ++b) count[b] += odd[b];
  for (int b = BUCKET_TINY + 1; b <= BUCKET_TINY_LAST; ++b) count[BUCKET_TINY] += count[b], count[b] = 0;
  const int64_t padded = (vocab_size + BLOCK - 1) / BLOCK * BLOCK;
  std::fill(bucket + vocab_size, bucket + padded, static_cast<uint16_t>(BUCKET_PAD));
}

#ifdef FASTGPT2_AVX2
// Stores the buckets of 8 tokens from their gaps max - x: floor(gap * scale) in float32, as bucket_of. The unsigned
// min with BUCKET_TINY + lane sends every tiny token (+inf and out-of-range gaps included) to one of the tiny bucket's
// copies (a linear bucket is < BUCKET_TINY, so it passes unchanged).
inline void store_buckets8(uint16_t* dst, __m256 gap, __m256 scale, __m256i tiny_lanes) {
  const __m256i b = _mm256_min_epu32(_mm256_cvttps_epi32(_mm256_mul_ps(gap, scale)), tiny_lanes);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm_packus_epi32(_mm256_castsi256_si128(b),
                                                                     _mm256_extracti128_si256(b, 1)));
}

inline __m256i tiny_lanes8() {
  return _mm256_add_epi32(_mm256_set1_epi32(BUCKET_TINY), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
#endif

#ifdef FASTGPT2_AVX512
// The buckets of 16 tokens from their gaps, as store_buckets8 computes them, in 32-bit lanes.
inline __m512i bucket16(__m512 gap, __m512 scale, __m512i tiny_lanes) {
  return _mm512_min_epu32(_mm512_cvttps_epi32(_mm512_mul_ps(gap, scale)), tiny_lanes);
}

// Stores 32 buckets (two vectors of bucket16): one pack to 16 bits and one 64-bit lane permutation put them back in
// token order (cheaper than two narrowing stores).
inline void store_buckets32(uint16_t* dst, __m512i b0, __m512i b1) {
  const __m512i packed = _mm512_packus_epi32(b0, b1);  // per 128-bit lane: 4 of b0, then 4 of b1
  _mm512_storeu_si512(dst, _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 2, 4, 6, 1, 3, 5, 7), packed));
}

inline __m512i tiny_lanes16() {
  return _mm512_add_epi32(_mm512_set1_epi32(BUCKET_TINY),
                          _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7));
}
#endif

}  // namespace sampling_detail
}  // namespace fastgpt2
