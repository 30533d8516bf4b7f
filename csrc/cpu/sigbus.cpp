// A SIGBUS guard for the memory-mapped inputs of a merge.
//
// Reading a mapped page past the end of a file that shrank after it was mapped (another process
// truncated a checkpoint mid-merge) raises SIGBUS, which kills the process: no error, and the
// temporary output is left behind. Kernels read the mappings directly (no copy: that is the
// merge's speed), on any thread, in our code or torch's, so no try/catch or longjmp can reach them.
// Instead, for a fault inside a registered mapping, the handler maps anonymous zero pages over the
// rest of that mapping (MAP_FIXED) and records the address; the faulting load then reads zeros and
// the merge goes on to its next check (pymerge/io/sigbus.py), which sees the hit, names the file
// and aborts: the zeros never reach a committed model. Faults anywhere else go to the previous
// handler (faulthandler, or the default action) as before. The handler is installed while any
// mapping is registered; the process's own SIGBUS action is back once none is.
//
// The handler only reads atomics and calls mmap(2), a plain system call on Linux.
#include <signal.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
#include <atomic>
#include <cstdint>
#include <mutex>
#include <stdexcept>
#include "cpu/common.h"

namespace pymerge {
namespace {

// Mapped files guarded at once (shards of every input): 32 checkpoints of 163 shards are 5216. Linux maps
// at most vm.max_map_count (65530 by default) regions per process, so no merge maps more files than this.
constexpr int kMaxRanges = 65536;

struct Range {
  std::atomic<uintptr_t> begin{0}, end{0};
};
Range g_ranges[kMaxRanges];
std::atomic<uint64_t> g_hits{0};
std::atomic<uintptr_t> g_last_fault{0};
struct sigaction g_previous;
std::mutex g_mu;  // registration and installation (never taken in the handler)
int g_guarded = 0;  // ranges registered (under g_mu): the handler is installed while there are any

// Set while this thread forwards a fault. A previous handler that chains back to us (faulthandler, enabled
// after our first install and so keeping ours as its own previous, once install() put ours back in front of
// it) raised the signal into us again, and we forwarded it back: a loop to a stack overflow (SIGSEGV,
// tracebacks printed over and over). A signal raised (si_code <= 0: raise, kill) into us while forwarding is
// that loop: the default action ends it. A fault (si_code > 0) is forwarded as ever, so a previous handler
// that never returned (a siglongjmp) leaves no stale flag in its way. Per thread (a fault on another thread
// meanwhile still gets its traceback); initial-exec TLS: no allocation in a handler.
__thread bool t_forwarding __attribute__((tls_model("initial-exec"))) = false;

// The last fault this thread forwarded and the previous handler returned from: its address and when. One that
// returns without curing the fault gets the same fault again at once, forever: faulthandler, kept as our previous
// while it was in front and disabled since, returns at once (the process spun at 100 % CPU where it died of the
// SIGBUS before; a review). The same address again within a second takes the default action instead; later, or
// elsewhere, the previous handler is asked again (one that cured a fault there, and a mapping reusing the address,
// see it as before; a handler that jumps out, never returning, is handed every fault).
struct Returned {
  uintptr_t addr;
  int64_t ns;
  bool valid;
};
__thread Returned t_returned __attribute__((tls_model("initial-exec"))) = {0, 0, false};

int64_t monotonic_ns() {  // clock_gettime: async-signal-safe
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return int64_t(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

void forward(int sig, siginfo_t* info, void* ctx) {
  if (t_forwarding && info != nullptr && info->si_code <= 0) {
    signal(sig, SIG_DFL);  // return: the raise (or the access) repeats under the default action
    return;
  }
  const bool fault = info != nullptr && info->si_code > 0;
  const uintptr_t addr = fault ? reinterpret_cast<uintptr_t>(info->si_addr) : 0;
  if (fault && t_returned.valid && addr == t_returned.addr && monotonic_ns() - t_returned.ns < 1000000000) {
    signal(sig, SIG_DFL);  // return: the access repeats under the default action
    return;
  }
  t_forwarding = true;
  if (g_previous.sa_flags & SA_SIGINFO) {
    if (g_previous.sa_sigaction) g_previous.sa_sigaction(sig, info, ctx);
  } else if (g_previous.sa_handler != SIG_DFL && g_previous.sa_handler != SIG_IGN) {
    g_previous.sa_handler(sig);
  } else if (fault) {
    signal(sig, SIG_DFL);  // return: the faulting access repeats and the default action ends the process (as the
                           // kernel does for a fault under SIG_IGN)
  } else if (g_previous.sa_handler == SIG_DFL) {
    signal(sig, SIG_DFL);  // a kill -BUS: returning lost it (an audit); its default action, now
    raise(sig);
  }  // else a kill -BUS the process ignores: ignored still
  t_forwarding = false;
  if (fault) t_returned = {addr, monotonic_ns(), true};
}

void on_sigbus(int sig, siginfo_t* info, void* ctx) {
  const uintptr_t addr = reinterpret_cast<uintptr_t>(info->si_addr);
  for (auto& r : g_ranges) {
    const uintptr_t b = r.begin.load(std::memory_order_acquire), e = r.end.load(std::memory_order_acquire);
    if (b == 0 || addr < b || addr >= e) continue;
    const uintptr_t page = uintptr_t(sysconf(_SC_PAGESIZE));
    const uintptr_t start = addr & ~(page - 1);
    void* p = mmap(reinterpret_cast<void*>(start), e - start, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED,
                   -1, 0);
    if (p == MAP_FAILED) break;  // cannot patch it: let the previous handler deal with it
    g_last_fault.store(addr);
    g_hits.fetch_add(1);
    return;
  }
  forward(sig, info, ctx);
}

bool ours_in_front() {
  struct sigaction now;
  sigaction(SIGBUS, nullptr, &now);
  return (now.sa_flags & SA_SIGINFO) && now.sa_sigaction == on_sigbus;
}

// (Re)installs the handler if someone replaced it since; keeps what was there to forward to. g_mu held.
void install_locked() {
  if (ours_in_front()) return;
  struct sigaction sa = {};
  sa.sa_sigaction = on_sigbus;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
  sigemptyset(&sa.sa_mask);
  if (sigaction(SIGBUS, &sa, &g_previous) != 0) throw std::runtime_error("sigaction(SIGBUS) failed");
}

void install() {
  std::lock_guard<std::mutex> lk(g_mu);
  if (g_guarded > 0) install_locked();  // (nothing guarded: the caller's own handler stays)
}

int add_range(uintptr_t begin, uint64_t length) {
  if (begin == 0 || length == 0) throw std::invalid_argument("sigbus guard: empty range");
  std::lock_guard<std::mutex> lk(g_mu);
  install_locked();
  for (int i = 0; i < kMaxRanges; ++i) {
    if (g_ranges[i].begin.load() != 0) continue;
    g_ranges[i].end.store(begin + length, std::memory_order_release);
    g_ranges[i].begin.store(begin, std::memory_order_release);
    ++g_guarded;
    return i;
  }
  throw std::runtime_error("sigbus guard: too many mapped files at once");
}

// The last range gone, the process's own SIGBUS action comes back (an audit: the handler outlived every merge and
// pool, and a kill -BUS the caller ignored then killed it), unless a handler installed since is in front (it
// forwards to ours, which forwards on: left as it is).
void remove_range(int slot) {
  if (slot < 0 || slot >= kMaxRanges) throw std::invalid_argument("sigbus guard: bad slot");
  std::lock_guard<std::mutex> lk(g_mu);
  if (g_ranges[slot].begin.load() == 0) return;
  g_ranges[slot].begin.store(0, std::memory_order_release);
  g_ranges[slot].end.store(0, std::memory_order_release);
  if (--g_guarded == 0 && ours_in_front()) sigaction(SIGBUS, &g_previous, nullptr);
}

void register_sigbus(pybind11::module_& m) {
  m.def("sigbus_guard_add", &add_range, pybind11::arg("address"), pybind11::arg("length"),
        "Guards a read-only file mapping: a SIGBUS inside it reads zeros and is counted. Returns a slot.");
  m.def("sigbus_guard_remove", &remove_range, pybind11::arg("slot"));
  m.def("sigbus_guard_install", &install,
        "Puts the handler back in front where a handler installed since replaced it (a DataLoader worker's, "
        "faulthandler's), keeping that one to forward other faults to. One sigaction query where nothing did.");
  m.def("sigbus_guard_hits", [] { return std::make_pair(g_hits.load(), g_last_fault.load()); },
        "(faults patched so far, address of the last one).");
}
PYMERGE_REGISTER(register_sigbus);

}  // namespace
}  // namespace pymerge
