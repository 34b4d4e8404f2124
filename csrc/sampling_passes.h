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

// Tokens with bucket <= last (BUCKET_TINY_LAST takes in the tiny bucket's copies), appended to `out` in id order
// (the top-k candidates, or a peaked row's top-p list). read padded V uint16.
void bucket_prefix_pass(const Workspace& ws, int64_t padded, int last, std::vector<RankedToken>& out);

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
