// The CPU step's one linear-layer kernel, for every token count: Y = X W^T + b with W pre-packed at load time into
// panels of 16 output rows stored k-major ((K, 16) each, zero-padded past the last row), float32 or bf16.
//
// Batch invariance is its contract: every output element is
//     y[t, r] = epilogue(bias[r] + c),   c = fma(x[t, K-1], w[r, K-1], ... fma(x[t, 1], w[r, 1], x[t, 0] * w[r, 0]))
// one float32 FMA chain over k in order, whatever the number of tokens, their tiling, the thread count or the task
// split: the microkernels differ only in how many (token, panel) chains they keep in registers at once. So a token's
// outputs are bitwise the same alone, in a batch of 64, or in a prefill chunk of 512 (the AVX2 and AVX-512 kernels
// run the same chains, so their linear outputs agree bitwise too; only the GELU epilogue's vector width differs).
//
// Small token counts stream the panels at close to the memory bandwidth (up to 8 panels' chains in flight per token);
// larger ones run 12-token x 2-panel (AVX-512) or 6 x 1 (AVX2) register tiles over X packed per tile.
#pragma once

#include <cstdint>
#include <memory>

#include "linear.h"  // Epilogue
#include "simd.h"    // bf16

namespace fastgpt2 {

class ThreadPool;

constexpr int64_t kPanelRows = 16;

template <typename W>
struct PackedMatrix {
  int64_t rows = 0, cols = 0;  // N outputs, K inputs (a multiple of 8)
  std::shared_ptr<W> data;     // num_panels() panels of cols * 16 values, 64-byte aligned
  int64_t num_panels() const { return (rows + kPanelRows - 1) / kPanelRows; }
  const W* panel(int64_t p) const { return data.get() + p * cols * kPanelRows; }
};

// W (rows, cols) float32 in nn.Linear layout, packed (bf16: rounded to nearest even, as torch).
template <typename W>
PackedMatrix<W> pack_matrix(const float* w, int64_t rows, int64_t cols);

// y (T, rows) with row stride ldy from x (T, cols) with row stride ldx, over the pool's threads. bias may be null.
template <typename W>
void packed_linear(ThreadPool& pool, const PackedMatrix<W>& w, const float* bias, const float* x, int64_t ldx,
                   float* y, int64_t ldy, int64_t num_tokens, Epilogue epilogue);

// The same on the calling thread only (tests, benchmarks).
template <typename W>
void packed_linear_serial(const PackedMatrix<W>& w, const float* bias, const float* x, int64_t ldx, float* y,
                          int64_t ldy, int64_t num_tokens, Epilogue epilogue);

// The ISA the kernels were compiled for: "avx512", "avx2" or "portable".
const char* packed_gemm_isa();

// Measured float32 FMA peak of one core for this build's vector width (GFLOP/s): independent FMA chains in registers
// for about `seconds`.
double fma_peak_gflops(double seconds);

}  // namespace fastgpt2
