// Exact rank selection on |x - base| without sorting, O(n).
//
// Big tensors: a sample of the keys (64 runs of 256 elements spread over the tensor) brackets the
// wanted rank between two keys [lo, hi]; one pass counts the keys below lo and histograms those in
// [lo, hi] (exact keys when the bracket is narrow; else 65536 bins, and a second pass inside the bin
// that holds the rank). When the bracket is a single key (the usual case when many |d| are equal, as
// with bfloat16 checkpoints) the pass only counts, vectorized, and keeps per-block tie counts, so
// finding the boundary's index reads one block more. A bracket the sample got wrong costs one pass
// and the search continues over every key. Smaller tensors: a two-level radix histogram over the
// float bits (15 high bits, then 16 low bits of the candidates' bucket); the smallest, an nth_element.
//
// Order: "ascending" ranks elements by (|d|, index); "descending" by (-|d|, index) -- in both,
// equal magnitudes go lowest index first, exactly like a stable sort in that direction.
// For rank r the answer is a boundary (T, I): the r elements before rank r are those whose key is
// strictly before T, plus the elements with key == T and index < I. A third, partial pass finds I
// only when the boundary falls inside a run of ties.
#include <pybind11/stl.h>
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <utility>
#include "cpu/tv_common.h"

namespace py = pybind11;

