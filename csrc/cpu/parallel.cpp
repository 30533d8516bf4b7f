// A small thread pool for the kernels' parallel loops.
//
// Why not OpenMP: its workers spin after a parallel region and its static schedule waits for
// every thread, so on a busy or oversubscribed machine (torch's own threads, other processes, a
// second merge side by side) one descheduled worker stalls each call for a whole time slice
// (seen here: a 5-checkpoint pool materialize took 200 ms instead of 7). Here chunks are claimed
// from a shared counter, the caller works too, and the call returns as soon as every chunk is
// done: a worker that has not woken up yet simply finds nothing left. Idle workers sleep.
//
// Exceptions (as ATen's parallel_for): the first one thrown by any chunk, on any thread, is kept;
// no further chunks start; the caller waits until every thread has left fn (fn lives on the
// caller's stack), then rethrows it. A worker never lets one escape (that would be std::terminate).
//
// fork: a child has none of the parent's workers, and a lock another thread held at the fork stays
// held. So the pool is never destroyed (a static one's destructor waited forever at a forked child's
// exit) and a child starts over with a fresh pool, abandoning the parent's untouched (as torch does
// with its own pool).
#include <pthread.h>
#include <sched.h>
#include <algorithm>
#include <cstdlib>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <system_error>
#include <thread>
#include "cpu/common.h"

namespace pymerge {
namespace {

class Pool {
 public:
  void run(int64_t n, int64_t grain, int threads, const ChunkFn& fn) {
    std::lock_guard<std::mutex> one_job(job_mu_);  // callers from several Python threads take turns
    // Workers are kept for the process's life: num_threads=65536 left 3,000 idle threads behind, and a failed
    // thread creation was a bare "Resource temporarily unavailable" (an audit). Beyond 4 per core nothing is
    // gained; where the system refuses more, the chunks run on the workers there are.
    threads = std::min<int64_t>(threads, 4 * int64_t(std::max(1u, std::thread::hardware_concurrency())));
    {
      std::lock_guard<std::mutex> lk(mu_);
      try {
        while (int(workers_.size()) < threads - 1) workers_.emplace_back([this] { loop(); });
      } catch (const std::system_error&) {
      }
      fn_ = &fn;
      n_ = n;
      grain_ = grain;
      next_.store(0);
      seats_ = threads - 1;
      ++generation_;
    }
    wake_.notify_all();
    work();
    std::exception_ptr error;
    {
      std::unique_lock<std::mutex> lk(mu_);
      idle_.wait(lk, [this] { return active_ == 0; });  // every chunk is claimed; wait for those in flight
      seats_ = 0;  // workers waking late must not touch this job
      fn_ = nullptr;
      std::swap(error, error_);
    }
    if (error) std::rethrow_exception(error);
  }

 private:
  void work() noexcept {
    try {
      for (int64_t b; (b = next_.fetch_add(grain_)) < n_;) (*fn_)(b, std::min(n_, b + grain_));
    } catch (...) {
      next_.store(n_);  // nobody starts another chunk
      std::lock_guard<std::mutex> lk(mu_);
      if (!error_) error_ = std::current_exception();
    }
  }

  void loop() {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lk(mu_);
    for (;;) {
      wake_.wait(lk, [&] { return generation_ != seen; });
      seen = generation_;
      if (seats_ <= 0) continue;
      --seats_;
      ++active_;
      lk.unlock();
      work();
      lk.lock();
      if (--active_ == 0) idle_.notify_all();
    }
  }

  std::mutex job_mu_, mu_;
  std::condition_variable wake_, idle_;
  std::vector<std::thread> workers_;
  const ChunkFn* fn_ = nullptr;
  int64_t n_ = 0, grain_ = 1;
  std::atomic<int64_t> next_{0};
  std::exception_ptr error_;
  int seats_ = 0, active_ = 0;
  uint64_t generation_ = 0;
};

std::atomic<Pool*> the_pool{nullptr};  // leaked on purpose: see the top of this file

void forget_pool_in_child() { the_pool.store(nullptr); }

Pool& shared_pool() {
  static const int registered = pthread_atfork(nullptr, nullptr, forget_pool_in_child);
  (void)registered;
  Pool* p = the_pool.load();
  if (p == nullptr) {  // first use (or first in a forked child); two threads may race here
    Pool* fresh = new Pool;
    if (the_pool.compare_exchange_strong(p, fresh)) return *fresh;
    delete fresh;  // another thread's pool won; this one never started a worker
  }
  return *p;
}

}  // namespace

// The cores this process may run on (its affinity mask), or OMP_NUM_THREADS when set: the same
// knob torch and other native libraries honour; capped as Pool::run caps it (doctor printed the uncapped value).
int default_threads() {
  static const int n = [] {
    if (const char* env = std::getenv("OMP_NUM_THREADS")) {
      const int v = std::atoi(env);
      if (v > 0) return std::min(v, 4 * int(std::max(1u, std::thread::hardware_concurrency())));
    }
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
    return std::max(1, int(std::thread::hardware_concurrency()));
  }();
  return n;
}

void parallel_for(int64_t n, int64_t grain, int threads, const ChunkFn& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  threads = int(std::min<int64_t>(threads > 0 ? threads : default_threads(), (n + grain - 1) / grain));
  if (threads <= 1) return fn(0, n);
  shared_pool().run(n, grain, threads, fn);
}

namespace {
// Test hook: parallel_for over [0, n) whose chunk holding element `fail_at` throws. Returns the
// number of elements processed (all n when fail_at is out of range).
int64_t parallel_for_check(int64_t n, int64_t grain, int threads, int64_t fail_at) {
  std::atomic<int64_t> done{0};
  parallel_for(n, grain, threads, [&](int64_t b, int64_t e) {
    if (b <= fail_at && fail_at < e) throw std::invalid_argument("parallel_for_check: chunk failed as asked");
    std::this_thread::sleep_for(std::chrono::microseconds(50));  // keep the other threads inside fn
    done += e - b;
  });
  return done.load();
}

void register_parallel(pybind11::module_& m) {
  m.def("_parallel_for_check", &parallel_for_check, pybind11::call_guard<pybind11::gil_scoped_release>(),
        "Test hook for the thread pool's exception handling (see parallel.cpp).");
}
PYMERGE_REGISTER(register_parallel);
}  // namespace

}  // namespace pymerge
