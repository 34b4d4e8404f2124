// The fast top-p path (sampling_fast.h): a float32 exp with checked margins; the result is always the exact path's.
#include "sampling_fast.h"

#include <algorithm>
#include <atomic>
#include <cmath>

#include "sampling.h"
#include "sampling_select.h"

namespace fastgpt2 {
namespace sampling_detail {
namespace {

// Rows the fast path takes: top-p alone (no top-k, no min-p).
bool fast_path_applies(int64_t top_k, double top_p, double min_p, int64_t vocab_size) {
  return top_p < 1.0 && !(top_k > 0 && top_k < vocab_size) && !(min_p > 0.0);
}

// The count limit for a row of mass at least total_low: buckets below g = ln(2 V / ((1 - p) total_low)), two more.
int count_limit_of(int64_t vocab_size, double top_p, double total_low, float bucket_scale) {
  const double gap = std::log(2.0 * vocab_size / ((1.0 - top_p) * total_low));
  return static_cast<int>(std::min(gap * bucket_scale + 2.0, double{BUCKET_PAD + 1}));
}

// How fast_exp_pass counts, from a sample of 256 tokens (every V/256-th). The counting's increments (a load, an add
// and a store each) cost about as much as the rest of the pass when every token is counted; listing the buckets below
// the limit first (a compress) saves those of the tokens past it. With AVX-512 the pass lists them itself
// (kBelowLimit) where fewer than 40% of the sample lie below the prior limit: peaked rows and Gumbel(0, 2) logits
// 28 -> 22 us per row of 50257; N(0, 3) logits at top-p 0.9 (60% below the limit) 31 -> 34 us, hence the sample.
// With AVX2, which has no compress, the pass counts nothing (kAfter) and fast_count_pass lists after it (a permutation
// from a table per 8 tokens), below the limit that the row's total gives, where fewer than 45% of the sample lie
// below the limit of the sample's estimate of that total (~30% of N(0, 3) logits at top-p 0.9 against 60% below the
// prior limit). Measured with the AVX2 kernels on one Intel Xeon core, 64 different rows of 50257 each, medians of
// three runs alternated with the previous code (every token counted): N(0, 8) logits at top-p 0.9 42.1 -> 35.9 us,
// Gumbel(0, 2) 39.4 -> 36.2, N(0, 4) 43.0 -> 39.0, N(0, 3) at 0.5 41.7 -> 38.3, at 0.9 43.4 -> 42.8; rows that count
// every token unchanged. (kAfter with AVX-512, beside kAll and kBelowLimit: 0.97-1.04x, not taken.)
CountMode count_mode(const float* x, int64_t vocab_size, float max, float bucket_scale, double top_p,
                     int prior_limit) {
  if (vocab_size < 4096 || prior_limit >= NUM_LINEAR_BUCKETS) return CountMode::kAll;
  const int64_t stride = vocab_size / 256;
#if defined(FASTGPT2_AVX512)
  static_cast<void>(top_p);
  int below_prior = 0;
  for (int64_t i = 0; i < 256; ++i)
    below_prior += bucket_of(x[i * stride], max, bucket_scale) < static_cast<uint32_t>(prior_limit);
  return below_prior < 256 * 2 / 5 ? CountMode::kBelowLimit : CountMode::kAll;
#elif defined(FASTGPT2_AVX2)
  alignas(32) float gap[256];
  for (int64_t i = 0; i < 256; ++i) gap[i] = max - x[i * stride];
  __m256 sum = _mm256_setzero_ps();
  for (int i = 0; i < 256; i += 8) sum = _mm256_add_ps(sum, exp32_of_gap8<true>(_mm256_load_ps(gap + i)));
  const double mass = 1.0 + hsum(sum) * (static_cast<double>(vocab_size) / 256);  // 1: the max's e, rarely sampled
  const int estimated_limit = count_limit_of(vocab_size, top_p, mass, bucket_scale);
  int below = 0;
  for (int i = 0; i < 256; ++i) below += gap[i] * bucket_scale < static_cast<float>(estimated_limit);
  return below < 256 * 45 / 100 ? CountMode::kAfter : CountMode::kAll;
#else
  static_cast<void>(x), static_cast<void>(max), static_cast<void>(bucket_scale), static_cast<void>(top_p);
  static_cast<void>(stride);
  return CountMode::kAll;
#endif
}

std::atomic<int64_t> fast_rows_decided{0}, fast_rows_deferred{0};
std::atomic<int64_t> narrow_windows_tried{0}, narrow_windows_missed{0};

// Steps 1-7 for a top-p-only row with the float32 exp (exp32_of_gap): about half the exact path's arithmetic and
// memory. Every sum it compares carries a bound on its error against exact arithmetic; a decision is taken only
// when its margin exceeds that bound, so the result is always the exact path's. Returns false (and the caller runs
// the exact path) when the boundary is not safely inside the window or the draw is too close to call.
//
// With A = mass of the buckets above the window (e32 sums), W = the window's exact masses and B = the mass below
// it (T32 - A - window e32), rank r is kept iff A + W_before(r) < p (A + W + B), i.e. W_before(r) < tau with
// tau = p (W + B) - (1 - p) A, whose error is at most (1 - p) eps_A A + p eps_B B (+ the block sums' float32
// rounding and the float64 rounding): small even where p is close to 1, as B then is.
bool sample_top_p_fast(const float* x, int64_t vocab_size, const RowScan& scan, double top_p, double uniform,
                       const float* next_row, Workspace& ws, int64_t* token) {
  const double full_range = static_cast<double>(scan.max) - scan.min_finite;  // +inf with -inf logits
  const BucketScale buckets = bucket_scale_of(scan);
  const float bucket_scale = buckets.scale;
  const double inv_scale = buckets.inv_scale;
  if (!(bucket_scale > 0.0f) || inv_scale < 1e-10) return false;  // one bucket, or buckets too narrow
  const int64_t padded = (vocab_size + BLOCK - 1) / BLOCK * BLOCK;
  ws.reserve(padded);
  // Tokens with a gap >= g = ln(2 V / ((1 - p) T)) hold less than V e^-g = (1 - p) T / 2 of the mass T, so the
  // boundary lies above them by a margin: their buckets need no count (two buckets of margin for the float32 bucket
  // index). Before the pass T is only known to be >= 1 (the max's e); after it, from total32.
  const int prior_limit = count_limit_of(vocab_size, top_p, 1.0, bucket_scale);
  const CountMode mode = count_mode(x, vocab_size, scan.max, bucket_scale, top_p, prior_limit);
  const double total32 = fast_exp_pass(x, vocab_size, scan, bucket_scale, mode, prior_limit, next_row, ws);
  if (mode == CountMode::kAfter) {
    // The exact total is at least total32 less e32's error (relative error below EXP32_REL_ERROR + EXP32_GAP_ERROR *
    // EXP32_GAP_MAX < 6e-6, and the pair sums' FAST_BLOCK_SUM_ERROR; the tokens set to 0 have e < EXP32_TINY each) and
    // at least 1.
    const double total_low = std::max(1.0, total32 * (1.0 - 1e-5) - vocab_size * EXP32_TINY);
    fast_count_pass(ws, vocab_size, count_limit_of(vocab_size, top_p, total_low, bucket_scale));
  }
  // The bracket only guides where the window lies (the decision below is checked): bounds as in plan_row, widened
  // by the float32 exp's error.
  const double slack = buckets.slack + 4 * EXP32_REL_ERROR;
  int crossing = BUCKET_TINY;
  const Bracket bracket = bracket_mass(ws.count.data(), top_p * total32, inv_scale, slack, &crossing);
  // With top-p close to 1 the lower bounds may never reach the target (they lose up to a bucket's width of every
  // token's e): the window then ends two buckets past the estimated crossing instead (checked like any window).
  const bool bracketed = bracket.last < BUCKET_TINY;
  const int wide_first = std::max(bracket.first - 1, 0);
  const int wide_last = bracketed ? bracket.last + 1 : crossing + 2;
  if (wide_last >= BUCKET_TINY) return false;
  double* block_mass = ws.block_mass.data();
  // The window's pass and the boundary's decision (below). Returns whether the boundary was decided in [first, last].
  int first = 0, last = 0;
  double above = 0.0, eps_above = 0.0, rounding = 0.0;
  Hit boundary{};
  auto decide_in = [&](int window_first, int window_last) {
    first = window_first, last = window_last;
    const FastWindow sums = fast_window_pass(ws, x, scan.max, bucket_scale, vocab_size, first, last, ws.list,
                                             block_mass);
    double window = 0.0;
    for (const RankedToken& t : ws.list) window += t.e;
    above = sums.above;
    const double below = std::max(total32 - above - sums.window_e32, 0.0);
    // Error bounds on e32 against the exact e: a token above the window has gap < (first + 1) / scale (its float32
    // bucket index is < first); one below it has gap <= min(full range, EXP32_GAP_MAX), or its e32 is 0 and its
    // exact e < EXP32_TINY. `above` also carries the block sums' float32 rounding, which reaches `below` through the
    // subtraction with the weight p + (1 - p) = 1.
    const double eps_above_exp = EXP32_REL_ERROR + EXP32_GAP_ERROR * (first + 1) * inv_scale;
    eps_above = eps_above_exp + FAST_BLOCK_SUM_ERROR;
    const double eps_below = EXP32_REL_ERROR + EXP32_GAP_ERROR * std::min(full_range, double{EXP32_GAP_MAX});
    rounding = 4.0 * (vocab_size + BLOCK) * 0x1p-53 * (above + window + below);  // float64 sums
    // The boundary: the first window token (rank order) whose inclusive window mass reaches tau, taken only when
    // tau lies farther than the bound from both its masses. The first attempt gets `below` by subtraction; where
    // that bound is too wide (it carries the block sums' rounding of all of `above`, which dominates when p is
    // close to 1), the second sums `below` directly, whose rounding then enters with the weight 1 - p only.
    for (int attempt = 0; attempt < 2; ++attempt) {
      const double below_mass = attempt == 0 ? below : fast_mass_below(ws, padded, last);
      // The float32 pair sums' rounding: of `above` (weight 1: (1 - p) directly, p through `below`) and, the first
      // time, of total32 (weight p, through `below`); the second time `below` is summed directly.
      const double sum_error = attempt == 0 ? FAST_BLOCK_SUM_ERROR * (above + top_p * total32)
                                            : FAST_BLOCK_SUM_ERROR * ((1.0 - top_p) * above + top_p * below_mass);
      const double bound = 1.01 * ((1.0 - top_p) * eps_above_exp * above + sum_error +
                                   top_p * eps_below * below_mass + top_p * vocab_size * EXP32_TINY) + rounding;
      const double tau = top_p * (window + below_mass) - (1.0 - top_p) * above;
      if (!(tau > bound && tau < window - bound)) {
        if (tau < -bound || tau > window + bound) return false;  // outside this window whatever the rounding
        continue;
      }
      boundary = resolve(ws.list, {0, 0.0}, 0, tau, 0, ws);
      if (boundary.found && boundary.incl.mass - tau > bound && tau - (boundary.incl.mass - boundary.token.e) > bound)
        return true;
    }
    return false;
  };
  // The bracket holds the boundary for certain but is wide: its bounds take every token at its bucket's top or
  // bottom, a relative spread of one bucket's width over all the mass above, so it spans ~14 buckets (~320 tokens)
  // on N(0, 3) logits at top-p 0.9 and ~120 buckets at 0.99. Each window token costs a listing and a kept test that
  // branch on the data, an exp and a rank. The estimated crossing (each token at its bucket's middle) is off by more
  // than one bucket in ~5% of N(0, 3) rows at 0.9, and by more than 7 in ~10% at 0.99; so where it holds less than
  // half the bracket's tokens, a window of 1/16 of the bracket's width each side of it (at least one bucket) is
  // tried first, and the bracket's window where that one does not decide. Either decision is checked, so the token
  // is the same. Measured per row of 50257 on an Intel Xeon (AVX-512), 64 different rows in turn, one thread,
  // before -> after: N(0, 3) logits at top-p 0.9 41.3 -> 38.5 us, at 0.99 129 -> 57 us; N(0, 1) 48.4 -> 42.6 us;
  // Zipf-like rows 50.5 -> 44.8 us; peaked rows (N(0, 8), Gumbel) and N(0, 3) at 0.3 unchanged.
  const int half = std::max(1, (wide_last - wide_first) / 16);
  const int narrow_first = std::max(wide_first, crossing - half), narrow_last = std::min(wide_last, crossing + half);
  auto tokens_in = [&](int from, int to) {
    int64_t n = 0;
    for (int b = from; b <= to; ++b) n += ws.count[b];
    return n;
  };
  const bool narrower = narrow_first <= narrow_last &&
                        (narrow_first > wide_first || narrow_last < wide_last) &&
                        2 * tokens_in(narrow_first, narrow_last) < tokens_in(wide_first, wide_last) - 32;
  bool decided = false;
  if (narrower) {
    narrow_windows_tried.fetch_add(1, std::memory_order_relaxed);
    decided = decide_in(narrow_first, narrow_last);
    if (!decided) narrow_windows_missed.fetch_add(1, std::memory_order_relaxed);
  }
  if (!decided && !decide_in(wide_first, wide_last)) return false;
  const Cut cut{boundary.token.e, boundary.token.id};

  // Step 7 on the kept set: every token above the window (e32) and the window's tokens up to the cut (exact e).
  double kept = above;
  for (const RankedToken& t : ws.list) {
    if (is_kept(t.e, t.id, cut)) block_mass[t.id / BLOCK] += t.e, kept += t.e;
  }
  const double target = uniform * kept;
  const int64_t num_blocks = padded / BLOCK;
  double running = 0.0;
  int64_t blk = 0;
  while (blk < num_blocks && !(running + block_mass[blk] > target)) running += block_mass[blk++];
  const float* e32 = ws.e32.data();
  const uint16_t* bucket = ws.bucket.data();
  for (int64_t i = blk * BLOCK; i < vocab_size; ++i) {
    double mass = 0.0;
    if (bucket[i] < first) {
      mass = e32[i];
    } else if (bucket[i] <= last) {
      const double e = exp_nonpositive(static_cast<double>(x[i]) - static_cast<double>(scan.max));
      if (is_kept(e, i, cut)) mass = e;
    }
    if (mass == 0.0) continue;
    const double before = running;
    running += mass;
    if (running > target) {  // the exact running mass crosses u * (kept mass) here too if the margins allow
      const double draw_bound = 1.01 * eps_above * (running + uniform * above) + rounding;
      if (running - target > draw_bound && target - before > draw_bound) {
        *token = i;
        return true;
      }
      return false;
    }
  }
  return false;  // rounding left no hit: the exact path decides
}

}  // namespace

bool try_top_p_fast(const float* x, int64_t vocab_size, const RowScan& scan, int64_t top_k, double top_p, double min_p,
                    double uniform, const float* next_row, Workspace& ws, int64_t* token) {
  if (!fast_path_applies(top_k, top_p, min_p, vocab_size)) return false;
  const bool decided = sample_top_p_fast(x, vocab_size, scan, top_p, uniform, next_row, ws, token);
  (decided ? fast_rows_decided : fast_rows_deferred).fetch_add(1, std::memory_order_relaxed);
  return decided;
}

}  // namespace sampling_detail

void exp32_of_gaps(const float* t, int64_t n, float* out) {
  using namespace sampling_detail;
  int64_t i = 0;
#ifdef FASTGPT2_AVX512
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(out + i, exp32_of_gap16<true>(_mm512_loadu_ps(t + i)));
#endif
#ifdef FASTGPT2_AVX2
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, exp32_of_gap8<true>(_mm256_loadu_ps(t + i)));
#endif
  for (; i < n; ++i) out[i] = exp32_of_gap(t[i]);
}

Exp32Bound exp32_bound() {
  using namespace sampling_detail;
  return {EXP32_REL_ERROR, EXP32_GAP_ERROR, EXP32_GAP_MAX};
}

FastPathStats fast_path_stats() {
  using namespace sampling_detail;
  return {fast_rows_decided.load(std::memory_order_relaxed), fast_rows_deferred.load(std::memory_order_relaxed),
          narrow_windows_tried.load(std::memory_order_relaxed), narrow_windows_missed.load(std::memory_order_relaxed)};
}

}  // namespace fastgpt2
