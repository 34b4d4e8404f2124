// Top-k / top-p / min-p truncation and sampling on CPU; see sampling.h for the semantics and the method. Per row: plan
// the kept set (the passes of sampling_passes.cpp, the selection of sampling_select.cpp), then draw or collect it.
#include "sampling.h"

#include <algorithm>
#include <limits>

#include "sampling_math.h"
#include "sampling_fast.h"
#include "sampling_passes.h"
#include "sampling_rows.h"
#include "sampling_select.h"

namespace fastgpt2 {
namespace sampling_detail {
namespace {

// How the draw (or the candidate list) finds the kept tokens once the cut is known.
enum class KeptSource {
  kScan,  // scan the row with the cut
  kBlocks,  // ws.block_mass already holds each block's kept mass
  kList,  // the kept tokens are the entries of ws.kept that the cut keeps (id order)
};

struct RowPlan {
  Cut cut;  // kept set, min-p included
  KeptSource source;
};

// Steps 1-6 of sampling.h for one row whose scan has status kOk: fills ws.e and returns how to find the kept set.
void plan_row(const float* x, int64_t vocab_size, const RowScan& scan, int64_t top_k, double top_p, double min_p,
              const float* next_row, Workspace& ws, RowPlan* plan) {
  const int64_t padded = (vocab_size + BLOCK - 1) / BLOCK * BLOCK;
  ws.reserve(padded);
  const Cut min_p_only = with_min_p(KEEP_ALL_POSITIVE, min_p);
  const bool topk_requested = top_k > 0 && top_k < vocab_size;
  if (top_p >= 1.0 && !topk_requested) {  // min-p at most: a threshold, no histogram
    exp_pass<false>(x, vocab_size, scan, 0.0f, next_row, ws);
    *plan = {min_p_only, KeptSource::kScan};
    return;
  }

  // 1. e, its sum and the bucket histogram over max - x in [0, range].
  const auto [bucket_scale, inv_scale, slack] = bucket_scale_of(scan);
  const ExpSums sums = exp_pass<true>(x, vocab_size, scan, bucket_scale, next_row, ws);
  const int32_t* count = ws.count.data();
  const int64_t num_positive = vocab_size - sums.num_zero;

  // 2. top-k: counts are exact, so the k-th token's bucket is known; every token up to that bucket is collected and
  // the top-k set, its mass and the top-p cut inside it are resolved on that list.
  if (top_k > 0 && top_k < num_positive) {
    int last = 0;
    for (int64_t seen = count[0]; seen < top_k; seen += count[++last]) {
    }
    bucket_range_pass(ws, padded, last == BUCKET_TINY ? BUCKET_TINY_LAST : last, ws.list);
    const Hit kth = resolve(ws.list, {0, 0.0}, top_k, 0.0, 0, ws);
    Cut cut = kth.found ? Cut{kth.token.e, kth.token.id} : KEEP_ALL_POSITIVE;
    ws.kept.clear();
    for (const RankedToken& t : ws.list) {
      if (is_kept(t.e, t.id, cut)) ws.kept.push_back(t);
    }
    if (top_p < 1.0) {
      const Hit boundary = resolve(ws.kept, {0, 0.0}, 0, top_p * kth.incl.mass, 0, ws);
      if (boundary.found) cut = {boundary.token.e, boundary.token.id};
    }
    *plan = {with_min_p(cut, min_p), KeptSource::kList};
    return;
  }
  if (top_p >= 1.0) {
    *plan = {min_p_only, KeptSource::kScan};
    return;
  }

  // 3. top-p: the bounds bracket the boundary in a few buckets. When few tokens lie at or above them (a peaked row),
  // those are collected and the exact mass above the bracket, the boundary and the draw are all done on that list;
  // otherwise one pass sums the exact mass above the bracket (and each block's kept mass for the draw) and collects
  // the bracket's tokens, on which the boundary is resolved exactly.
  const double target = top_p * sums.total;
  const Bracket bracket = bracket_mass(count, target, inv_scale, slack);
  if (min_p > bracket.e_above) {  // min-p cuts above every token the top-p boundary could fall on
    *plan = {min_p_only, KeptSource::kScan};
    return;
  }
  // Tokens between e_below and e_above sit in buckets [first - 1, last + 1] (bounds overlap by the slack only), or
  // anywhere when the buckets are too narrow for that to hold.
  const bool narrow = inv_scale < 1e-10;
  const int first = narrow ? 0 : std::max(bracket.first - 1, 0);
  const int last = narrow || bracket.last + 1 >= BUCKET_TINY ? BUCKET_TINY_LAST : bracket.last + 1;
  // Collecting cost ~15 cycles per listed token on top of a 4 us pass over the buckets, the window pass ~11 us per row
  // of 50257: the list won below ~1000 tokens (measured then). Since bucket_range_pass gathers ids in scratch before
  // building the list (a push_back per token stalled on store forwarding), collecting 5000 tokens costs ~25 us less
  // (Intel Xeon): the threshold is likely low now.
  constexpr int64_t MAX_LISTED = 1024;
  int64_t num_listed = 0;  // tokens in buckets <= last
  for (int b = 0; b <= std::min(last, int{BUCKET_TINY}); ++b) num_listed += count[b];
  if (num_listed <= MAX_LISTED) {
    bucket_range_pass(ws, padded, last, ws.kept);
    double mass_above = 0.0;
    ws.list.clear();
    for (const RankedToken& t : ws.kept) {
      if (t.e > bracket.e_above) {
        mass_above += t.e;
      } else if (t.e > bracket.e_below) {
        ws.list.push_back(t);
      }
    }
    if (mass_above < target) {
      const Hit boundary = resolve(ws.list, {0, mass_above}, 0, target, 0, ws);
      if (boundary.found) {
        *plan = {with_min_p({boundary.token.e, boundary.token.id}, min_p), KeptSource::kList};
        return;
      }
    }
  } else {
    double* block_mass = ws.block_mass.data();
    const double mass_above =
        window_pass(ws, padded, bracket.e_above, bracket.e_below, first, last, ws.list, block_mass);
    if (mass_above < target) {
      const Hit boundary = resolve(ws.list, {0, mass_above}, 0, target, 0, ws);
      if (boundary.found) {
        const Cut cut = with_min_p({boundary.token.e, boundary.token.id}, min_p);
        for (const RankedToken& t : ws.list) {
          if (is_kept(t.e, t.id, cut)) block_mass[t.id / BLOCK] += t.e;
        }
        *plan = {cut, KeptSource::kBlocks};
        return;
      }
    }
  }
  // Rounding defeated the bounds (never seen in practice): resolve over every token with p > 0.
  bucket_range_pass(ws, padded, BUCKET_TINY_LAST, ws.list);
  const Hit boundary = resolve(ws.list, {0, 0.0}, 0, target, 0, ws);
  const Cut cut = boundary.found ? Cut{boundary.token.e, boundary.token.id} : KEEP_ALL_POSITIVE;
  *plan = {with_min_p(cut, min_p), KeptSource::kScan};
}

// Step 7: the smallest kept id whose running kept mass in id order exceeds uniform * (kept mass).
int64_t draw_row(Workspace& ws, int64_t vocab_size, const RowPlan& plan, double uniform) {
  const double* e = ws.e.data();
  const Cut& cut = plan.cut;
  if (plan.source == KeptSource::kList) {
    double total = 0.0;
    int64_t last_kept = -1;
    for (const RankedToken& t : ws.kept) {
      if (is_kept(t.e, t.id, cut)) total += t.e, last_kept = t.id;
    }
    const double target = uniform * total;
    double running = 0.0;
    for (const RankedToken& t : ws.kept) {
      if (is_kept(t.e, t.id, cut) && (running += t.e) > target) return t.id;
    }
    return last_kept;
  }
  const int64_t padded = (vocab_size + BLOCK - 1) / BLOCK * BLOCK;
  const int64_t num_blocks = padded / BLOCK;
  double* block_mass = ws.block_mass.data();
  if (plan.source == KeptSource::kScan) block_sums(ws, padded, cut, block_mass);
  double total = 0.0;
  for (int64_t blk = 0; blk < num_blocks; ++blk) total += block_mass[blk];
  const double target = uniform * total;
  double running = 0.0;
  int64_t blk = 0;
  while (blk < num_blocks && !(running + block_mass[blk] > target)) running += block_mass[blk++];
  for (int64_t i = blk * BLOCK; i < vocab_size; ++i) {  // rescan the hit block (and on, if rounding says so)
    if (is_kept(e[i], i, cut) && (running += e[i]) > target) return i;
  }
  for (int64_t i = vocab_size - 1; i > 0; --i) {  // rounding left no hit: the last kept id
    if (is_kept(e[i], i, cut)) return i;
  }
  return 0;
}

// The kept tokens in id order with p = e / (kept mass).
void collect_row(const Workspace& ws, int64_t vocab_size, const RowPlan& plan, RowCandidates& out) {
  out.ids.clear();
  out.probs.clear();
  double total = 0.0;
  if (plan.source == KeptSource::kList) {
    for (const RankedToken& t : ws.kept) {
      if (is_kept(t.e, t.id, plan.cut)) out.ids.push_back(t.id), total += t.e;
    }
  } else {
    const double* e = ws.e.data();
    for (int64_t i = 0; i < vocab_size; ++i) {
      if (is_kept(e[i], i, plan.cut)) out.ids.push_back(i), total += e[i];
    }
  }
  out.probs.resize(out.ids.size());
  for (size_t n = 0; n < out.ids.size(); ++n) out.probs[n] = static_cast<float>(ws.e[out.ids[n]] / total);
}

// torch.argmax of one row: the first index of its largest value, or of its first NaN when it holds one. Pass 1 is the
// sampler's scan (MinMaxScan: the largest non-NaN value and whether a NaN occurs); pass 2 finds the first index equal
// to it (the row is in cache by then). -0 and +0 are equal, so the first of them wins, as in torch.
int64_t argmax_row(const float* x, int64_t n) {
  MinMaxScan<false> scan;
  float lo, m;
  const bool has_nan = scan.finish(x, scan.steps(x, n), n, &lo, &m);
  int64_t i = 0;
  if (has_nan) {
    while (!std::isnan(x[i])) ++i;
    return i;
  }
#if defined(FASTGPT2_AVX512)
  for (const __m512 target = _mm512_set1_ps(m); i + 16 <= n; i += 16) {
    const __mmask16 hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + i), target, _CMP_EQ_OQ);
    if (hit) return i + __builtin_ctz(hit);
  }
#elif defined(FASTGPT2_AVX2)
  for (const __m256 target = _mm256_set1_ps(m); i + 8 <= n; i += 8) {
    const int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), target, _CMP_EQ_OQ));
    if (hit) return i + __builtin_ctz(hit);
  }
