// Task-vector merges (ties, dare_*, breadcrumbs*, della*, task_arithmetic) in one fused pass:
//   d_i = x_i - B; keep_i by the model's sparsifier; v_i = keep_i ? (d_i * r_i) * w_i : d_i * 0
//   consensus: s = sign(sum v_i) (>= 0 -> +1); m_i = sign(v_i) == s; mixed = sum v_i m_i,
//              divisor = sum w_i m_i (0 -> 1); otherwise mixed = sum v_i, divisor given
//   optional mixed /= divisor; mixed *= lambda; out = B + mixed, rounded once to the output dtype.
// Each input element is read once, in blocks that stay in L1; nothing per element is stored.
// The "d * 0" for dropped elements keeps mergekit's NaN propagation (its masks multiply).
//
// Sparsifier modes (per model, csrc/codes.h):
//   0 none, 5 drop all,
//   1 top-k: keep (|d|, -index) before boundary hi, i.e. |d| > T or (|d| == T and index < I)
//   2 range: keep ascending (|d|, index) in [lo, hi) (breadcrumbs' magnitude_outliers)
//   3 random: keep iff Philox draw < thr (DARE)
//   4 bits: keep iff bit e of a precomputed bitmask (DELLA, see della_mask below)
// Also here: the L1 norms the rescale needs, and DELLA's per-row rank-based mask.
#include <pybind11/numpy.h>
#include <pybind11/stl.h>
#include <algorithm>
#include <cmath>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <utility>
#include "cpu/exact_sum.h"
#include "cpu/tv_common.h"

namespace py = pybind11;

