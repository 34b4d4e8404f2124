// A persistent pool for the CPU decode step: many short parallel regions (about 60 per token) must cost about a
// microsecond each, which rules out spawning threads per region. Workers spin briefly between regions and then
// sleep, so an idle pool never steals a core from torch.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace fastgpt2 {

class ThreadPool {
 public:
  // num_threads counts the calling thread: a pool of 2 starts one worker.
  explicit ThreadPool(int num_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const { return static_cast<int>(workers_.size()) + 1; }

  // Runs task(i) for every i in [0, num_tasks), tasks handed out one at a time to the caller and the workers;
  // returns when all have finished. Tasks must not throw. One region at a time: see with_pool.
  void parallel_for(int64_t num_tasks, const std::function<void(int64_t)>& task);

  // Calls body(pool) with the process-wide pool of num_threads threads (rebuilt when the count changes), holding
  // a lock so that callers from several Python threads take turns instead of sharing one region. With linger, idle
  // workers spin between the body's regions (a decode step's ~60 back-to-back regions); without it, and after the
  // body, they sleep at once: a spinning worker next to torch's OpenMP threads on a 2-core machine stalls them.
  static void with_pool(int num_threads, bool linger, const std::function<void(ThreadPool&)>& body);

 private:
  void worker_loop();
  bool run_tasks(uint64_t generation);

  // ticket_ = (generation << 32) | next task index; grabbing a task is a CAS that also checks the generation.
  std::atomic<uint64_t> ticket_{0};
  std::atomic<int64_t> finished_{0};
  std::atomic<int64_t> num_tasks_{0};
  const std::function<void(int64_t)>* task_ = nullptr;
  std::atomic<bool> stop_{false};
  std::atomic<bool> linger_{false};
  std::atomic<int> sleepers_{0};
  std::mutex sleep_mutex_;
  std::condition_variable wake_;
  std::vector<std::thread> workers_;
};

}  // namespace fastgpt2
