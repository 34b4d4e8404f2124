// A stress run of ThreadPool for the tests (fastgpt2._C._thread_pool_stress): many back-to-back regions of random task
// counts, every task counting its own index, so that a task run twice, never, outside [0, n) or after its region
// returned shows up in the counts.
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "thread_pool.h"

namespace fastgpt2 {
namespace {

constexpr int64_t kMaxTasks = 300;        // a region has 1 .. kMaxTasks tasks
constexpr int64_t kMaxSmallTasks = 16;    // every other region has at most this many, so the next one usually grows
constexpr int kMaxThreads = 64;

// A task of the failing region: a per-thread buffer that grows past any memory, as the kernels' thread_local
// scratch vectors would on a huge batch, throws std::bad_alloc on whichever thread runs it.
void grow_past_memory(int64_t) {
  thread_local std::vector<float> buffer;
  buffer.resize(buffer.size() + (size_t{1} << 60));  // 4 EiB
}

}  // namespace

// Returns (tasks, task indices of any region that ran other than once or outside [0, n), regions whose
// parallel_for returned before all their tasks had finished). Region throw_region (if in range) throws instead.
std::tuple<int64_t, int64_t, int64_t> thread_pool_stress(int num_threads, int64_t num_regions, uint64_t seed,
                                                         bool linger, int64_t throw_region) {
  if (num_threads < 1 || num_threads > kMaxThreads)
    throw std::invalid_argument("num_threads must be in [1, " + std::to_string(kMaxThreads) + "], got " +
                                std::to_string(num_threads));
  if (num_regions < 0) throw std::invalid_argument("num_regions must be >= 0, got " + std::to_string(num_regions));
  // 1. Task counts: small and random counts alternate, so most regions grow over the one before, the pattern in
  //    which a worker leaving a region could claim a task of the next.
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int64_t> small(1, kMaxSmallTasks), any(1, kMaxTasks);
  std::vector<int64_t> num_tasks(num_regions);
  for (int64_t r = 0; r < num_regions; ++r) num_tasks[r] = r % 2 == 0 ? small(rng) : any(rng);
  // 2. Every region's tasks and counters exist before the first region, so the caller goes from one region to the
  //    next as fast as the pool lets it.
  std::vector<int64_t> first(num_regions + 1, 0);  // region r counts its runs in runs[first[r] : first[r + 1]]
  for (int64_t r = 0; r < num_regions; ++r) first[r + 1] = first[r] + num_tasks[r];
  std::vector<std::atomic<int32_t>> runs(first[num_regions]);
  std::vector<std::atomic<int64_t>> finished(num_regions);
  std::atomic<int64_t> wild{0};  // task indices outside [0, n)
  std::vector<std::function<void(int64_t)>> tasks;
  tasks.reserve(num_regions);
  for (int64_t r = 0; r < num_regions; ++r) {
    tasks.emplace_back([row = &runs[first[r]], n = num_tasks[r], done = &finished[r], &wild](int64_t i) {
      if (i < 0 || i >= n)
        wild.fetch_add(1, std::memory_order_relaxed);
      else
        row[i].fetch_add(1, std::memory_order_relaxed);
      done->fetch_add(1, std::memory_order_relaxed);
    });
  }
  // 3. The regions back to back, noting how many tasks had finished when each parallel_for returned.
  std::vector<int64_t> finished_at_return(num_regions);
  const std::function<void(int64_t)> grow(grow_past_memory);
  ThreadPool::with_pool(num_threads, linger, [&](ThreadPool& pool) {
    for (int64_t r = 0; r < num_regions; ++r) {
      pool.parallel_for(num_tasks[r], r == throw_region ? grow : tasks[r]);
      finished_at_return[r] = finished[r].load(std::memory_order_relaxed);
    }
  });
  // 4. The counts.
  int64_t early = 0;
  for (int64_t r = 0; r < num_regions; ++r) early += finished_at_return[r] < num_tasks[r];
  // A region that returned early may still have a task running on a worker: let it end before the counts are read.
  if (early > 0) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  int64_t miscounted = wild.load();
  for (const std::atomic<int32_t>& count : runs) miscounted += count.load() != 1;
  return {first[num_regions], miscounted, early};
}

}  // namespace fastgpt2
