// Hints to the memory system for the pool's hot path (pymerge/pool): they change no value.
//
// advise_huge_pages: the pool reads each checkpoint's buffer once per materialize, front to back.
// On 4 KiB pages that is a TLB miss every 4 KiB of every stream (a page walk, nested in a VM);
// on 2 MiB pages almost none, and the misses it no longer takes leave the TLB to the rest.
//
// prefetch: before each call the pool checks every target tensor (its address) and bumps its
// version counter: a few torch objects per tensor, which the previous call's streaming evicted.
// Python reads them one dependent miss after another; prefetching them all first overlaps the misses.
#include <sys/mman.h>
#include <pybind11/numpy.h>
#include <cstdint>
#include "cpu/common.h"

namespace py = pybind11;

namespace pymerge {
namespace {

constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
constexpr int kPrefetchBytes = 256;  // per object: a TensorImpl spans about this much

// madvise(MADV_HUGEPAGE) over the 2 MiB pages inside [address, address + nbytes) (none: nothing).
// Returns the bytes advised; the kernel gives huge pages only to pages not touched yet.
uint64_t advise_huge_pages(uintptr_t address, uint64_t nbytes) {
#ifdef MADV_HUGEPAGE
  const uintptr_t begin = (address + kHugePage - 1) & ~(kHugePage - 1), end = (address + nbytes) & ~(kHugePage - 1);
  if (end <= begin || madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE) != 0) return 0;
  return end - begin;
#else
  return 0;
#endif
}

// Prefetches the first kPrefetchBytes at every address. A prefetch never faults, whatever the address.
void prefetch(py::array_t<uint64_t, py::array::c_style | py::array::forcecast> addresses) {
  const uint64_t* a = addresses.data();
  for (py::ssize_t i = 0; i < addresses.size(); ++i)
    for (int b = 0; b < kPrefetchBytes; b += 64) __builtin_prefetch(reinterpret_cast<const char*>(a[i]) + b);
}

void register_memory_hints(py::module_& m) {
  m.def("advise_huge_pages", &advise_huge_pages, py::arg("address"), py::arg("nbytes"),
        "Asks for 2 MiB pages inside [address, address + nbytes) (not yet touched); returns the bytes advised.");
  m.def("prefetch", &prefetch, py::arg("addresses"),
        "Prefetches the first 256 bytes at every address (uint64 array); a hint, it never faults.");
}

PYMERGE_REGISTER(register_memory_hints);

}  // namespace
}  // namespace pymerge
