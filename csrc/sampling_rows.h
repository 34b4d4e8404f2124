// The CPU kernels' per-row plumbing shared by the sampler (sampling.cpp) and the logprobs pass (logprobs.cpp): a row's
// status from its scan, and the split of rows over the process-wide thread pool.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>

#include "sampling.h"
#include "sampling_math.h"
#include "thread_pool.h"

namespace fastgpt2 {
namespace sampling_detail {

// Whether a row's logits can be sampled at all.
inline RowStatus row_status(const RowScan& scan) {
  if (scan.has_nan) return kNaN;
  if (scan.max == std::numeric_limits<float>::infinity()) return kPosInf;
  if (scan.max == -std::numeric_limits<float>::infinity()) return kNoFinite;
  return kOk;
}

// Runs row_fn(row, is_last_of_range, workspace) over [0, num_rows), rows split into at most max_ranges contiguous
// ranges over up to num_threads threads: the process-wide pool's (ThreadPool::with_pool, the C++ step's pool, of
// num_threads threads: asked with another count it would be rebuilt, twice per step), whose threads keep their
// workspaces between calls. (Threads spawned per call rebuilt theirs every call: ~0.7 MB zero-filled each; a batch of
// 64 rows of 50257 on 2 threads was 1.3-1.4x faster than on one instead of about 2x.)
template <typename RowFn>
void parallel_rows(int64_t num_rows, int num_threads, const RowFn& row_fn,
                   int64_t max_ranges = std::numeric_limits<int64_t>::max()) {
  const int64_t num_ranges = std::max<int64_t>(1, std::min<int64_t>({int64_t{num_threads}, num_rows, max_ranges}));
  auto run_range = [&](int64_t w) {
    thread_local Workspace ws;
    ws.next_scanned = nullptr;  // a scan left by an earlier call (one that threw) is not this call's
    const int64_t begin = num_rows * w / num_ranges, end = num_rows * (w + 1) / num_ranges;
    for (int64_t row = begin; row < end; ++row) row_fn(row, row + 1 == end, ws);
  };
  if (num_ranges == 1) {
    run_range(0);
    return;
  }
  ThreadPool::with_pool(num_threads, /*linger=*/false,
                        [&](ThreadPool& pool) { pool.parallel_for(num_ranges, run_range); });
}

}  // namespace sampling_detail
}  // namespace fastgpt2
