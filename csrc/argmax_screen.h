// Greedy decoding's pick over the tied LM head without every logit in float32: an int8 screen, then float32 for the
// rows it cannot rule out (argmax_screen.cpp).
//
// The LM head of GPT-2 124M is 154 MB of float32 weights, a third of what a batch-1 decode step reads and of a
// 64-sequence step's multiply-adds, all spent on one index per sequence. The screen computes every row's
// z_r ~ (W x)_r with the int8 GEMM (q8 blocks of W and of x, packed_gemm.h: a quarter of the bytes and, with VNNI,
// about 2.4x the multiply-adds per second), bounds |y_r - z_r| <= E for y_r the value the float32 GEMM would compute,
// and computes in float32 only the rows with z_r + E >= max_s z_s - E: the largest y_r is among them. Each of those
// rows is evaluated by the GEMM's own chain (c = fma(x_k, w_k, c) over k in order, from zero, packed_gemm.h), from the
// row-major copy of W the embedding lookup reads, so the pick is bitwise packed_argmax's, ties and all.
//
// The bound (Cauchy-Schwarz on each difference; u = 2^-24, gamma_n = n u / (1 - n u), K inputs in nb blocks of 32;
// w-hat and x-hat the q8 values, so that the int8 GEMM's exact sum is w-hat . x-hat):
//   |y_r - w.x|         <= gamma_K ||w_r|| ||x||                  (the float32 FMA chain)
//   |w.x - w^.x^|       <= ||w_r - w^_r|| ||x|| + ||w^_r|| ||x - x^||
//   |z_r - w^.x^|       <= gamma_(nb+2) ||w^_r|| ||x^||            (the int8 GEMM: a scale product and an FMA per block)
// each row norm replaced by its largest value over the rows, so that one E serves a token's whole row (a row's own
// norms would cut the rows kept from ~30 to ~20 of 50257 at the cost of three more reads per row), times 1.001 for the
// float64 arithmetic that evaluates it. A token with a non-finite activation, an E too wide to rule out most rows, or
// a float32 value that is not finite, takes packed_argmax instead; so does a matrix with a non-finite weight (no screen).
#pragma once

#include <cstdint>
#include <memory>

#include "packed_gemm.h"

namespace fastgpt2 {

class ThreadPool;

struct ArgmaxScreen {
  PackedMatrix<q8> q;  // the matrix in int8 (pack_matrix<q8>)
  // Over the rows: the largest ||w_r||, ||w_r - w^_r|| and ||w^_r|| (float64).
  double w_norm = 0.0, delta_norm = 0.0, q_norm = 0.0;
};

// The screen of a (num_rows, cols) matrix given row-major (float32, or bf16: the values a bf16 PackedMatrix holds);
// nullptr when cols is not a multiple of 32 or a weight is not finite.
template <typename Row>
std::shared_ptr<const ArgmaxScreen> build_argmax_screen(const Row* rows, int64_t num_rows, int64_t cols);

// packed_argmax(pool, w, nullptr, x, ldx, num_tokens, limit, index), bitwise, through the screen; rows: the row-major
// values w was packed from.
template <typename W, typename Row>
void screened_argmax(ThreadPool& pool, const ArgmaxScreen& screen, const PackedMatrix<W>& w, const Row* rows,
                     const float* x, int64_t ldx, int64_t num_tokens, int64_t limit, int64_t* index);

}  // namespace fastgpt2
