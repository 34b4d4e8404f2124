// Top-k -> top-p -> min-p truncation and inverse-CDF sampling on CPU, on raw buffers (no Python, no torch).
//
// Semantics are those of fastgpt2/kernels/reference.py (sampling section). Per row, on float32 logits x:
//   1. e_i = exp(x_i - max(x)) in float64 (p_i = e_i / sum(e)); e_i = 0 for -inf logits and for x_i - max < -708.
//   2. Rank order is (p descending, token id ascending): ties are broken by the smaller token id. e is a pure
//      function of x_i - max (relative error < 4e-14), so equal logits always get bit-identical e and tie.
//   3. top-k keeps the first top_k tokens in rank order (top_k <= 0 or top_k >= vocab_size disables it).
//   4. top-p keeps rank r when the mass ranked before r is < top_p * (mass of the top-k set); rank 0 is always kept.
//   5. min-p keeps a token when p >= min_p * p_max, i.e. e_i >= min_p.
//   6. Tokens with p == 0 are never kept. (At top_p = 1 the reference compares its cumsum with its sum, which differ
//      by rounding only, and so keeps or drops the tail tokens with p == 0 or p < ~1e-15 of the total at random.)
//   7. Draw with u in [0, 1): the smallest kept id whose running kept mass in token-id order is > u * (kept mass);
//      the last kept id when rounding leaves none.
// Sums are float64: kept sets and draws equal the reference's except where two compared sums are equal to within
// float64 rounding.
//
// Method (per row, no sort of the vocabulary): one pass for the max (made on the way by the fast path's exp pass over
// the row before, for every row of a thread's range but the first); one pass computing e (AVX-512 or AVX2 + FMA when
// built with them, else the same arithmetic in scalar code) together with a count histogram over 2046 linear buckets of
// x - max (bucket index in float32; the loop counts each token 64 tokens after storing its bucket). Counts are
// exact, so the top-k boundary's bucket is known and the tokens up to it are collected; for top-p, rigorous
// per-bucket bounds on e (widened by the float32 bucket index's rounding) bracket the boundary in a few buckets, and
// one pass sums the exact mass above them (per block of 64 tokens, for the draw) while collecting their tokens, or,
// when at most 1024 tokens lie at or above the bracket (a peaked row), those are collected and all the rest works
// on that list. The boundary is then placed exactly on the collected tokens by an MSB-first radix select on the
// float64 bits of e (count and mass per bucket, ties in id order). The kept set is
// {e > e_cut} U {e == e_cut and id <= id_cut}, intersected with e >= min_p.
//
// Fast path (sampling only, rows with top-p and neither top-k nor min-p): the same passes with a float32 exp (8 or 16
// lanes, about half the work and memory) whose error against the exact exp is bounded; the window's tokens get the
// exact e and every comparison of sums is taken only when its margin exceeds the bound on its error, else the row goes
// through the exact path (sampling_fast.cpp, sample_top_p_fast). The result is the exact path's in every case.
// Every vectorised loop has the same result per token as the portable one (the same IEEE operations per lane); sums
// of many tokens may differ between builds in their float64 rounding only.
#pragma once

#include <cstdint>
#include <vector>

namespace fastgpt2 {

// Per-row outcome; anything other than kOk means the row's logits are unusable and nothing was written for it.
enum RowStatus : int32_t {
  kOk = 0,
  kNaN = 1,        // a logit is NaN
  kPosInf = 2,     // a logit is +inf (softmax undefined)
  kNoFinite = 3,   // every logit is -inf (every token banned)
};

// The kept tokens of one row, in ascending token id, with their probabilities renormalised over the kept set.
struct RowCandidates {
  std::vector<int64_t> ids;
  std::vector<float> probs;
};

// How many rows the fast top-p path (float32 exp, checked margins) decided, and how many it handed to the exact path,
// since the module was loaded (all threads); and how many rows it tried in a window narrower than the bracket, and
// how many of those it went on to decide in the bracket's window (or to hand over).
struct FastPathStats {
  int64_t decided;
  int64_t deferred;
  int64_t narrow_tried;
  int64_t narrow_missed;
};
FastPathStats fast_path_stats();

// The fast path's float32 exp of gaps t = max - x >= 0 (or +inf), n values, and the bound on its relative error
// against the exact exp(x - max): rel_error + t * gap_error (for tests).
void exp32_of_gaps(const float* t, int64_t n, float* out);
struct Exp32Bound {
  double rel_error, gap_error, gap_max;
};
Exp32Bound exp32_bound();

// Truncates each row and draws one token with the given uniform.
//   logits_ptr: (num_rows, vocab_size) float32, row r at logits_ptr + r * stride_row, vocab dimension contiguous.
//   top_k_ptr: (num_rows,) int64; top_p_ptr: (num_rows,) float64 in (0, 1]; min_p_ptr: (num_rows,) float64 in
//   [0, 1]; uniform_ptr: (num_rows,) float64 in [0, 1). Writes out_ptr: (num_rows,) int64 token ids and
//   status_ptr: (num_rows,) RowStatus. Rows are split into contiguous ranges over num_threads std::threads.
void topk_topp_minp_sample(const float* logits_ptr, int64_t num_rows, int64_t vocab_size, int64_t stride_row,
                           const int64_t* top_k_ptr, const double* top_p_ptr, const double* min_p_ptr,
                           const double* uniform_ptr, int64_t* out_ptr, int32_t* status_ptr, int num_threads);

// Truncates each row and returns its kept candidates (same inputs as topk_topp_minp_sample, no uniform).
//   candidates: resized to num_rows; status_ptr: (num_rows,) RowStatus.
void topk_topp_minp_select(const float* logits_ptr, int64_t num_rows, int64_t vocab_size, int64_t stride_row,
                           const int64_t* top_k_ptr, const double* top_p_ptr, const double* min_p_ptr,
                           std::vector<RowCandidates>& candidates, int32_t* status_ptr, int num_threads);

// Greedy decoding: out_ptr[r] = torch.argmax of row r (the first index of its largest value, or of its first NaN),
// rows as in topk_topp_minp_sample, split over up to num_threads std::threads (one per 16 rows at most).
void argmax_rows(const float* logits_ptr, int64_t num_rows, int64_t vocab_size, int64_t stride_row, int64_t* out_ptr,
                 int num_threads);

}  // namespace fastgpt2
