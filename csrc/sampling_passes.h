// The vectorised passes of the CPU sampler over one row (AVX2 + FMA when built with them, else the same arithmetic in
// scalar code): the max, e = exp(x - max) with its bucket histogram, and the masked collections and sums over e.
#pragma once

#include <cstdint>
#include <vector>

#include "sampling_math.h"

namespace fastgpt2 {
namespace sampling_detail {

struct RowScan {
  float max;
  float min_finite;
  bool has_nan;
  bool has_neg_inf;
};

// The max, the smallest finite value and whether a NaN or a -inf is present. read V floats.
RowScan scan_row(const float* x, int64_t vocab_size);

struct ExpSums {
  double total;  // sum of e
  int64_t num_zero;  // tokens with e == 0
};

// e = exp(x - max), its sum and its zeros; with HIST also each token's bucket (bucket_of with bucket_scale) and the
// tokens per bucket (the tiny bucket's lanes folded into count[BUCKET_TINY]). read V floats; write V doubles
// (+ V uint16 and the count histogram). next_row (or nullptr) is prefetched. Instantiated for HIST = false and true.
template <bool HIST>
ExpSums exp_pass(const float* x, int64_t vocab_size, const RowScan& scan, float bucket_scale, const float* next_row,
                 Workspace& ws);

// The fast top-p path's pass: e32 = exp32_of_gap(max - x) into ws.e32 and each token's bucket and the count
// histogram as exp_pass<true> stores them. Returns the sum of e32 in float64. read V floats; write V floats
// + V uint16 and the count histogram.
double fast_exp_pass(const float* x, int64_t vocab_size, const RowScan& scan, float bucket_scale, const float* next_row,
                     Workspace& ws);

constexpr double FAST_BLOCK_SUM_ERROR = 6.1e-8;  // one float32 rounding (2^-24), with a margin

struct FastWindow {
  double above;  // sum of e32 over buckets < first
  double window_e32;  // sum of e32 over the window's tokens
};

// The fast path's top-p pass: per block, the e32 mass of the tokens in buckets < first into block_mass (pairs added
// in float32, then summed in float64: relative error < FAST_BLOCK_SUM_ERROR); the tokens in buckets [first, last]
// appended to `window` (id order) with their exact e (exp_nonpositive of x - max). bucket_scale is fast_exp_pass's.
// read padded V floats (e32) + V floats (x) + padded V uint16.
FastWindow fast_window_pass(const Workspace& ws, const float* x, float max, float bucket_scale, int64_t vocab_size,
                            int first, int last, std::vector<RankedToken>& window, double* block_mass);

// The e32 mass of the tokens in buckets > last (the padding's e32 is 0), summed in float32 pairs then float64
// (relative error < FAST_BLOCK_SUM_ERROR). read padded V floats + padded V uint16.
double fast_mass_below(const Workspace& ws, int64_t padded, int last);

// Tokens with first <= bucket <= last (BUCKET_TINY_LAST takes in the tiny bucket's copies), appended to `out` in id
// order with their e (or 0 without with_e): the top-k candidates, a peaked row's top-p list, the fast path's window.
// read padded V uint16.
void bucket_range_pass(const Workspace& ws, int64_t padded, int first, int last, std::vector<RankedToken>& out,
                       bool with_e);

// The top-p pass: returns the mass of the tokens with e > e_above and writes it per block into block_mass; appends
// the tokens with e_below < e <= e_above to `window` in id order. Window tokens are looked for only in buckets
// [first, last], which must hold all of them, so that most of the pass is a masked sum.
// read padded V doubles + padded V uint16.
double window_pass(const Workspace& ws, int64_t padded, double e_above, double e_below, int first, int last,
                   std::vector<RankedToken>& window, double* block_mass);

// Per block, the mass of the tokens kept by `cut`. read padded V doubles.
void block_sums(const Workspace& ws, int64_t padded, const Cut& cut, double* block_mass);

}  // namespace sampling_detail
}  // namespace fastgpt2
