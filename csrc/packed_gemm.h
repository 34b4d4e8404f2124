// The CPU step's one linear-layer kernel, for every token count: Y = X W^T + b with W pre-packed at load time into
// panels of 16 output rows stored k-major ((K, 16) each, zero-padded past the last row), float32 or bf16 (float32
// arithmetic), or int8 (below).
//
// Batch invariance is its contract: every output element is
//     y[t, r] = epilogue(bias[r] + c),   c = fma(x[t, K-1], w[r, K-1], ... fma(x[t, 1], w[r, 1], x[t, 0] * w[r, 0]))
// one float32 FMA chain over k in order, whatever the number of tokens, their tiling, the thread count or the task
// split: the microkernels differ only in how many (token, panel) chains they keep in registers at once. So a token's
// outputs are bitwise the same alone, in a batch of 64, or in a prefill chunk of 512 (the AVX2 and AVX-512 kernels
// run the same chains, so their linear outputs agree bitwise too; only the GELU epilogue's vector width differs).
//
// Small token counts stream the panels at close to the memory bandwidth (up to 8 panels' chains in flight per token);
// larger ones run 8-token x 3-panel (AVX-512) or 6 x 1 (AVX2) register tiles over X packed per tile.
//
// int8 (q8) weights, packed_gemm_q8.cpp: W8A8 as llama.cpp's q8_0 matrix-vector products compute it. Each weight
// row and each token's activations are quantised in blocks of 32 consecutive k (quantize_q8_block: float32 scales,
// q in [-127, 127]); per block the integer dot product of the two q's is exact (VNNI's vpdpbusd, or
// vpmaddwd without VNNI: the same value), and
//     y[t, r] = epilogue(bias[r] + c),   c = fma(dw[r, b] * dx[t, b], dot_b, c) over the blocks b in order
// one float32 chain per output whatever the tiling, batch or thread count, and bitwise the same on every ISA variant.
// A token's activation scales depend on that token's row alone, so batch invariance holds as for float32.
#pragma once

#include <cstdint>
#include <memory>

#include "linear.h"  // Epilogue
#include "simd.h"    // bf16

namespace fastgpt2 {

class ThreadPool;

constexpr int64_t kPanelRows = 16;

// An int8 weight as PackedMatrix<q8> stores it: q + 128 in an unsigned byte (q in [-127, 127]), each panel in groups
// of 4 consecutive k ((K / 4, 16, 4) bytes: one 64-byte vector per group, a row's 4 weights together, as vpdpbusd
// reads them); 32 consecutive k of one row share a float32 scale (llama.cpp's q8_0 stores the same q with a float16
// scale).
struct q8 {
  uint8_t v;
};
constexpr int64_t kQ8Block = 32;

template <typename W>
struct PackedMatrix {
  int64_t rows = 0, cols = 0;    // N outputs, K inputs (a multiple of 8; of 32 for q8)
  std::shared_ptr<W> data;       // num_panels() panels of cols * 16 values, 64-byte aligned
  std::shared_ptr<float> scales;  // q8 only: num_panels() panels of (cols / 32, 16) float32 scales, k-block-major
  int64_t num_panels() const { return (rows + kPanelRows - 1) / kPanelRows; }
  const W* panel(int64_t p) const { return data.get() + p * cols * kPanelRows; }
  const float* panel_scales(int64_t p) const { return scales.get() + p * (cols / kQ8Block) * kPanelRows; }
};

// W (rows, cols) float32 in nn.Linear layout, packed (bf16: rounded to nearest even, as torch; q8: quantize_q8_block
// per row and block of 32 k, std::invalid_argument unless cols % 32 == 0).
template <typename W>
PackedMatrix<W> pack_matrix(const float* w, int64_t rows, int64_t cols);
template <>
PackedMatrix<q8> pack_matrix<q8>(const float* w, int64_t rows, int64_t cols);

// llama.cpp's q8_0 quantiser (quantize_row_q8_0_ref) on 32 weights with a float32 scale: d = absmax / 127,
// q[i] = roundf(w[i] * (1 / d)) (ties away from zero), all zero when d == 0. Returns d; w[i] ~ float(q[i]) * d. A
// block holding NaN or inf gets d = NaN (q all zero), so that what it multiplies becomes NaN as in float32.
float quantize_q8_block(const float* w, int8_t* q);

// out (rows, cols) = the weights a PackedMatrix<q8> computes with: float(q) * d per block (cols % 32 == 0).
void dequantize_q8(const float* w, int64_t rows, int64_t cols, float* out);

// The QKV projection's K and V columns written straight into the KV pool (kStore only): token t's output columns
// [C, 2C) go to k + slots[t] * C and [2C, 3C) to v + slots[t] * C (C = channels, a multiple of kPanelRows; the matrix
// has 3C rows), y receiving columns [0, C) only. The values are kStore's bit for bit; only their addresses change.
struct KVDestination {
  float* k;
  float* v;
  const int64_t* slots;
  int64_t channels;
};

// y (T, rows) with row stride ldy from x (T, cols) with row stride ldx, over the pool's threads. bias may be null.
// kv: see KVDestination (std::invalid_argument unless it fits the matrix and the epilogue is kStore).
template <typename W>
void packed_linear(ThreadPool& pool, const PackedMatrix<W>& w, const float* bias, const float* x, int64_t ldx,
                   float* y, int64_t ldy, int64_t num_tokens, Epilogue epilogue, const KVDestination* kv = nullptr);

// The same on the calling thread only (tests, benchmarks).
template <typename W>
void packed_linear_serial(const PackedMatrix<W>& w, const float* bias, const float* x, int64_t ldx, float* y,
                          int64_t ldy, int64_t num_tokens, Epilogue epilogue);

// Greedy decoding's pick without the logits: index[t] = the column c < limit (limit <= w.rows) of the largest
// y[t, c] = b[c] + (W x_t)[c] (the values packed_linear's kStore would store, bitwise), the first of equal ones, or
// the first NaN's column when there is one (torch.argmax's choice), for num_tokens tokens on the pool's threads.
template <typename W>
void packed_argmax(ThreadPool& pool, const PackedMatrix<W>& w, const float* bias, const float* x, int64_t ldx,
                   int64_t num_tokens, int64_t limit, int64_t* index);

// The int8 kernels (packed_gemm_q8.cpp).
template <>
void packed_linear<q8>(ThreadPool& pool, const PackedMatrix<q8>& w, const float* bias, const float* x, int64_t ldx,
                       float* y, int64_t ldy, int64_t num_tokens, Epilogue epilogue, const KVDestination* kv);
template <>
void packed_linear_serial<q8>(const PackedMatrix<q8>& w, const float* bias, const float* x, int64_t ldx, float* y,
                              int64_t ldy, int64_t num_tokens, Epilogue epilogue);
template <>
void packed_argmax<q8>(ThreadPool& pool, const PackedMatrix<q8>& w, const float* bias, const float* x, int64_t ldx,
                       int64_t num_tokens, int64_t limit, int64_t* index);

// The ISA the kernels were compiled for: "avx512", "avx2" or "portable"; and the int8 kernels' ("avx512_vnni" with
// VNNI dot products, else as packed_gemm_isa()).
const char* packed_gemm_q8_isa();
const char* packed_gemm_isa();

// Measured float32 FMA peak of one core for this build's vector width (GFLOP/s): independent FMA chains in registers
// for about `seconds`.
double fma_peak_gflops(double seconds);

}  // namespace fastgpt2
