// ThreadPool: generation-tagged task tickets, spin-then-sleep workers. See thread_pool.h.
#include "thread_pool.h"

#include <chrono>
#include <memory>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define FASTGPT2_PAUSE() _mm_pause()
#else
#define FASTGPT2_PAUSE() std::this_thread::yield()
#endif

namespace fastgpt2 {
namespace {

constexpr uint64_t kIndexMask = 0xffffffffull;
// Longest spin of a lingering idle worker: regions of one decode step follow each other within microseconds.
constexpr auto kSpinTime = std::chrono::microseconds(200);

}  // namespace

ThreadPool::ThreadPool(int num_threads) {
  for (int i = 1; i < num_threads; ++i) {
    try {
      workers_.emplace_back([this] { worker_loop(); });
    } catch (const std::system_error&) {
      break;  // fewer threads than asked: the caller still runs every task it cannot hand out
    }
  }
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(sleep_mutex_);
    stop_.store(true);
  }
  wake_.notify_all();
  for (std::thread& t : workers_) t.join();
}

bool ThreadPool::run_tasks(uint64_t generation) {
  bool ran = false;
  uint64_t ticket = ticket_.load(std::memory_order_acquire);
  while ((ticket >> 32) == generation && static_cast<int64_t>(ticket & kIndexMask) < num_tasks_.load(std::memory_order_relaxed)) {
    if (!ticket_.compare_exchange_weak(ticket, ticket + 1, std::memory_order_acq_rel)) continue;
    (*task_)(static_cast<int64_t>(ticket & kIndexMask));
    finished_.fetch_add(1, std::memory_order_release);
    ran = true;
    ticket = ticket_.load(std::memory_order_acquire);
  }
  return ran;
}

void ThreadPool::worker_loop() {
  uint64_t seen = 0;
  while (!stop_.load(std::memory_order_relaxed)) {
    auto spin_until = std::chrono::steady_clock::now() + kSpinTime;
    uint64_t generation = ticket_.load(std::memory_order_acquire) >> 32;
    int spins = 0;
    while (generation == seen && !stop_.load(std::memory_order_relaxed)) {
      FASTGPT2_PAUSE();
      generation = ticket_.load(std::memory_order_acquire) >> 32;
      if (!linger_.load(std::memory_order_relaxed) ||
          (++spins % 256 == 0 && std::chrono::steady_clock::now() > spin_until)) {
        std::unique_lock<std::mutex> lock(sleep_mutex_);
        sleepers_.fetch_add(1);
        wake_.wait(lock, [&] { return stop_.load() || (ticket_.load() >> 32) != seen; });
        sleepers_.fetch_sub(1);
        generation = ticket_.load(std::memory_order_acquire) >> 32;
      }
    }
    seen = generation;
    run_tasks(generation);
  }
}

void ThreadPool::parallel_for(int64_t num_tasks, const std::function<void(int64_t)>& task) {
  if (num_tasks <= 0) return;
  if (workers_.empty() || num_tasks == 1) {
    for (int64_t i = 0; i < num_tasks; ++i) task(i);
    return;
  }
  const uint64_t generation = (ticket_.load(std::memory_order_relaxed) >> 32) + 1;
  task_ = &task;
  num_tasks_.store(num_tasks, std::memory_order_relaxed);
  finished_.store(0, std::memory_order_relaxed);
  // seq_cst (not just release): pairs with the sleeper count below so that a worker going to sleep either sees the
  // new generation or is seen and woken.
  ticket_.store(generation << 32, std::memory_order_seq_cst);
  if (sleepers_.load() > 0) {
    std::lock_guard<std::mutex> lock(sleep_mutex_);
    wake_.notify_all();
  }
  run_tasks(generation);
  while (finished_.load(std::memory_order_acquire) < num_tasks) FASTGPT2_PAUSE();
}

void ThreadPool::with_pool(int num_threads, bool linger, const std::function<void(ThreadPool&)>& body) {
  static std::mutex mutex;
  static std::unique_ptr<ThreadPool> pool;
  std::lock_guard<std::mutex> lock(mutex);
  if (num_threads < 1) num_threads = 1;
  if (!pool || pool->num_threads() != num_threads) {
    pool.reset();
    pool = std::make_unique<ThreadPool>(num_threads);
  }
  struct Linger {  // reset even if body throws
    std::atomic<bool>& flag;
    ~Linger() { flag.store(false); }
  } reset{pool->linger_};
  pool->linger_.store(linger);
  body(*pool);
}

}  // namespace fastgpt2