namespace pymerge {
namespace {

using tv::kBlock;

struct Model {
  uintptr_t x; int dt; int mode;
  int64_t t_lo, i_lo, t_hi, i_hi;  // boundaries (key, index)
  uint64_t thr;                    // random: keep iff draw < thr
  uintptr_t bits;                  // bits: uint64 words, bit e = keep element e
  float scale, weight;             // rescale factor r_i and weight w_i
  tv::PhiloxKey key;
};

// keep[0..n) (0/1 floats) for elements e0 .. e0+n-1 whose deltas are d[0..n).
inline void compute_keep(const Model& m, const float* __restrict d, int64_t e0, int64_t n, float* __restrict keep,
                         uint32_t* __restrict bits, uint32_t* __restrict scratch) {
  switch (m.mode) {
    case NONE: for (int64_t i = 0; i < n; ++i) keep[i] = 1.f; break;
    case ZERO: for (int64_t i = 0; i < n; ++i) keep[i] = 0.f; break;
    case TOPK: {
      // 32-bit compares only (vectorizes): keys are < 2^31, t_hi in [-1, 2^31), and the index test
      // becomes a local one, j < lim.
      if (m.t_hi < 0) { for (int64_t i = 0; i < n; ++i) keep[i] = 1.f; break; }
      const uint32_t t = uint32_t(m.t_hi);
      const int32_t lim = int32_t(std::clamp<int64_t>(m.i_hi - e0, 0, n));
      for (int32_t i = 0; i < int32_t(n); ++i) {
        const uint32_t k = tv::mag_key(d[i]);
        keep[i] = (k > t || (k == t && i < lim)) ? 1.f : 0.f;
      }
      break;
    }
    case RANGE: {
      // ascending boundaries: t in [0, 2^31] fits uint32
      const uint32_t tl = uint32_t(m.t_lo), th = uint32_t(m.t_hi);
      const int32_t ll = int32_t(std::clamp<int64_t>(m.i_lo - e0, 0, n));
      const int32_t lh = int32_t(std::clamp<int64_t>(m.i_hi - e0, 0, n));
      for (int32_t i = 0; i < int32_t(n); ++i) {
        const uint32_t k = tv::mag_key(d[i]);
        const bool below_hi = k < th || (k == th && i < lh);
        const bool below_lo = k < tl || (k == tl && i < ll);
        keep[i] = (below_hi && !below_lo) ? 1.f : 0.f;
      }
      break;
    }
    case RANDOM:
      tv::philox_bits(m.key, e0, n, bits, scratch);
      for (int64_t i = 0; i < n; ++i) keep[i] = uint64_t(bits[i]) < m.thr ? 1.f : 0.f;
      break;
    default: {
      const uint64_t* w = reinterpret_cast<const uint64_t*>(m.bits);
      for (int64_t i = 0; i < n; ++i) keep[i] = float((w[(e0 + i) >> 6] >> ((e0 + i) & 63)) & 1u);
    }
  }
}

struct MergeArgs {
  std::vector<Model> models;
  uintptr_t base; int bdt;
  uintptr_t out; int odt;
  int64_t numel, offset;
  bool consensus, normalize;
  float lam, divisor;
  int threads;
};

// Per-thread buffers of the fused pass.
struct Scratch {
  std::vector<float> v;  // n_models x kBlock weighted, sparsified deltas
  float bb[kBlock], d[kBlock], keep[kBlock], mixed[kBlock], div[kBlock], s[kBlock];
  uint32_t bits[kBlock], rnd[kBlock + 8];
};

// d[0..n) = float32(x[start ..]) - bb[0..n), the conversion and the subtraction in one loop.
inline void load_delta(uintptr_t x, int dt, int64_t start, int64_t n, const float* __restrict bb,
                       float* __restrict d) {
  if (dt == BF16) {
    const uint16_t* s = reinterpret_cast<const uint16_t*>(tv::byte_at(x, start, dt));
    for (int64_t i = 0; i < n; ++i) d[i] = bits_to_f32(uint32_t(s[i]) << 16) - bb[i];
  } else if (dt == F32) {
    const float* s = reinterpret_cast<const float*>(tv::byte_at(x, start, dt));
    for (int64_t i = 0; i < n; ++i) d[i] = s[i] - bb[i];
  } else {
    tv::load_f32(x, dt, start, n, d);
    for (int64_t i = 0; i < n; ++i) d[i] -= bb[i];
  }
}

// One block of the fused pass, built three times (PM_AVX512, PM_AVX2, PM_PLAIN); parallel_for hands out whole blocks.
// The common sparsifiers (none, top-k, drop all) compute v_i in the loop that forms d_i, and the
// consensus sum is accumulated there too; the others go through a keep buffer.
template <int Dummy>
inline void merge_block(const MergeArgs& a, int64_t start, Scratch& w) {
  const int64_t n_models = int64_t(a.models.size());
  const int64_t n = std::min(kBlock, a.numel - start), e0 = a.offset + start;
  float* __restrict bb = w.bb;
  float* __restrict d = w.d;
  float* __restrict mixed = w.mixed;
  float* __restrict div = w.div;
  float* __restrict s = w.s;
  tv::load_f32(a.base, a.bdt, start, n, bb);
  if (a.consensus) for (int64_t j = 0; j < n; ++j) s[j] = 0.f;
  for (int64_t i = 0; i < n_models; ++i) {
    const Model& m = a.models[i];
    float* __restrict vi = w.v.data() + i * kBlock;
    load_delta(m.x, m.dt, start, n, bb, d);
    const float r = m.scale, wt = m.weight;
    if (m.mode == NONE) {
      for (int64_t j = 0; j < n; ++j) vi[j] = (d[j] * r) * wt;
    } else if (m.mode == ZERO) {
      for (int64_t j = 0; j < n; ++j) vi[j] = d[j] * 0.f;
    } else if (m.mode == TOPK && m.t_hi >= 0) {
      // 32-bit compares only (vectorizes): keys are < 2^31, and the index test is a local one.
      const uint32_t t = uint32_t(m.t_hi);
      const int32_t lim = int32_t(std::clamp<int64_t>(m.i_hi - e0, 0, n));
      for (int32_t j = 0; j < int32_t(n); ++j) {
        const uint32_t k = tv::mag_key(d[j]);
        const bool keep = k > t || (k == t && j < lim);
        vi[j] = keep ? (d[j] * r) * wt : d[j] * 0.f;
      }
    } else {
      compute_keep(m, d, e0, n, w.keep, w.bits, w.rnd);
      const float* __restrict keep = w.keep;
      for (int64_t j = 0; j < n; ++j) vi[j] = keep[j] != 0.f ? (d[j] * r) * wt : d[j] * 0.f;
    }
    if (a.consensus) for (int64_t j = 0; j < n; ++j) s[j] += vi[j];
  }
  if (a.consensus) {
    for (int64_t j = 0; j < n; ++j) { mixed[j] = 0.f; div[j] = 0.f; }
    for (int64_t i = 0; i < n_models; ++i) {
      const float* __restrict vi = w.v.data() + i * kBlock;
      const float wt = a.models[i].weight;
      for (int64_t j = 0; j < n; ++j) {
        // elected sign +1 where the sum is >= 0 (NaN elects -1); zeros and NaNs never agree
        // (a multiply, not a select: mergekit's mask product turns a dropped NaN or inf into NaN)
        const float agree = (s[j] >= 0.f ? vi[j] > 0.f : vi[j] < 0.f) ? 1.f : 0.f;
        mixed[j] += vi[j] * agree;
        div[j] += wt * agree;
      }
    }
    if (a.normalize) {
      for (int64_t j = 0; j < n; ++j) mixed[j] /= (div[j] == 0.f ? 1.f : div[j]);
    }
  } else {
    for (int64_t j = 0; j < n; ++j) mixed[j] = 0.f;
    for (int64_t i = 0; i < n_models; ++i) {
      const float* __restrict vi = w.v.data() + i * kBlock;
      for (int64_t j = 0; j < n; ++j) mixed[j] += vi[j];
    }
    if (a.normalize) for (int64_t j = 0; j < n; ++j) mixed[j] /= a.divisor;
  }
  if (a.lam != 1.f) for (int64_t j = 0; j < n; ++j) mixed[j] *= a.lam;
  for (int64_t j = 0; j < n; ++j) mixed[j] += bb[j];
  tv::store_f32(a.out, a.odt, start, n, mixed);
}

// Adds one block's |d| and |d * keep| to exact sums (csrc/cpu/exact_sum.h); a: kBlock doubles.
template <int Isa>
inline void l1_block(const Model& m, uintptr_t base, int bdt, int64_t numel, int64_t offset, int64_t start,
                     Scratch& w, double* __restrict a, exact::Acc& total, exact::Acc& kept) {
  const int64_t n = std::min(kBlock, numel - start);
  float* __restrict d = w.d;
  tv::load_f32(base, bdt, start, n, w.bb);
  tv::load_f32(m.x, m.dt, start, n, d);
  for (int64_t j = 0; j < n; ++j) d[j] -= w.bb[j];
  compute_keep(m, d, offset + start, n, w.keep, w.bits, w.rnd);
  for (int64_t j = 0; j < n; ++j) a[j] = std::fabs(double(d[j]));
  total.template add_block<Isa>(a, n);
  for (int64_t j = 0; j < n; ++j) a[j] = w.keep[j] != 0.f ? a[j] : 0.0;
  kept.template add_block<Isa>(a, n);
}

constexpr int64_t kShortRow = 64;  // rows up to this long: one comparison sort (the radix histograms cost more)

struct RowScratch {
  std::vector<float> d, bb;
  std::vector<uint64_t> order, spare;  // |d|'s key in the high word, the column in the low (sort_by_key)
  std::vector<uint32_t> hist, rank, bits, rnd;
  std::vector<double> a, k;  // |d| and |d * keep| of up to exact::kMaxBlock elements
  explicit RowScratch(int64_t cols)
      : d(cols), bb(cols), order(cols), spare(cols > kShortRow ? cols : 0), hist(cols > kShortRow ? 4096 : 0),
        rank(cols), bits(cols), rnd(cols + 8), a(exact::kMaxBlock), k(exact::kMaxBlock) {}
};

// Sorts v[0, n) ascending (keys in the high words, distinct columns in the low: the stable order of the keys) into
// v or spare, and returns which. Short rows: one comparison sort. Longer: an LSD radix sort of the keys' 31 bits,
// 11/10/10 per pass, reading (key, column) pairs in order (gathering each key by its column missed the cache on
// long rows), its three histograms counted in one read, and a pass whose digit every key shares skipped.
inline const uint64_t* sort_by_key(uint64_t* v, uint64_t* spare, int64_t n, uint32_t* hist) {
  if (n <= kShortRow) {
    std::sort(v, v + n);
    return v;
  }
  uint32_t* count[3] = {hist, hist + 2048, hist + 3072};
  std::fill(hist, hist + 4096, 0u);
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t key = uint32_t(v[i] >> 32);
    ++count[0][key & 2047];
    ++count[1][(key >> 11) & 1023];
    ++count[2][(key >> 21) & 1023];
  }
  uint64_t* src = v;
  uint64_t* dst = spare;
  for (int pass = 0, shift = 32; pass < 3; shift += pass == 0 ? 11 : 10, ++pass) {
    const uint32_t mw = pass == 0 ? 2047 : 1023;
    uint32_t* at = count[pass];
    if (at[uint32_t(src[0] >> shift) & mw] == uint32_t(n)) continue;  // one digit for all: the order stands
    for (uint32_t b = 0, sum = 0; b <= mw; ++b) {
      const uint32_t c = at[b];
      at[b] = sum;
      sum += c;
    }
    for (int64_t i = 0; i < n; ++i) {
      const uint64_t x = src[i];
      dst[at[uint32_t(x >> shift) & mw]++] = x;
    }
    std::swap(src, dst);
  }
  return src;
}

// DELLA, one row: ascending stable rank of |d| (sort_by_key), keep element c iff its draw < thr[rank]. Draws
// are those of element offset + r * cols + c (a shard's rows at their global index); the mask and the sums are of
// the local elements. Bits are OR-ed into a zeroed uint64 bitmask (rows may share a word, hence the atomic OR).
// Adds the row's |d| and |d * keep| to exact sums.
template <int Isa>
inline void della_row(const Model& m, uintptr_t base, int bdt, int64_t r, int64_t cols, int64_t offset,
                      const uint32_t* thr, uint64_t* mask, RowScratch& w, exact::Acc& total, exact::Acc& kept) {
  const int64_t start = r * cols;
  float* __restrict d = w.d.data();
  uint64_t* __restrict order = w.order.data();
  tv::load_f32(base, bdt, start, cols, w.bb.data());
  tv::load_f32(m.x, m.dt, start, cols, d);
  for (int64_t c = 0; c < cols; ++c) {
    d[c] -= w.bb[c];
    order[c] = uint64_t(tv::mag_key(d[c])) << 32 | uint64_t(c);
  }
  const uint64_t* sorted = sort_by_key(order, w.spare.data(), cols, w.hist.data());
  for (int64_t p = 0; p < cols; ++p) w.rank[uint32_t(sorted[p])] = uint32_t(p);
  uint32_t* __restrict keep = w.bits.data();  // the draws, then whether each element is kept (0 / 1)
  tv::philox_bits(m.key, offset + start, cols, keep, w.rnd.data());
  for (int64_t c = 0; c < cols; ++c) keep[c] = keep[c] < thr[w.rank[c]];
  for (int64_t c = 0; c < cols;) {  // one word at a time (the row's first and last may be partial)
    const int64_t end = std::min(cols, c + 64 - ((start + c) & 63));
    uint64_t word = 0;
    for (int64_t q = c; q < end; ++q) word |= uint64_t(keep[q]) << ((start + q) & 63);
    if (word) __atomic_fetch_or(&mask[(start + c) >> 6], word, __ATOMIC_RELAXED);
    c = end;
  }
  for (int64_t c0 = 0; c0 < cols; c0 += exact::kMaxBlock) {
    const int64_t n = std::min(exact::kMaxBlock, cols - c0);
    for (int64_t j = 0; j < n; ++j) {
      w.a[j] = std::fabs(double(d[c0 + j]));
      w.k[j] = keep[c0 + j] ? w.a[j] : 0.0;
    }
    total.template add_block<Isa>(w.a.data(), n);
    kept.template add_block<Isa>(w.k.data(), n);
  }
}

PM_AVX512 void merge_avx512(const MergeArgs& a, int64_t s, Scratch& w) { merge_block<0>(a, s, w); }
PM_AVX2 void merge_avx2(const MergeArgs& a, int64_t s, Scratch& w) { merge_block<2>(a, s, w); }
PM_PLAIN void merge_plain(const MergeArgs& a, int64_t s, Scratch& w) { merge_block<1>(a, s, w); }
using Abs = exact::Acc;
PM_AVX512 void l1_avx512(const Model& m, uintptr_t b, int bdt, int64_t n, int64_t o, int64_t s, Scratch& w, double* a, Abs& t, Abs& k) { l1_block<exact::kAvx512>(m, b, bdt, n, o, s, w, a, t, k); }
PM_AVX2 void l1_avx2(const Model& m, uintptr_t b, int bdt, int64_t n, int64_t o, int64_t s, Scratch& w, double* a, Abs& t, Abs& k) { l1_block<exact::kAvx2>(m, b, bdt, n, o, s, w, a, t, k); }
PM_PLAIN void l1_plain(const Model& m, uintptr_t b, int bdt, int64_t n, int64_t o, int64_t s, Scratch& w, double* a, Abs& t, Abs& k) { l1_block<exact::kPlain>(m, b, bdt, n, o, s, w, a, t, k); }
PM_AVX512 void della_avx512(const Model& m, uintptr_t b, int bdt, int64_t r, int64_t c, int64_t o, const uint32_t* thr, uint64_t* mk, RowScratch& w, Abs& t, Abs& k) { della_row<exact::kAvx512>(m, b, bdt, r, c, o, thr, mk, w, t, k); }
PM_AVX2 void della_avx2(const Model& m, uintptr_t b, int bdt, int64_t r, int64_t c, int64_t o, const uint32_t* thr, uint64_t* mk, RowScratch& w, Abs& t, Abs& k) { della_row<exact::kAvx2>(m, b, bdt, r, c, o, thr, mk, w, t, k); }
PM_PLAIN void della_plain(const Model& m, uintptr_t b, int bdt, int64_t r, int64_t c, int64_t o, const uint32_t* thr, uint64_t* mk, RowScratch& w, Abs& t, Abs& k) { della_row<exact::kPlain>(m, b, bdt, r, c, o, thr, mk, w, t, k); }

// Per-thread exact sums of |d| and |d * keep|, merged (integer adds: any order) into the parts
// layout: [total parts, kept parts].
struct L1Sums {
  std::mutex lock;
  std::unique_ptr<Abs> total = std::make_unique<Abs>(), kept = std::make_unique<Abs>();
  void merge(const Abs& t, const Abs& k) {
    std::lock_guard<std::mutex> g(lock);
    total->merge(t); kept->merge(k);
  }
  std::vector<int64_t> parts() const {
    std::vector<int64_t> out(2 * exact::kParts, 0);
    total->write(out.data());
    kept->write(out.data() + exact::kParts);
    return out;
  }
};

constexpr int64_t kBlocksPerChunk = 16;  // blocks claimed at a time by a thread (16K elements)

int pick_threads(int requested, int64_t work) {
  return int(std::max<int64_t>(1, std::min<int64_t>(requested > 0 ? requested : default_threads(), work)));
}

void check_dtype(int dt, bool output) {
  if (dt < F32 || dt > (output ? BF16 : F8E5M2)) throw std::invalid_argument("task_vectors: bad dtype code");
}

// One model's sparsifier, from the flat tuple Python passes:
// (ptr, dtype, mode, t_lo, i_lo, t_hi, i_hi, thr, bits_ptr, scale, weight, model_index)
using ModelSpec = std::tuple<uintptr_t, int, int, int64_t, int64_t, int64_t, int64_t, uint64_t, uintptr_t, float, float, uint32_t>;

Model make_model(const ModelSpec& s, uint64_t seed, uint32_t h0, uint32_t h1) {
  Model m;
  std::tie(m.x, m.dt, m.mode, m.t_lo, m.i_lo, m.t_hi, m.i_hi, m.thr, m.bits, m.scale, m.weight, m.key.c1) = s;
  check_dtype(m.dt, false);
  if (m.mode < NONE || m.mode > ZERO) throw std::invalid_argument("task_vectors: bad sparsifier mode");
  if (m.mode == BITS && !m.bits) throw std::invalid_argument("task_vectors: bits mode needs a bitmask");
  m.key.k0 = uint32_t(seed); m.key.k1 = uint32_t(seed >> 32); m.key.c2 = h0; m.key.c3 = h1;
  return m;
}

void tv_merge(const std::vector<ModelSpec>& models, uintptr_t base, int base_dtype, uintptr_t out, int out_dtype,
              int64_t numel, int64_t offset, bool consensus, bool normalize, float lam, float divisor,
              uint64_t seed, uint32_t h0, uint32_t h1, int num_threads) {
  if (models.empty()) throw std::invalid_argument("task_vectors: need at least one model");
  check_dtype(base_dtype, false); check_dtype(out_dtype, true);
  if (numel <= 0) return;
  MergeArgs a;
  for (auto& s : models) a.models.push_back(make_model(s, seed, h0, h1));
  a.base = base; a.bdt = base_dtype; a.out = out; a.odt = out_dtype; a.numel = numel; a.offset = offset;
  a.consensus = consensus; a.normalize = normalize; a.lam = lam; a.divisor = divisor;
  const int64_t n_blocks = (numel + kBlock - 1) / kBlock;
  const int threads = pick_threads(num_threads, n_blocks);
  auto block = tv::pick(merge_avx512, merge_avx2, merge_plain);
  parallel_for(n_blocks, kBlocksPerChunk, threads, [&](int64_t b0, int64_t b1) {
    Scratch w;
    w.v.resize(a.models.size() * kBlock);
    for (int64_t b = b0; b < b1; ++b) block(a, b * kBlock, w);
  });
}

std::vector<int64_t> tv_l1(const ModelSpec& model, uintptr_t base, int base_dtype, int64_t numel, int64_t offset,
                           uint64_t seed, uint32_t h0, uint32_t h1, int num_threads) {
  check_dtype(base_dtype, false);
  L1Sums sums;
  if (numel <= 0) return sums.parts();
  Model m = make_model(model, seed, h0, h1);
  const int64_t n_blocks = (numel + kBlock - 1) / kBlock;
  const int threads = pick_threads(num_threads, n_blocks);
  auto block = tv::pick(l1_avx512, l1_avx2, l1_plain);
  parallel_for(n_blocks, kBlocksPerChunk, threads, [&](int64_t b0, int64_t b1) {
    Scratch w;
    std::vector<double> a(kBlock);
    auto t = std::make_unique<Abs>(), k = std::make_unique<Abs>();
    for (int64_t b = b0; b < b1; ++b) block(m, base, base_dtype, numel, offset, b * kBlock, w, a.data(), *t, *k);
    sums.merge(*t, *k);
  });
  return sums.parts();
}

// thr: the address of cols uint32 thresholds, one per rank (a list of Python ints cost ~70 bytes per
// element of a long 1-D tensor).
std::vector<int64_t> tv_della_mask(const ModelSpec& model, uintptr_t base, int base_dtype, int64_t rows, int64_t cols,
                                   uintptr_t thr_addr, uintptr_t mask, uint64_t seed, uint32_t h0,
                                   uint32_t h1, int num_threads, int64_t offset) {
  check_dtype(base_dtype, false);
  if (thr_addr == 0) throw std::invalid_argument("della_mask: need one threshold per column rank");
  if (cols >= (int64_t(1) << 31)) throw std::invalid_argument("della_mask: rows of 2^31 or more elements");
  if (offset < 0) throw std::invalid_argument("della_mask: negative offset");
  const uint32_t* thr = reinterpret_cast<const uint32_t*>(thr_addr);
  L1Sums sums;
  if (rows <= 0 || cols <= 0) return sums.parts();
  Model m = make_model(model, seed, h0, h1);
  const int threads = pick_threads(num_threads, rows);
  auto row = tv::pick(della_avx512, della_avx2, della_plain);
  uint64_t* words = reinterpret_cast<uint64_t*>(mask);
  parallel_for(rows, 4, threads, [&](int64_t r0, int64_t r1) {
    RowScratch w(cols);
    auto t = std::make_unique<Abs>(), k = std::make_unique<Abs>();
    for (int64_t r = r0; r < r1; ++r) row(m, base, base_dtype, r, cols, offset, thr, words, w, *t, *k);
    sums.merge(*t, *k);
  });
  return sums.parts();
}

std::vector<uint32_t> philox_draws(uint64_t seed, uint32_t model, uint32_t h0, uint32_t h1, int64_t offset, int64_t n) {
  tv::PhiloxKey k{uint32_t(seed), uint32_t(seed >> 32), model, h0, h1};
  std::vector<uint32_t> out(std::max<int64_t>(n, 0)), scratch(std::max<int64_t>(n, 0) + 8);
  if (n > 0) tv::philox_bits(k, offset, n, out.data(), scratch.data());
  return out;
}

// ---- one call per candidate set (the pool's task-vector methods) -------------------------------------
// A model of many small tensors merged one tv_merge per tensor pays a call, a thread wake-up and a
// short loop per tensor. A GroupedTVPlan holds, per tensor, the N input pointers, the base, K outputs,
// the name hash and the weight group, built once per set of targets; each run brings what changes:
// every tensor's model plans (the selection pass: mode, boundaries, threshold, model index as int64
// [T, N, 7]; rescale factors float32 [T, N]; bitmask addresses uint64 [T, N]), the weights float32
// [G, K, N] and divisors float32 [G, K], and optionally each tensor's offset int64 [T] (the global index of a
// shard's first element: a sharded pool's local tensors). Every (tensor, candidate) runs merge_block over the
// blocks tv_merge would (at that offset), so the bits are tv_merge's; pieces of up to kBlocksPerChunk blocks are
// packed into spans of about kSpanBytes for the thread pool.
class GroupedTVPlan {
 public:
  GroupedTVPlan(const std::vector<std::vector<uintptr_t>>& in_ptrs, const std::vector<std::vector<int>>& in_dtypes,
                const std::vector<uintptr_t>& base_ptrs, const std::vector<int>& base_dtypes,
                const std::vector<int64_t>& numels, const std::vector<std::vector<uintptr_t>>& out_ptrs,
                const std::vector<std::vector<int>>& out_dtypes, const std::vector<std::pair<uint32_t, uint32_t>>& hashes,
                const std::vector<int>& groups, int64_t n_groups)
      : n_groups_(n_groups), numel_(numels), group_(groups), hash_(hashes) {
    const size_t t_count = numels.size();
    if (in_ptrs.size() != t_count || in_dtypes.size() != t_count || base_ptrs.size() != t_count ||
        base_dtypes.size() != t_count || out_ptrs.size() != t_count || out_dtypes.size() != t_count ||
        hashes.size() != t_count || groups.size() != t_count)
      throw std::invalid_argument("grouped task vectors: one entry per tensor in every table");
    if (t_count == 0) throw std::invalid_argument("grouped task vectors: no tensors");
    n_in_ = int64_t(in_ptrs[0].size());
    n_out_ = int64_t(out_ptrs[0].size());
    if (n_in_ == 0 || n_out_ == 0) throw std::invalid_argument("grouped task vectors: need an input and an output");
    if (n_groups < 1) throw std::invalid_argument("grouped task vectors: need at least one weight group");
    int64_t span_bytes = 0, first = 0;
    for (size_t t = 0; t < t_count; ++t) {
      const std::string where = "grouped task vectors: tensor " + std::to_string(t);
      if (int64_t(in_ptrs[t].size()) != n_in_ || int64_t(in_dtypes[t].size()) != n_in_ ||
          int64_t(out_ptrs[t].size()) != n_out_ || int64_t(out_dtypes[t].size()) != n_out_)
        throw std::invalid_argument(where + ": every tensor needs the same number of inputs and outputs");
      if (groups[t] < 0 || groups[t] >= n_groups) throw std::invalid_argument(where + ": weight group out of range");
      if (numels[t] < 0) throw std::invalid_argument(where + ": negative numel");
      check_dtype(base_dtypes[t], false);
      int64_t bytes_per_elem = int64_t(dtype_size(base_dtypes[t]));
      for (int dt : in_dtypes[t]) { check_dtype(dt, false); bytes_per_elem += int64_t(dtype_size(dt)); }
      for (int dt : out_dtypes[t]) { check_dtype(dt, true); bytes_per_elem += int64_t(dtype_size(dt)); }
      in_.insert(in_.end(), in_ptrs[t].begin(), in_ptrs[t].end());
      in_dt_.insert(in_dt_.end(), in_dtypes[t].begin(), in_dtypes[t].end());
      out_.insert(out_.end(), out_ptrs[t].begin(), out_ptrs[t].end());
      out_dt_.insert(out_dt_.end(), out_dtypes[t].begin(), out_dtypes[t].end());
      base_.push_back(base_ptrs[t]);
      base_dt_.push_back(base_dtypes[t]);
      const int64_t piece = kBlocksPerChunk * kBlock;
      for (int64_t s = 0; s < numels[t]; s += piece) {
        const int64_t e = std::min(numels[t], s + piece);
        pieces_.push_back({int64_t(t), s, e});
        span_bytes += (e - s) * bytes_per_elem * n_out_;  // every candidate re-reads the inputs
        if (span_bytes >= kSpanBytes) {
          spans_.push_back({first, int64_t(pieces_.size())});
          first = int64_t(pieces_.size());
          span_bytes = 0;
        }
      }
    }
    if (first < int64_t(pieces_.size())) spans_.push_back({first, int64_t(pieces_.size())});
  }

