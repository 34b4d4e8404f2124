// Rank-order selection of the CPU sampler: the exact top-k / top-p boundary on a list of collected tokens (a radix
// select on the bits of e), and the bucket range that bounds on the histogram's mass prove must hold the boundary.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "sampling_math.h"

namespace fastgpt2 {
namespace sampling_detail {

// Where a rank-order walk stands: tokens and mass ranked before (or, in Hit::incl, up to and including) a token.
struct Walk {
  int64_t count;
  double mass;
};

struct Hit {
  bool found;
  RankedToken token;
  Walk incl;
};

// Walks `tokens` (id order, e > 0) in rank order starting after `before` and returns the first token at which the
// walk holds need_count tokens (need_count > 0) or at least need_mass mass. An MSB-first radix select on the bits of
// e (monotone for e >= 0): each level histograms (count, mass) over 256 buckets of the remaining key range and
// descends into the one bucket where the criterion is met; short or all-tied lists are walked directly.
Hit resolve(const std::vector<RankedToken>& tokens, Walk before, int64_t need_count, double need_mass, size_t depth,
            Workspace& ws);

// Bucket range [first, last] that must contain the top-p boundary, from rigorous bounds on each bucket's mass:
// a token of linear bucket b has e in [exp(-(b+1)/scale), exp(-b/scale)] up to rounding (relative slack).
struct Bracket {
  int first, last;
  double e_above;  // upper bound of e in bucket `first`: tokens above it are all in buckets < first
  double e_below;  // below the lower bound of e in bucket `last`: tokens at or below it are in buckets > last
};

// The bracket of the top-p boundary: target is top_p * (sum of e); count is the bucket histogram; inv_scale the
// width of a linear bucket in x; slack the relative rounding allowed on each bound. With `crossing`, also the bucket
// where the mass of the linear buckets, each token counted at its bucket's middle e (the max at e = 1), first reaches
// target (BUCKET_TINY if it never does): an estimate, not a bound, which the fast path centres a narrower window on
// (and where the lower bounds, every token at its bucket's bottom, never reach a target close to the total), and
// whose outcome it checks.
Bracket bracket_mass(const int32_t* count, double target, double inv_scale, double slack, int* crossing = nullptr);

}  // namespace sampling_detail
}  // namespace fastgpt2
