// A persistent pool for the CPU decode step: many short parallel regions (about 60 per token) must cost about a
// microsecond each, which rules out spawning threads per region. Workers spin briefly between regions and then
// sleep, so an idle pool never steals a core from torch.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
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
  // returns when all have finished. A task may throw (a thread_local buffer that cannot grow throws std::bad_alloc):
  // the pool catches it on whichever thread ran the task, skips the tasks not yet started, waits for the running
  // ones and rethrows the first exception in the caller; the pool stays usable. One region at a time: see with_pool.
  // num_tasks must be below 2^32 - 1.
  void parallel_for(int64_t num_tasks, const std::function<void(int64_t)>& task);

  // Calls body(pool) with the process-wide pool of num_threads threads (rebuilt when the count changes), holding
  // a lock so that callers from several Python threads take turns instead of sharing one region. With linger, idle
  // workers spin between the body's regions (a decode step's ~60 back-to-back regions); without it, and after the
  // body, they sleep at once: a spinning worker next to torch's OpenMP threads on a 2-core machine stalls them.
  static void with_pool(int num_threads, bool linger, const std::function<void(ThreadPool&)>& body);

 private:
  void worker_loop();
  bool run_tasks(uint64_t generation);
  void record_error();

  // ticket_ = (generation << 32) | next task index; grabbing a task is a CAS that also checks the generation. A
  // finished region is closed by an index no count reaches (thread_pool.cpp says why).
  std::atomic<uint64_t> ticket_{0};
  std::atomic<int64_t> finished_{0};
  std::atomic<int64_t> num_tasks_{0};
  const std::function<void(int64_t)>* task_ = nullptr;
  // The region's first exception; failed_ tells the other threads to skip the tasks they have not started.
  std::atomic<bool> failed_{false};
  std::exception_ptr error_;
  std::mutex error_mutex_;
  std::atomic<bool> stop_{false};
  std::atomic<bool> linger_{false};
  std::atomic<int> sleepers_{0};
  std::mutex sleep_mutex_;
  std::condition_variable wake_;
  std::vector<std::thread> workers_;
};

}  // namespace fastgpt2