  void run(py::array_t<int64_t, py::array::c_style | py::array::forcecast> ints,
           py::array_t<float, py::array::c_style | py::array::forcecast> scales,
           py::array_t<uint64_t, py::array::c_style | py::array::forcecast> bits,
           py::array_t<float, py::array::c_style | py::array::forcecast> weights,
           py::array_t<float, py::array::c_style | py::array::forcecast> divisors, bool consensus, bool normalize,
           float lam, uint64_t seed, int num_threads,
           py::array_t<int64_t, py::array::c_style | py::array::forcecast> offsets) {
    const int64_t T = int64_t(numel_.size()), N = n_in_, K = n_out_, G = n_groups_;
    auto need = [](const char* what, int64_t got, int64_t want) {
      if (got != want)
        throw std::invalid_argument(std::string("grouped task vectors: ") + what + " must have " +
                                    std::to_string(want) + " entries, got " + std::to_string(got));
    };
    need("plan ints", ints.size(), T * N * 7);
    need("scales", scales.size(), T * N);
    need("bitmasks", bits.size(), T * N);
    need("weights", weights.size(), G * K * N);
    need("divisors", divisors.size(), G * K);
    if (offsets.size() != 0) need("offsets", offsets.size(), T);  // none: every tensor from element 0
    const int64_t* r = ints.data();
    const float* sc = scales.data();
    const uint64_t* bm = bits.data();
    const float* w = weights.data();
    const float* dv = divisors.data();
    const int64_t* off = offsets.size() ? offsets.data() : nullptr;
    std::vector<MergeArgs> args(size_t(T * K));
    for (int64_t t = 0; t < T; ++t) {
      const int64_t g = group_[size_t(t)];
      for (int64_t k = 0; k < K; ++k) {
        MergeArgs& a = args[size_t(t * K + k)];
        a.models.resize(size_t(N));
        for (int64_t i = 0; i < N; ++i) {
          const int64_t* row = r + (t * N + i) * 7;
          Model& m = a.models[size_t(i)];
          m.x = in_[size_t(t * N + i)]; m.dt = in_dt_[size_t(t * N + i)]; m.mode = int(row[0]);
          m.t_lo = row[1]; m.i_lo = row[2]; m.t_hi = row[3]; m.i_hi = row[4]; m.thr = uint64_t(row[5]);
          m.bits = uintptr_t(bm[t * N + i]); m.scale = sc[t * N + i]; m.weight = w[(g * K + k) * N + i];
          m.key = {uint32_t(seed), uint32_t(seed >> 32), uint32_t(row[6]), hash_[size_t(t)].first,
                   hash_[size_t(t)].second};
          if (m.mode < NONE || m.mode > ZERO) throw std::invalid_argument("grouped task vectors: bad sparsifier mode");
          if (m.mode == BITS && !m.bits) throw std::invalid_argument("grouped task vectors: bits mode needs a bitmask");
        }
        a.base = base_[size_t(t)]; a.bdt = base_dt_[size_t(t)];
        a.out = out_[size_t(t * K + k)]; a.odt = out_dt_[size_t(t * K + k)];
        a.numel = numel_[size_t(t)]; a.offset = off ? off[t] : 0;
        if (a.offset < 0) throw std::invalid_argument("grouped task vectors: negative offset");
        a.consensus = consensus; a.normalize = normalize; a.lam = lam; a.divisor = dv[g * K + k];
        a.threads = 1;
      }
    }
    py::gil_scoped_release nogil;
    auto block = tv::pick(merge_avx512, merge_avx2, merge_plain);
    parallel_for(int64_t(spans_.size()), 1, pick_threads(num_threads, int64_t(spans_.size())), [&](int64_t s0, int64_t s1) {
      Scratch sc;
      sc.v.resize(size_t(N) * kBlock);
      for (int64_t s = s0; s < s1; ++s)
        for (int64_t p = spans_[size_t(s)].first; p < spans_[size_t(s)].last; ++p) {
          const Piece& pc = pieces_[size_t(p)];
          for (int64_t k = 0; k < K; ++k)
            for (int64_t b = pc.start; b < pc.end; b += kBlock) block(args[size_t(pc.tensor * K + k)], b, sc);
        }
    });
  }

