// Log-probabilities of float32 logit rows without materialising the (rows, vocab) log_softmax: what the engine reports
// as logprobs (the sampled token's and the top-N of each step, prompt logprobs, scores and perplexity) needs per row
// only the log-sum-exp, a few tokens' logits and the N largest logits.
//
// Per row x (vocab_size float32 logits):
//   lse = max + log(sum_i e_i),  e_i = exp(x_i - max) in float64 (exp_nonpositive: relative error < 4e-14, 0 for
//   -inf logits), summed in a fixed order (the vector lanes, then the tail): lse is exact to ~1e-15 relative;
//   a token's logprob is float32(double(x_i) - lse), one rounding from the exact value (torch's float32 log_softmax
//   rounds several times);
//   the top-N are the N largest x in (value descending, token id ascending) order.
// Every row goes through the same operations whatever the number of rows, their split over threads or the call
// (batch-invariant, as the sampler).
#pragma once

#include <cstdint>

namespace fastgpt2 {

// num_rows rows of logits (vocab_size floats each, row stride stride_row elements): row r is logits row rows[r], or
// row r when rows is null. targets (num_rows,) a token id per row or -1 (none), or null; for each row of status kOk:
// target_logprob[r] (NaN where the target is -1), top_ids (num_rows, top_n) and top_logprobs (num_rows, top_n) in rank
// order. status[r] is a RowStatus (sampling.h): kNaN, kPosInf or kNoFinite rows get nothing else (their log_softmax is
// NaN: the caller decides). Rows are split over up to num_threads threads of the process-wide pool. The caller checks
// 0 <= top_n <= vocab_size and the targets' and rows' ranges.
void logprob_rows(const float* logits, const int64_t* rows, int64_t num_rows, int64_t vocab_size, int64_t stride_row,
                  const int64_t* targets, int64_t top_n, float* target_logprob, int64_t* top_ids, float* top_logprobs,
                  int32_t* status, int num_threads);

}  // namespace fastgpt2
