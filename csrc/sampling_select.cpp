// See sampling_select.h.
#include "sampling_select.h"

#include <algorithm>
#include <array>
#include <cmath>

namespace fastgpt2 {
namespace sampling_detail {

Hit resolve(const std::vector<RankedToken>& tokens, Walk before, int64_t need_count, double need_mass, size_t depth,
            Workspace& ws) {
  auto reached = [&](const Walk& w) { return need_count > 0 ? w.count >= need_count : w.mass >= need_mass; };
  auto walk = [&](const std::vector<RankedToken>& ordered) -> Hit {
    for (const RankedToken& t : ordered) {
      before.count += 1;
      before.mass += t.e;
      if (reached(before)) return {true, t, before};
    }
    return {false, {}, before};
  };
  uint64_t key_min = ~uint64_t{0}, key_max = 0;
  for (const RankedToken& t : tokens) {
    key_min = std::min(key_min, bits_of(t.e));
    key_max = std::max(key_max, bits_of(t.e));
  }
  if (tokens.size() <= RADIX_SMALL || key_min == key_max) {  // all tied: id order is rank order
    if (key_min == key_max) return walk(tokens);
    ws.sorted.assign(tokens.begin(), tokens.end());
    std::sort(ws.sorted.begin(), ws.sorted.end(), ranks_before);
    return walk(ws.sorted);
  }
  int shift = 0;
  while (((key_max - key_min) >> shift) >= RADIX_BUCKETS) ++shift;
  std::array<int64_t, RADIX_BUCKETS> count{};
  std::array<double, RADIX_BUCKETS> mass{};
  for (const RankedToken& t : tokens) {
    const size_t b = (key_max - bits_of(t.e)) >> shift;
    count[b] += 1;
    mass[b] += t.e;
  }
  for (int b = 0; b < RADIX_BUCKETS; ++b) {
    const Walk next{before.count + count[b], before.mass + mass[b]};
    if (count[b] == 0 || !reached(next)) {
      before = next;
      continue;
    }
    std::vector<RankedToken>& sub = ws.levels[depth];
    sub.clear();
    for (const RankedToken& t : tokens) {
      if (static_cast<int>((key_max - bits_of(t.e)) >> shift) == b) sub.push_back(t);
    }
    const Hit hit = resolve(sub, before, need_count, need_mass, depth + 1, ws);
    if (hit.found) return hit;
    before = hit.incl;  // rounding left the bucket short of the target: go on with the next one
  }
  return {false, {}, before};
}

Bracket bracket_mass(const int32_t* count, double target, double inv_scale, double slack, int* crossing) {
  const double ratio = std::exp(-inv_scale), half_ratio = std::exp(-0.5 * inv_scale);
  const double hi = 1.0 + slack, lo = ratio * (1.0 - slack);
  // Bounds on the mass of buckets < b. The max itself has e = 1 exactly (bucket 0): the lower bound counts it so,
  // which lets it reach targets close to the total on peaked rows (else it loses a bucket's width of the max's e).
  double upper = 0.0, lower = 1.0 - lo;
  // The estimate: each token at its bucket's middle e, the max at e = 1 (at the top of bucket 0).
  double middle = 1.0 - half_ratio;
  bool bracketed = false, crossed = crossing == nullptr;
  Bracket bracket{0, BUCKET_TINY, hi, 0.0};
  // The linear buckets four at a time: e_top = exp(-b / scale) of a step's buckets is its first bucket's times 1, r,
  // r^2, r^3 (r = ratio), the next step's first r^4 times this one's, and each of the three sums adds a step's four
  // terms as a tree; so no chain runs through every bucket (one did, ~7 cycles per bucket: 1.25 us per row of N(0, 3)
  // logits at top-p 0.9). e_top's relative error stays within the slack's 1e-12 for the recurrence (at most ~5
  // roundings per step, 512 steps). The bracket is a bound either way; the callers check what they decide with it.
  const double pw[4] = {1.0, ratio, ratio * ratio, ratio * ratio * ratio};
  const double ratio4 = pw[2] * pw[2];
  double pu[4], pl[4], pm[4];  // a bucket's upper, lower and middle e over its step's first e_top
  for (int k = 0; k < 4; ++k) pu[k] = pw[k] * hi, pl[k] = pw[k] * lo, pm[k] = pw[k] * half_ratio;
  double e_top = 1.0;
  int b = 0;
  for (; b + 4 <= BUCKET_TINY && !(bracketed && crossed); b += 4, e_top *= ratio4) {
    double u[4], l[4], m[4];
    for (int k = 0; k < 4; ++k) {
      const double ce = count[b + k] * e_top;
      u[k] = ce * pu[k], l[k] = ce * pl[k], m[k] = ce * pm[k];
    }
    // Inclusive prefix sums of the step's terms (monotone: each is a rounded sum of more non-negative terms).
    const double u01 = u[0] + u[1], l01 = l[0] + l[1], m01 = m[0] + m[1];
    const double U[4] = {u[0], u01, u01 + u[2], u01 + (u[2] + u[3])};
    const double L[4] = {l[0], l01, l01 + l[2], l01 + (l[2] + l[3])};
    const double M[4] = {m[0], m01, m01 + m[2], m01 + (m[2] + m[3])};
    if (!bracketed) {
      if (upper + U[3] < target && lower + L[3] < target) {  // every bucket of the step below the target
        bracket = {b + 3, BUCKET_TINY, e_top * pu[3], 0.0};
      } else {
        for (int k = 0; k < 4; ++k) {
          if (upper + (k ? U[k - 1] : 0.0) < target) bracket = {b + k, BUCKET_TINY, e_top * pu[k], 0.0};
          if (lower + L[k] >= target) {
            bracket.last = b + k;
            bracket.e_below = e_top * pl[k] * (1.0 - slack);
            bracketed = true;
            break;
          }
        }
      }
      upper += U[3], lower += L[3];
    }
    if (!crossed && middle + M[3] >= target) {
      for (int k = 0; k < 4; ++k) {
        if (middle + M[k] >= target) {
          *crossing = b + k, crossed = true;
          break;
        }
      }
    }
    middle += M[3];
  }
  // The last linear buckets and the tiny one, one at a time.
  for (; b <= BUCKET_TINY && !(bracketed && crossed); ++b, e_top *= ratio) {
    if (!bracketed) {
      const double e_hi = e_top * hi;
      const double e_lo = b == BUCKET_TINY ? 0.0 : e_top * lo;
      if (upper < target) bracket = {b, BUCKET_TINY, e_hi, 0.0};
      upper += count[b] * e_hi;
      lower += count[b] * e_lo;
      if (lower >= target) {
        bracket.last = b;
        bracket.e_below = e_lo * (1.0 - slack);
        bracketed = true;
      }
    }
    if (!crossed && b < BUCKET_TINY) {
      middle += count[b] * (e_top * half_ratio);
      if (middle >= target) *crossing = b, crossed = true;
    }
  }
  if (!crossed) *crossing = BUCKET_TINY;
  return bracket;
}

}  // namespace sampling_detail
}  // namespace fastgpt2