  int64_t num_tensors() const { return int64_t(numel_.size()); }
  int64_t num_spans() const { return int64_t(spans_.size()); }

 private:
  static constexpr int64_t kSpanBytes = 1 << 20;  // bytes read + written per span claimed by a thread
  struct Piece { int64_t tensor, start, end; };
  struct Span { int64_t first, last; };  // pieces [first, last)

  int64_t n_in_ = 0, n_out_ = 0, n_groups_ = 1;
  std::vector<uintptr_t> in_, out_, base_;
  std::vector<int> in_dt_, out_dt_, base_dt_;
  std::vector<int64_t> numel_;
  std::vector<int> group_;
  std::vector<std::pair<uint32_t, uint32_t>> hash_;
  std::vector<Piece> pieces_;
  std::vector<Span> spans_;
};

void register_task_vectors(py::module_& m) {
  m.def("tv_merge", &tv_merge, py::arg("models"), py::arg("base"), py::arg("base_dtype"), py::arg("out"),
        py::arg("out_dtype"), py::arg("numel"), py::arg("offset"), py::arg("consensus"), py::arg("normalize"),
        py::arg("lam"), py::arg("divisor"), py::arg("seed"), py::arg("h0"), py::arg("h1"), py::arg("num_threads") = 0,
        py::call_guard<py::gil_scoped_release>(), "Fused task-vector merge (see csrc/cpu/task_vectors.cpp).");
  m.def("tv_l1", exact::parts_as_array(&tv_l1), py::arg("model"), py::arg("base"), py::arg("base_dtype"), py::arg("numel"),
        py::arg("offset"), py::arg("seed"), py::arg("h0"), py::arg("h1"), py::arg("num_threads") = 0, "Exact sums of |d| and |d * keep| of one model's delta: int64 parts (pymerge/ops/exact_sum.py), twice.");
  m.def("tv_della_mask", exact::parts_as_array(&tv_della_mask), py::arg("model"), py::arg("base"), py::arg("base_dtype"),
        py::arg("rows"), py::arg("cols"), py::arg("thr"), py::arg("mask"), py::arg("seed"), py::arg("h0"), py::arg("h1"),
        py::arg("num_threads") = 0, py::arg("offset") = 0,
        "DELLA keep-bitmask by per-row magnitude rank, draws from element `offset` on (a shard's rows); returns "
        "its L1 norms' parts, as tv_l1.");
  py::class_<GroupedTVPlan>(m, "GroupedTVPlan", "Task table of a whole task-vector merge, run in one call.")
      .def(py::init<const std::vector<std::vector<uintptr_t>>&, const std::vector<std::vector<int>>&,
                    const std::vector<uintptr_t>&, const std::vector<int>&, const std::vector<int64_t>&,
                    const std::vector<std::vector<uintptr_t>>&, const std::vector<std::vector<int>>&,
                    const std::vector<std::pair<uint32_t, uint32_t>>&, const std::vector<int>&, int64_t>(),
           py::arg("in_ptrs"), py::arg("in_dtypes"), py::arg("base_ptrs"), py::arg("base_dtypes"), py::arg("numels"),
           py::arg("out_ptrs"), py::arg("out_dtypes"), py::arg("hashes"), py::arg("groups"), py::arg("n_groups"))
      .def("run", &GroupedTVPlan::run, py::arg("ints"), py::arg("scales"), py::arg("bits"), py::arg("weights"),
           py::arg("divisors"), py::arg("consensus"), py::arg("normalize"), py::arg("lam"), py::arg("seed"),
           py::arg("num_threads") = 0, py::arg("offsets") = py::array_t<int64_t>(0),
           "tv_merge of every tensor into every candidate (see task_vectors.cpp); offsets: each tensor's first "
           "element's global index (a shard's; tv_merge's offset), none for 0.")
      .def_property_readonly("num_tensors", &GroupedTVPlan::num_tensors)
      .def_property_readonly("num_spans", &GroupedTVPlan::num_spans);
  m.def("philox_draws", &philox_draws, py::arg("seed"), py::arg("model"), py::arg("h0"), py::arg("h1"),
        py::arg("offset"), py::arg("n"), "32-bit Philox draws of elements offset .. offset+n-1 (tests).");
}

PYMERGE_REGISTER(register_task_vectors);

}  // namespace
}  // namespace pymerge
