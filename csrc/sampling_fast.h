// The fast top-p path of the CPU sampler (sampling.h, "Fast path"): rows with top-p and neither top-k nor min-p,
// sampled with a float32 exp whose every decision is checked against a bound on its error (sampling_fast.cpp), and
// its passes over the row (sampling_fast_passes.cpp).
#pragma once

#include <cstdint>
#include <vector>

#include "sampling_passes.h"

namespace fastgpt2 {
namespace sampling_detail {

// Samples a row of status kOk through the fast path when it applies (top_p < 1, no top-k, no min-p) and its margins
// allow: returns true with *token set, the exact path's token. Returns false, with ws left for the exact path to
// refill, when the path does not apply or hands the row over. Counts the rows for fast_path_stats().
bool try_top_p_fast(const float* x, int64_t vocab_size, const RowScan& scan, int64_t top_k, double top_p, double min_p,
                    double uniform, const float* next_row, Workspace& ws, int64_t* token);

// How the fast exp pass counts the tokens' buckets: all of them, only those below its count_limit (AVX-512: the
// buckets listed by a compress, then counted), or none, fast_count_pass counting them after it.
enum class CountMode { kAll, kBelowLimit, kAfter };

// The fast top-p path's pass: e32 = exp32_of_gap(max - x) into ws.e32 and each token's bucket as exp_pass<true>
// stores them (the padding: e32 0, bucket BUCKET_PAD), and with kAll or kBelowLimit the count histogram (kBelowLimit:
// the counts of buckets >= count_limit may be left at 0; they are exact below it). Returns the sum of e32, the vector
// loops' tokens added in float32 pairs and then in float64 (relative error < FAST_BLOCK_SUM_ERROR, as the block sums;
// the pairs save a third of the sum's conversions and additions). read V floats; write padded V floats + padded V
// uint16 and the count histogram.
double fast_exp_pass(const float* x, int64_t vocab_size, const RowScan& scan, float bucket_scale, CountMode mode,
                     int count_limit, const float* next_row, Workspace& ws);

// After a kAfter pass: the count histogram of the stored buckets, exact below count_limit <= NUM_LINEAR_BUCKETS
// (buckets >= it are left at 0). read padded V uint16.
void fast_count_pass(Workspace& ws, int64_t vocab_size, int count_limit);

constexpr double FAST_BLOCK_SUM_ERROR = 6.1e-8;  // one float32 rounding (2^-24), with a margin

struct FastWindow {
  double above;  // sum of e32 over buckets < first
  double window_e32;  // sum of e32 over the window's tokens
};

// The fast path's top-p pass: per block, the e32 mass of the tokens in buckets < first into block_mass (pairs added
// in float32, then summed in float64: relative error < FAST_BLOCK_SUM_ERROR); the tokens in buckets [first, last]
// appended to `window` (id order) with their exact e (exp_nonpositive of x - max). bucket_scale is fast_exp_pass's.
// read padded V floats (e32) + V floats (x) + padded V uint16; ws.listed is its scratch.
FastWindow fast_window_pass(Workspace& ws, const float* x, float max, float bucket_scale, int64_t vocab_size,
                            int first, int last, std::vector<RankedToken>& window, double* block_mass);

// The e32 mass of the tokens in buckets > last (the padding's e32 is 0), summed in float32 pairs then float64
// (relative error < FAST_BLOCK_SUM_ERROR). read padded V floats + padded V uint16.
double fast_mass_below(const Workspace& ws, int64_t padded, int last);

}  // namespace sampling_detail
}  // namespace fastgpt2
