// The vectorised passes of the CPU sampler over one row (AVX-512 or AVX2 + FMA when built with them, else the same
// arithmetic in scalar code): the max, e = exp(x - max) with its bucket histogram, and the masked collections and
// sums over e. The fast top-p path's passes are in sampling_fast.h.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
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

// The histogram's scale over max - x in [0, range] (range = max - min_finite, at most RANGE_MAX). The bucket index is
// computed in float32 (bucket_of): its two roundings move a token's e by at most a relative 2 * 2^-24 * (2047 /
// scale) off its bucket's bounds, which the slack covers with the rounding of the exp and of the bound recurrence
// (< 3e-13). scale is 0 (inv_scale +inf) when every finite logit is the same.
struct BucketScale {
  float scale;
  double inv_scale, slack;
};

inline BucketScale bucket_scale_of(const RowScan& scan) {
  const double range = std::min(static_cast<double>(scan.max) - scan.min_finite, RANGE_MAX);
  const float scale = range >= 1e-30 ? static_cast<float>(NUM_LINEAR_BUCKETS / range) : 0.0f;
  const double inv_scale = scale > 0.0f ? 1.0 / scale : std::numeric_limits<double>::infinity();
  const double slack = 1e-12 + (scale > 0.0f ? 2.5 * 0x1p-24 * (NUM_LINEAR_BUCKETS + 1) * inv_scale : 0.0);
  return {scale, inv_scale, slack};
}

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