#endif
  while (x[i] != m) ++i;
  return i;
}

}  // namespace
}  // namespace sampling_detail

void argmax_rows(const float* logits_ptr, int64_t num_rows, int64_t vocab_size, int64_t stride_row, int64_t* out_ptr,
                 int num_threads) {
  using namespace sampling_detail;
  // One range per 16 rows at most: a row takes a few microseconds, waking a pool thread some.
  parallel_rows(
      num_rows, num_threads,
      [&](int64_t row, bool, Workspace&) { out_ptr[row] = argmax_row(logits_ptr + row * stride_row, vocab_size); },
      (num_rows + 15) / 16);
}

void topk_topp_minp_sample(const float* logits_ptr, int64_t num_rows, int64_t vocab_size, int64_t stride_row,
                           const int64_t* top_k_ptr, const double* top_p_ptr, const double* min_p_ptr,
                           const double* uniform_ptr, int64_t* out_ptr, int32_t* status_ptr, int num_threads) {
  using namespace sampling_detail;
  parallel_rows(num_rows, num_threads, [&](int64_t row, bool last, Workspace& ws) {
    const float* x = logits_ptr + row * stride_row;
    const float* next_row = last ? nullptr : x + stride_row;
    // The row before may have scanned this one on its way (the fast path's exp pass): the same values.
    const RowScan scan = ws.next_scanned == x ? ws.next_scan : scan_row(x, vocab_size);
    ws.next_scanned = nullptr;
    status_ptr[row] = row_status(scan);
    out_ptr[row] = -1;
    if (status_ptr[row] != kOk) return;
    if (try_top_p_fast(x, vocab_size, scan, top_k_ptr[row], top_p_ptr[row], min_p_ptr[row], uniform_ptr[row],
                       next_row, ws, &out_ptr[row])) {
      return;
    }
    RowPlan plan;
    plan_row(x, vocab_size, scan, top_k_ptr[row], top_p_ptr[row], min_p_ptr[row], next_row, ws, &plan);
    out_ptr[row] = draw_row(ws, vocab_size, plan, uniform_ptr[row]);
  });
}

void topk_topp_minp_select(const float* logits_ptr, int64_t num_rows, int64_t vocab_size, int64_t stride_row,
                           const int64_t* top_k_ptr, const double* top_p_ptr, const double* min_p_ptr,
                           std::vector<RowCandidates>& candidates, int32_t* status_ptr, int num_threads) {
  using namespace sampling_detail;
  candidates.resize(num_rows);
  parallel_rows(num_rows, num_threads, [&](int64_t row, bool last, Workspace& ws) {
    const float* x = logits_ptr + row * stride_row;
    const RowScan scan = scan_row(x, vocab_size);
    status_ptr[row] = row_status(scan);
    if (status_ptr[row] != kOk) return;
    RowPlan plan;
    plan_row(x, vocab_size, scan, top_k_ptr[row], top_p_ptr[row], min_p_ptr[row], last ? nullptr : x + stride_row, ws,
             &plan);
    collect_row(ws, vocab_size, plan, candidates[row]);
  });
}

}  // namespace fastgpt2
