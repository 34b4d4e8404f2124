// See gemm.h. Tiles: 6 tokens x 16 outputs in the microkernel (6 x 2 ymm accumulators); the token tail runs 4-, 2- and
// 1-token versions of the same kernel; a panel past the last row (N not a multiple of 16) is zero-padded and only its
// real columns are stored.
#include "gemm.h"

#include <algorithm>

#include "simd.h"

namespace fastgpt2 {
namespace {

constexpr int kTileTokens[4] = {6, 4, 2, 1};

// Tiles of pack_x's layout, (first token, tokens) in order: 6-token tiles, then at most one each of 4, 2 and 1.
template <typename F>
void for_each_tile(int64_t num_tokens, F&& f) {
  int64_t t = 0;
  for (int mr : kTileTokens)
    for (; t + mr <= num_tokens; t += mr) f(t, mr);
}

}  // namespace

void pack_x(const float* x, int64_t ldx, int64_t num_tokens, int64_t K, std::vector<float>& out) {
  out.resize(static_cast<size_t>(num_tokens * K));
  float* p = out.data();
  for_each_tile(num_tokens, [&](int64_t t, int mr) {
    for (int64_t k = 0; k < K; ++k)
      for (int i = 0; i < mr; ++i) p[k * mr + i] = x[(t + i) * ldx + k];
    p += K * mr;
  });
}

#ifdef FASTGPT2_AVX2
namespace {

// panel[k * 16 + j] = W[row + j, k] for j < rows (0 for j >= rows): 8 x 8 blocks transposed in registers.
template <typename W>
void pack_panel(const W* weight, int64_t K, int64_t row, int64_t rows, float* panel) {
  for (int64_t half = 0; half < kGemmPanel; half += 8) {
    for (int64_t k = 0; k < K; k += 8) {
      __m256 r[8];
      for (int j = 0; j < 8; ++j)
        r[j] = half + j < rows ? load8(weight + (row + half + j) * K + k) : _mm256_setzero_ps();
      const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
      const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
      const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
      const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
      const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
      const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
      const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
      const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
      float* out = panel + k * kGemmPanel + half;  // row k of the panel, columns half..half+7
      _mm256_storeu_ps(out + 0 * kGemmPanel, _mm256_permute2f128_ps(s0, s4, 0x20));
      _mm256_storeu_ps(out + 1 * kGemmPanel, _mm256_permute2f128_ps(s1, s5, 0x20));
      _mm256_storeu_ps(out + 2 * kGemmPanel, _mm256_permute2f128_ps(s2, s6, 0x20));
      _mm256_storeu_ps(out + 3 * kGemmPanel, _mm256_permute2f128_ps(s3, s7, 0x20));
      _mm256_storeu_ps(out + 4 * kGemmPanel, _mm256_permute2f128_ps(s0, s4, 0x31));
      _mm256_storeu_ps(out + 5 * kGemmPanel, _mm256_permute2f128_ps(s1, s5, 0x31));
      _mm256_storeu_ps(out + 6 * kGemmPanel, _mm256_permute2f128_ps(s2, s6, 0x31));
      _mm256_storeu_ps(out + 7 * kGemmPanel, _mm256_permute2f128_ps(s3, s7, 0x31));
    }
  }
}

// acc[i] = sum_k xp[k * MR + i] * panel[k, 0:16] for the MR tokens of one tile (acc: MR x 16 floats).
template <int MR>
inline void microkernel(const float* panel, const float* xp, int64_t K, float* acc) {
  __m256 c[MR][2];
  for (int i = 0; i < MR; ++i) c[i][0] = c[i][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m256 b0 = in_register(_mm256_loadu_ps(panel + k * kGemmPanel));
    const __m256 b1 = in_register(_mm256_loadu_ps(panel + k * kGemmPanel + 8));
    for (int i = 0; i < MR; ++i) {
      const __m256 a = _mm256_broadcast_ss(xp + k * MR + i);
      c[i][0] = _mm256_fmadd_ps(a, b0, c[i][0]);
      c[i][1] = _mm256_fmadd_ps(a, b1, c[i][1]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    _mm256_storeu_ps(acc + i * kGemmPanel, c[i][0]);
    _mm256_storeu_ps(acc + i * kGemmPanel + 8, c[i][1]);
  }
}

// y[t + i, row + j] (j < cols) from acc, bias and the epilogue.
inline void store_tile(const float* acc, int mr, const float* bias, int64_t row, int64_t cols, float* y, int64_t ldy,
                       int64_t t, Epilogue epilogue) {
  for (int i = 0; i < mr; ++i) {
    float* out = y + (t + i) * ldy + row;
    const float* a = acc + i * kGemmPanel;
    if (cols == kGemmPanel) {
      for (int h = 0; h < 2; ++h) {
        __m256 v = _mm256_loadu_ps(a + 8 * h);
        if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + row + 8 * h));
        if (epilogue == Epilogue::kAccumulate) v = _mm256_add_ps(v, _mm256_loadu_ps(out + 8 * h));
        if (epilogue == Epilogue::kGelu) v = gelu256(v);
        _mm256_storeu_ps(out + 8 * h, v);
      }
      continue;
    }
    for (int64_t j = 0; j < cols; ++j) {
      float v = a[j] + (bias ? bias[row + j] : 0.0f);
      if (epilogue == Epilogue::kAccumulate) v += out[j];
      if (epilogue == Epilogue::kGelu) v = gelu_scalar(v);
      out[j] = v;
    }
  }
}

}  // namespace

template <typename W>
void gemm_rows(const W* weight, const float* bias, const float* xp, float* y, int64_t ldy, int64_t num_tokens,
               int64_t K, int64_t row_begin, int64_t row_end, Epilogue epilogue) {
  thread_local std::vector<float> panel;
  panel.resize(static_cast<size_t>(K * kGemmPanel));
  alignas(32) float acc[6 * kGemmPanel];
  for (int64_t row = row_begin; row < row_end; row += kGemmPanel) {
    const int64_t cols = std::min(kGemmPanel, row_end - row);
    pack_panel(weight, K, row, cols, panel.data());
    const float* tile_x = xp;
    for_each_tile(num_tokens, [&](int64_t t, int mr) {
      switch (mr) {
        case 6: microkernel<6>(panel.data(), tile_x, K, acc); break;
        case 4: microkernel<4>(panel.data(), tile_x, K, acc); break;
        case 2: microkernel<2>(panel.data(), tile_x, K, acc); break;
        default: microkernel<1>(panel.data(), tile_x, K, acc); break;
      }
      store_tile(acc, mr, bias, row, cols, y, ldy, t, epilogue);
      tile_x += K * mr;
    });
  }
}
#else
template <typename W>
void gemm_rows(const W*, const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t, int64_t, Epilogue) {}
#endif

template void gemm_rows<float>(const float*, const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t,
                               int64_t, Epilogue);
template void gemm_rows<bf16>(const bf16*, const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t,
                              int64_t, Epilogue);

}  // namespace fastgpt2
