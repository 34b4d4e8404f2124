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
  double e_top = 1.0;  // exp(-b / scale)
  // Bounds on the mass of buckets < b. The max itself has e = 1 exactly (bucket 0): the lower bound counts it so,
  // which lets it reach targets close to the total on peaked rows (else it loses a bucket's width of the max's e).
  double upper = 0.0, lower = 1.0 - ratio * (1.0 - slack);
  // The estimate: each token at its bucket's middle e, the max at e = 1 (at the top of bucket 0).
  double middle = 1.0 - half_ratio;
  bool bracketed = false, crossed = crossing == nullptr;
  Bracket bracket{0, BUCKET_TINY, 1.0 + slack, 0.0};
  for (int b = 0; b <= BUCKET_TINY; ++b) {
    if (!bracketed) {
      const double e_hi = e_top * (1.0 + slack);
      const double e_lo = b == BUCKET_TINY ? 0.0 : e_top * ratio * (1.0 - slack);
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
    if (bracketed && crossed) break;
    e_top *= ratio;
  }
  if (!crossed) *crossing = BUCKET_TINY;
  return bracket;
}

}  // namespace sampling_detail
}  // namespace fastgpt2
