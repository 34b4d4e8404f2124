// ThreadPool: generation-tagged task tickets, spin-then-sleep workers. See thread_pool.h.
#include "thread_pool.h"

#include <chrono>
#include <memory>
#include <stdexcept>
#include <string>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define FASTGPT2_PAUSE() _mm_pause()
#else
#define FASTGPT2_PAUSE() std::this_thread::yield()
#endif

namespace fastgpt2 {
namespace {

constexpr uint64_t kIndexMask = 0xffffffffull;
// The index of a closed region's ticket: above every task count (parallel_for takes fewer tasks).
constexpr uint64_t kClosed = kIndexMask;
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

// Why a task runs once: a worker may still be in here for region g, holding a ticket g|i it loaded, when the caller
// starts region g + 1. It claims index i only by a CAS expecting g|i, after reading a count n > i from num_tasks_.
// If n is region g's count, i is a task of g, and the CAS succeeds only while g is open (ticket still g|i). If n is a
// later region's count, the worker's acquire load read that region's release store of num_tasks_; the caller's
// closing store of g|kClosed comes before that store (same thread, or across with_pool's mutex), so it happens
// before the CAS, which then sees g|kClosed or a later generation and fails. The count cannot be older than g's:
// the ticket load (acquire) read a value published after g's count. A successful CAS reads g's release sequence
// (the publishing store and the CAS increments), so task_ is g's task too.
bool ThreadPool::run_tasks(uint64_t generation) {
  bool ran = false;
  uint64_t ticket = ticket_.load(std::memory_order_acquire);
  while ((ticket >> 32) == generation &&
         static_cast<int64_t>(ticket & kIndexMask) < num_tasks_.load(std::memory_order_acquire)) {
    if (!ticket_.compare_exchange_weak(ticket, ticket + 1, std::memory_order_acq_rel)) continue;
    if (!failed_.load(std::memory_order_relaxed)) {
      try {
        (*task_)(static_cast<int64_t>(ticket & kIndexMask));
      } catch (...) {  // on a worker an escaping exception would call std::terminate
        record_error();
      }
    }
    finished_.fetch_add(1, std::memory_order_release);
    ran = true;
    ticket = ticket_.load(std::memory_order_acquire);
  }
  return ran;
}

void ThreadPool::record_error() {
  std::lock_guard<std::mutex> lock(error_mutex_);
  if (!error_) error_ = std::current_exception();
  failed_.store(true, std::memory_order_relaxed);
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
  if (static_cast<uint64_t>(num_tasks) >= kClosed)
    throw std::length_error("parallel_for takes fewer than 2^32 - 1 tasks, got " + std::to_string(num_tasks));
  const uint64_t generation = (ticket_.load(std::memory_order_relaxed) >> 32) + 1;
  task_ = &task;
  num_tasks_.store(num_tasks, std::memory_order_release);  // release: see run_tasks
  finished_.store(0, std::memory_order_relaxed);
  failed_.store(false, std::memory_order_relaxed);
  // seq_cst (not just release): pairs with the sleeper count below so that a worker going to sleep either sees the
  // new generation or is seen and woken.
  ticket_.store(generation << 32, std::memory_order_seq_cst);
  if (sleepers_.load() > 0) {
    std::lock_guard<std::mutex> lock(sleep_mutex_);
    wake_.notify_all();
  }
  run_tasks(generation);
  while (finished_.load(std::memory_order_acquire) < num_tasks) FASTGPT2_PAUSE();
  // Every task has been claimed (the ticket is g|num_tasks) and has finished. Closing the ticket makes any CAS a
  // worker still holds for this generation fail once the next region reuses num_tasks_ and task_ (see run_tasks).
  ticket_.store((generation << 32) | kClosed, std::memory_order_relaxed);
  if (error_) {  // written before the failing task's finished_ increment, which the load above acquired
    std::exception_ptr error = std::move(error_);
    error_ = nullptr;
    std::rethrow_exception(error);
  }
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