namespace pymerge {
namespace {

using tv::kBlock;
constexpr int64_t kBracketMin = int64_t(1) << 17;  // below this, the radix histogram

struct SelectArgs {
  uintptr_t x, b;  // b == 0: no base, d = x
  int xdt, bdt;
  int64_t numel;
  uint32_t flip;   // 0 ascending, 0x7fffffff descending (complements the 31-bit key)
  int threads;
};

// keys[0..n) of the block starting at `start`, in the selection order's key space.
inline void block_keys(const SelectArgs& a, int64_t start, int64_t n, float* __restrict xb, float* __restrict bb,
                       uint32_t* __restrict keys) {
  tv::load_f32(a.x, a.xdt, start, n, xb);
  if (a.b) {
    tv::load_f32(a.b, a.bdt, start, n, bb);
    for (int64_t i = 0; i < n; ++i) keys[i] = tv::mag_key(xb[i] - bb[i]) ^ a.flip;
  } else {
    for (int64_t i = 0; i < n; ++i) keys[i] = tv::mag_key(xb[i]) ^ a.flip;
  }
}

struct Buf { float xb[kBlock], bb[kBlock]; uint32_t keys[kBlock]; };

// Per-block kernels, built three times (PM_AVX512, PM_AVX2, PM_PLAIN); parallel_for hands them whole blocks.
// hist[key >> shift & mask] over keys with (key >> match_shift) == match (match < 0: all keys).
template <int Dummy>
inline void hist_block(const SelectArgs& a, int64_t start, uint32_t* __restrict h, int shift, uint32_t mask,
                       int64_t match, int match_shift, Buf& w) {
  const int64_t n = std::min(kBlock, a.numel - start);
  block_keys(a, start, n, w.xb, w.bb, w.keys);
  if (match < 0) {
    for (int64_t i = 0; i < n; ++i) ++h[(w.keys[i] >> shift) & mask];
  } else {
    for (int64_t i = 0; i < n; ++i)
      if (int64_t(w.keys[i] >> match_shift) == match) ++h[(w.keys[i] >> shift) & mask];
  }
}

template <int Dummy>
inline int64_t count_block(const SelectArgs& a, int64_t start, uint32_t t, Buf& w) {
  const int64_t n = std::min(kBlock, a.numel - start);
  block_keys(a, start, n, w.xb, w.bb, w.keys);
  int64_t c = 0;
  for (int64_t i = 0; i < n; ++i) c += w.keys[i] == t;
  return c;
}

// One block of a bracket pass: below += #keys < lo; lo == hi: eq[block] = #keys == lo; otherwise
// h[(key - lo) >> shift] for keys in [lo, hi].
template <int Dummy>
inline void bracket_block(const SelectArgs& a, int64_t start, uint32_t lo, uint32_t hi, int shift,
                          uint32_t* __restrict h, int64_t& below, int32_t* eq, Buf& w) {
  const int64_t n = std::min(kBlock, a.numel - start);
  block_keys(a, start, n, w.xb, w.bb, w.keys);
  const uint32_t* __restrict k = w.keys;
  int32_t c = 0;
  if (lo == hi) {
    int32_t e = 0;
    for (int64_t i = 0; i < n; ++i) { c += k[i] < lo; e += k[i] == lo; }
    *eq = e;
  } else {
    const uint32_t width = hi - lo;
    for (int64_t i = 0; i < n; ++i) {
      c += k[i] < lo;
      const uint32_t off = k[i] - lo;
      if (off <= width) ++h[off >> shift];
    }
  }
  below += c;
}

using HistFn = void (*)(const SelectArgs&, int64_t, uint32_t*, int, uint32_t, int64_t, int, Buf&);
using CountFn = int64_t (*)(const SelectArgs&, int64_t, uint32_t, Buf&);
PM_AVX512 void hist_avx512(const SelectArgs& a, int64_t s, uint32_t* h, int sh, uint32_t m, int64_t mt, int ms, Buf& w) { hist_block<0>(a, s, h, sh, m, mt, ms, w); }
PM_AVX2 void hist_avx2(const SelectArgs& a, int64_t s, uint32_t* h, int sh, uint32_t m, int64_t mt, int ms, Buf& w) { hist_block<2>(a, s, h, sh, m, mt, ms, w); }
PM_PLAIN void hist_plain(const SelectArgs& a, int64_t s, uint32_t* h, int sh, uint32_t m, int64_t mt, int ms, Buf& w) { hist_block<1>(a, s, h, sh, m, mt, ms, w); }
PM_AVX512 int64_t count_avx512(const SelectArgs& a, int64_t s, uint32_t t, Buf& w) { return count_block<0>(a, s, t, w); }
PM_AVX2 int64_t count_avx2(const SelectArgs& a, int64_t s, uint32_t t, Buf& w) { return count_block<2>(a, s, t, w); }
PM_PLAIN int64_t count_plain(const SelectArgs& a, int64_t s, uint32_t t, Buf& w) { return count_block<1>(a, s, t, w); }
using BracketFn = void (*)(const SelectArgs&, int64_t, uint32_t, uint32_t, int, uint32_t*, int64_t&, int32_t*, Buf&);
PM_AVX512 void bracket_avx512(const SelectArgs& a, int64_t s, uint32_t lo, uint32_t hi, int sh, uint32_t* h, int64_t& b, int32_t* eq, Buf& w) { bracket_block<0>(a, s, lo, hi, sh, h, b, eq, w); }
PM_AVX2 void bracket_avx2(const SelectArgs& a, int64_t s, uint32_t lo, uint32_t hi, int sh, uint32_t* h, int64_t& b, int32_t* eq, Buf& w) { bracket_block<2>(a, s, lo, hi, sh, h, b, eq, w); }
PM_PLAIN void bracket_plain(const SelectArgs& a, int64_t s, uint32_t lo, uint32_t hi, int sh, uint32_t* h, int64_t& b, int32_t* eq, Buf& w) { bracket_block<1>(a, s, lo, hi, sh, h, b, eq, w); }

// Histogram passes split the blocks into at most 4 chunks per thread (of at least 16 blocks), and
// each chunk counts into its own slot (slot = chunk index); the slots are summed in index order.
// The counts are integers, so the total is the same whichever thread ran which chunk.
int64_t slot_grain(const SelectArgs& a, int64_t n_blocks) {
  const int64_t chunks = 4 * int64_t(a.threads);
  return std::max<int64_t>(16, (n_blocks + chunks - 1) / chunks);
}

void histogram(const SelectArgs& a, int shift, uint32_t mask, int64_t match, int match_shift, std::vector<int64_t>& total) {
  const int64_t n_blocks = (a.numel + kBlock - 1) / kBlock;
  const size_t bins = size_t(mask) + 1;
  const HistFn fn = tv::pick(hist_avx512, hist_avx2, hist_plain);
  const int64_t grain = slot_grain(a, n_blocks);
  std::vector<std::vector<uint32_t>> per(size_t((n_blocks + grain - 1) / grain));
  parallel_for(n_blocks, grain, a.threads, [&](int64_t b0, int64_t b1) {
    // uint32 counters per slot: a slot sees far fewer than 2^32 elements of one tensor.
    std::vector<uint32_t>& h = per[b0 / grain];
    h.assign(bins, 0);
    Buf w;
    for (int64_t blk = b0; blk < b1; ++blk) fn(a, blk * kBlock, h.data(), shift, mask, match, match_shift, w);
  });
  total.assign(bins, 0);
  for (auto& h : per)
    for (size_t i = 0; i < h.size(); ++i) total[i] += h[i];
}

// Index of the j-th (0-based) element whose key equals t, in index order: tie counts per chunk in
// parallel, then a serial walk inside the one chunk that holds it.
// Index of the j-th tie inside the block starting at `start` (the caller knows it is there).
int64_t tie_in_block(const SelectArgs& a, int64_t start, uint32_t t, int64_t j) {
  Buf w;
  const int64_t n = std::min(kBlock, a.numel - start);
  block_keys(a, start, n, w.xb, w.bb, w.keys);
  for (int64_t i = 0; i < n; ++i)
    if (w.keys[i] == t && j-- == 0) return start + i;
  throw std::logic_error("select: tie not found");
}

int64_t nth_tie(const SelectArgs& a, uint32_t t, int64_t j) {
  constexpr int64_t kChunk = 64 * kBlock;
  const int64_t n_chunks = (a.numel + kChunk - 1) / kChunk;
  const CountFn count = tv::pick(count_avx512, count_avx2, count_plain);
  if (a.threads == 1) {  // one thread: walk from the start and stop at the tie (half a pass on average)
    Buf w;
    for (int64_t start = 0; start < a.numel; start += kBlock) {
      const int64_t c = count(a, start, t, w);
      if (j < c) return tie_in_block(a, start, t, j);
      j -= c;
    }
    throw std::logic_error("select: tie index out of range");
  }
  std::vector<int64_t> counts(n_chunks, 0);
  parallel_for(n_chunks, 1, a.threads, [&](int64_t c0, int64_t c1) {
    Buf w;
    for (int64_t c = c0; c < c1; ++c) {
      int64_t cnt = 0;
      for (int64_t start = c * kChunk; start < std::min(a.numel, (c + 1) * kChunk); start += kBlock)
        cnt += count(a, start, t, w);
      counts[c] = cnt;
    }
  });
  int64_t c = 0;
  for (; c < n_chunks && j >= counts[c]; ++c) j -= counts[c];
  if (c == n_chunks) throw std::logic_error("select: tie index out of range");
  Buf w;
  for (int64_t start = c * kChunk; start < std::min(a.numel, (c + 1) * kChunk); start += kBlock) {
    const int64_t n = std::min(kBlock, a.numel - start);
    block_keys(a, start, n, w.xb, w.bb, w.keys);
    for (int64_t i = 0; i < n; ++i)
      if (w.keys[i] == t && j-- == 0) return start + i;
  }
  throw std::logic_error("select: tie not found");
}

// Finds the bin holding rank r: returns (bin, number of elements in lower bins).
std::pair<int64_t, int64_t> locate(const std::vector<int64_t>& h, int64_t r) {
  int64_t before = 0;
  for (size_t i = 0; i < h.size(); ++i) {
    if (r < before + h[i]) return {int64_t(i), before};
    before += h[i];
  }
  throw std::logic_error("select: rank beyond histogram");
}

// Keys of 64 runs of 256 elements spread evenly over the tensor, sorted.
std::vector<uint32_t> sample_keys(const SelectArgs& a) {
  constexpr int64_t kRun = 256, kRuns = 64;
  std::vector<uint32_t> s;
  s.reserve(kRun * kRuns);
  Buf w;
  for (int64_t g = 0; g < kRuns; ++g) {
    const int64_t start = (a.numel - kRun) * g / (kRuns - 1);
    block_keys(a, start, kRun, w.xb, w.bb, w.keys);
    s.insert(s.end(), w.keys, w.keys + kRun);
  }
  std::sort(s.begin(), s.end());
  return s;
}

// Rank r (0 <= r < numel) by bracket passes (see the file comment); keys in the selection order.
std::pair<uint32_t, int64_t> select_bracketed(const SelectArgs& a, int64_t r) {
  const int64_t n_blocks = (a.numel + kBlock - 1) / kBlock;
  const BracketFn fn = tv::pick(bracket_avx512, bracket_avx2, bracket_plain);
  uint32_t lo, hi;
  {
    const std::vector<uint32_t> s = sample_keys(a);
    const int64_t m = int64_t(s.size());
    const double q = double(r) / double(a.numel);
    const int64_t pos = int64_t(q * double(m));
    const int64_t delta = int64_t(4.0 * std::sqrt(double(m) * q * (1.0 - q))) + 16;
    lo = pos - delta <= 0 ? 0u : s[pos - delta];
    hi = pos + delta >= m - 1 ? 0x7fffffffu : s[pos + delta];
  }
  std::vector<int32_t> eq(n_blocks, 0);
  const int64_t grain = slot_grain(a, n_blocks);
  const int64_t n_slots = (n_blocks + grain - 1) / grain;
  std::vector<std::vector<uint32_t>> per(static_cast<size_t>(n_slots));  // one histogram per chunk (see slot_grain)
  std::vector<int64_t> below_per(static_cast<size_t>(n_slots));
  for (int pass = 0; pass < 8; ++pass) {
    const uint32_t width = hi - lo;
    int shift = 0;
    while ((uint64_t(width) >> shift) >= 65536) ++shift;
    const size_t bins = lo == hi ? 1 : size_t(width >> shift) + 1;
    for (auto& h : per) h.clear();  // slots a pass leaves untouched must not add stale counts
    std::fill(below_per.begin(), below_per.end(), 0);
    parallel_for(n_blocks, grain, a.threads, [&](int64_t b0, int64_t b1) {
      std::vector<uint32_t>& h = per[b0 / grain];
      h.assign(bins, 0);
      int64_t bl = 0;
      Buf w;
      for (int64_t blk = b0; blk < b1; ++blk) fn(a, blk * kBlock, lo, hi, shift, h.data(), bl, eq.data() + blk, w);
      below_per[b0 / grain] = bl;
    });
    int64_t below = 0;
    for (int64_t v : below_per) below += v;
    int64_t inside = 0;
    std::vector<int64_t> total;
    if (lo == hi) {
      for (int32_t e : eq) inside += e;
    } else {
      total.assign(bins, 0);
      for (auto& h : per)
        for (size_t i = 0; i < h.size(); ++i) total[i] += h[i];
      for (int64_t c : total) inside += c;
    }
    if (r < below || r >= below + inside) {  // the sample missed: search every key
      if (lo == 0 && hi == 0x7fffffffu) throw std::logic_error("select: rank outside every key");
      lo = 0; hi = 0x7fffffffu;
      continue;
    }
    if (lo == hi) {  // the rank is inside the run of keys == lo; per-block counts find its index
      int64_t j = r - below;
      if (j == 0) return {lo, 0};
      int64_t b = 0;
      for (; j >= eq[b]; ++b) j -= eq[b];
      return {lo, tie_in_block(a, b * kBlock, lo, j)};
    }
    auto [bin, before] = locate(total, r - below);
    if (shift == 0) {
      const uint32_t t = lo + uint32_t(bin);
      const int64_t j = r - below - before;
      return {t, j == 0 ? 0 : nth_tie(a, t, j)};
    }
    const uint32_t new_lo = lo + (uint32_t(bin) << shift);
    hi = uint32_t(std::min<uint64_t>(hi, uint64_t(new_lo) + (uint64_t(1) << shift) - 1));
    lo = new_lo;
  }
  throw std::logic_error("select: bracket passes did not converge");
}

// Tensors of at most kSortMax elements: one nth_element over (key << 32 | index) per rank, O(n): zeroing
// and scanning the radix histograms' 96K bins cost ~120 us whatever the size (12x torch.kthvalue at 64
// elements). The key's bits and the index order the pairs as the selection orders elements.
constexpr int64_t kSortMax = 4096;

std::pair<int64_t, int64_t> select_small(const SelectArgs& a, int64_t r, std::vector<uint64_t>& pairs) {
  if (pairs.empty()) {
    Buf w;
    for (int64_t s = 0; s < a.numel; s += kBlock) {
      const int64_t n = std::min(kBlock, a.numel - s);
      block_keys(a, s, n, w.xb, w.bb, w.keys);
      for (int64_t i = 0; i < n; ++i) pairs.push_back(uint64_t(w.keys[i]) << 32 | uint64_t(s + i));
    }
  }
  std::nth_element(pairs.begin(), pairs.begin() + r, pairs.end());  // any arrangement: reused for every rank
  const uint64_t t = pairs[r] >> 32;
  const bool first_tie = std::none_of(pairs.begin(), pairs.begin() + r, [t](uint64_t e) { return e >> 32 == t; });
  return {int64_t(uint32_t(t) ^ a.flip), first_tie ? 0 : int64_t(pairs[r] & 0xffffffffu)};  // as nth_tie's j == 0
}

// For each rank r in [0, numel]: (T, I) in the caller's key space (|d| bits), see the file comment.
// Descending boundaries use T = -1 for "every element" (r == numel); ascending use T = 2^31.
std::vector<std::pair<int64_t, int64_t>> select_ranks(uintptr_t x, int xdt, uintptr_t b, int bdt, int64_t numel,
                                                      const std::vector<int64_t>& ranks, bool descending,
                                                      int num_threads) {
  for (int dt : {xdt, bdt}) if (dt < F32 || dt > F8E5M2) throw std::invalid_argument("select: bad dtype code");
  SelectArgs a{x, b, xdt, bdt, numel, descending ? 0x7fffffffu : 0u, 1};
  const int64_t n_blocks = std::max<int64_t>(1, (numel + kBlock - 1) / kBlock);
  a.threads = int(std::max<int64_t>(1, std::min<int64_t>(num_threads > 0 ? num_threads : default_threads(), n_blocks)));
  std::vector<std::pair<int64_t, int64_t>> result;
  std::vector<int64_t> high;
  std::vector<uint64_t> pairs;
  for (int64_t r : ranks) {
    if (r < 0 || r > numel) throw std::invalid_argument("select: rank out of range");
    if (r == numel) { result.push_back({descending ? -1 : (int64_t(1) << 31), 0}); continue; }
    if (numel <= kSortMax) {
      result.push_back(select_small(a, r, pairs));
      continue;
    }
    if (numel >= kBracketMin) {
      auto [t, idx] = select_bracketed(a, r);
      result.push_back({int64_t(t ^ a.flip), idx});
      continue;
    }
    if (high.empty()) histogram(a, 16, 0x7fff, -1, 0, high);          // keys are 31 bits: 15 high bits
    auto [hb, before_hi] = locate(high, r);
    std::vector<int64_t> low;
    histogram(a, 0, 0xffff, hb, 16, low);                              // 16 low bits of that bucket
    auto [lb, before_lo] = locate(low, r - before_hi);
    const uint32_t t = uint32_t(hb << 16 | lb);
    const int64_t j = r - before_hi - before_lo;                    // ties at t that precede rank r
    const int64_t idx = j == 0 ? 0 : nth_tie(a, t, j);
    result.push_back({int64_t(t ^ a.flip), idx});
  }
  return result;
}

void register_select(py::module_& m) {
  m.def("select_ranks", &select_ranks, py::arg("x"), py::arg("x_dtype"), py::arg("base"), py::arg("base_dtype"),
        py::arg("numel"), py::arg("ranks"), py::arg("descending"), py::arg("num_threads") = 0,
        py::call_guard<py::gil_scoped_release>(),
        "Exact rank boundaries (key, index) of |x - base| (base 0: |x|) by radix histogram.");
}

PYMERGE_REGISTER(register_select);

}  // namespace
}  // namespace pymerge
