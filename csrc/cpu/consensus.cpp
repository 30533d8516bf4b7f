// The passes of mergekit 0.1.5's sce, ramplus_tl and arcee_fusion that touch every element, fused
// (pymerge/ops/consensus_ops.py calls them; the per-tensor scalars between passes are computed there
// with torch, exactly as mergekit computes them). d_i = x_i - B in float32, mergekit's order of
// operations, masks applied as 0/1 products (a NaN or inf delta stays NaN where mergekit's does).
//
//   sce_variance:  var_e = population variance of d_i[e] over the models (Welford in float64, as
//                  torch.var), stored as float32.
//   sce_squares:   sum_e (m_e d_i[e])^2 per model, float64, m_e the top-k mask (below).
//   sce_merge:     s = sum_i m d_i; sign election (s >= 0 -> +1 else -1); ew_i = w_i [sign(m d_i) == elected];
//                  out = B + sum_i m d_i ew_i / max(sum_i ew_i, 1e-6).
//                  The mask m (0/1 bytes; none when select_topk >= 1) from sce_topk_mask.
//   sce_topk_mask: the k largest variances, exactly the elements torch.topk (so mergekit) picks, ties
//                  included: its CPU kernel's std::nth_element (std::partial_sort when k * 64 <= n) over
//                  (value, index) pairs in index order, NaN largest; without its sort of the result.
//                  (float32 values and int32 indices where n fits: the same comparisons as torch's float64/int64.)
//   ram_counts:    per model, #elements it moved (|d_i| > eps) that c > 1 models moved, and that only it did.
//                  (ramplus_tl's boosts come from these; its mix is elementwise_mix.cpp's ram.)
//   fusion_blend:  arcee_fusion's out = B + (x - B) [score >= threshold] (the scores come from torch:
//                  their float32 KL sums cancel, and only torch's own softmax, log and sum order give
//                  mergekit's exact scores and so its exact mask).
#include <pybind11/stl.h>
#include <algorithm>
#include <cmath>
#include <mutex>
#include <stdexcept>
#include <string>
#include "cpu/tv_common.h"

namespace py = pybind11;

namespace pymerge {
namespace {

using tv::kBlock;
constexpr int64_t kBlocksPerChunk = 16;

struct Group {
  std::vector<uintptr_t> x; std::vector<int> dt;
  uintptr_t base; int bdt; int64_t n;
};

Group make_group(const std::vector<uintptr_t>& x, const std::vector<int>& dt, uintptr_t base, int bdt, int64_t n,
                 const char* what) {
  if (x.empty() || x.size() != dt.size() || !base || n < 0)  // any number of inputs: scratch is per block
    throw std::invalid_argument(std::string(what) + ": need a base and at least one input, one dtype each");
  for (int d : dt) if (d < F32 || d > F8E5M2) throw std::invalid_argument(std::string(what) + ": bad dtype code");
  if (bdt < F32 || bdt > F8E5M2) throw std::invalid_argument(std::string(what) + ": bad base dtype code");
  return Group{x, dt, base, bdt, n};
}

void check_out(int odt, const char* what) {
  if (odt < F32 || odt > BF16) throw std::invalid_argument(std::string(what) + ": bad output dtype code");
}

int threads_for(int64_t n, int num_threads) {
  const int64_t work = (n + kBlock * kBlocksPerChunk - 1) / (kBlock * kBlocksPerChunk);
  return int(std::max<int64_t>(1, std::min<int64_t>(num_threads > 0 ? num_threads : default_threads(), work)));
}

// Runs fn(block start, scratch) over the blocks of [0, n) in parallel; scratch: k + 2 float blocks.
template <class Fn>
void for_blocks(int64_t n, int k, int num_threads, Fn&& fn) {
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  parallel_for(blocks, kBlocksPerChunk, threads_for(n, num_threads), [&](int64_t b0, int64_t b1) {
    std::vector<float> scratch(size_t(k + 2) * kBlock);
    for (int64_t blk = b0; blk < b1; ++blk) fn(blk * kBlock, scratch.data());
  });
}

// d[i * kBlock + j] = x_i - B over one block; bb = B. Returns the block's length.
inline int64_t load_deltas(const Group& g, int64_t s, float* __restrict bb, float* __restrict d) {
  const int64_t n = std::min<int64_t>(kBlock, g.n - s);
  tv::load_f32(g.base, g.bdt, s, n, bb);
  for (size_t i = 0; i < g.x.size(); ++i) {
    float* __restrict di = d + i * kBlock;
    tv::load_f32(g.x[i], g.dt[i], s, n, di);
    for (int64_t j = 0; j < n; ++j) di[j] -= bb[j];
  }
  return n;
}

// The top-k mask of one block as 0/1 floats.
using Mask = uint8_t;

inline void mask_block(const Mask* m, int64_t s, int64_t n, float* __restrict out) {
  for (int64_t j = 0; j < n; ++j) out[j] = m[s + j] ? 1.f : 0.f;
}

// ---- sce ---------------------------------------------------------------------------------------
template <int Dummy>
inline void variance_block(const Group& g, int64_t s, float* sc, float* var) {
  float* bb = sc; float* d = sc + kBlock;
  const int64_t n = load_deltas(g, s, bb, d);
  const int k = int(g.x.size());
  double mean[kBlock], m2[kBlock];
  for (int64_t j = 0; j < n; ++j) { mean[j] = 0; m2[j] = 0; }
  for (int i = 0; i < k; ++i) {  // Welford, float64: torch.var's reduction, bit for bit
    const float* __restrict di = d + i * kBlock;
    const double count = i + 1;
    for (int64_t j = 0; j < n; ++j) {
      const double v = di[j], delta = v - mean[j];
      mean[j] += delta / count;
      m2[j] += delta * (v - mean[j]);
    }
  }
  for (int64_t j = 0; j < n; ++j) var[s + j] = float(m2[j] / k);
}

template <int Dummy>
inline void squares_block(const Group& g, const Mask* m, int64_t s, float* sc, double* sums) {
  float* bb = sc; float* d = sc + kBlock;
  float* keep = sc + (g.x.size() + 1) * kBlock;
  const int64_t n = load_deltas(g, s, bb, d);
  if (m) mask_block(m, s, n, keep);
  for (size_t i = 0; i < g.x.size(); ++i) {
    float* __restrict di = d + i * kBlock;
    if (m) for (int64_t j = 0; j < n; ++j) di[j] *= keep[j];
    double lane[8] = {0};  // 8 independent float64 sums: vectorizes without reassociating one
    int64_t j = 0;
    for (; j + 8 <= n; j += 8)
      for (int l = 0; l < 8; ++l) lane[l] += double(di[j + l] * di[j + l]);  // float32 squares, as mergekit
    for (; j < n; ++j) lane[j & 7] += double(di[j] * di[j]);
    for (int l = 0; l < 8; ++l) sums[i] += lane[l];
  }
}

template <int Dummy>
inline void sce_block(const Group& g, const Mask* m, const float* w, uintptr_t out, int odt, int64_t s, float* sc) {
  float* bb = sc; float* d = sc + kBlock;
  float* keep = sc + (g.x.size() + 1) * kBlock;
  const int64_t n = load_deltas(g, s, bb, d);
  const int k = int(g.x.size());
  if (m) {
    mask_block(m, s, n, keep);
    for (int i = 0; i < k; ++i)
      for (int64_t j = 0; j < n; ++j) d[i * kBlock + j] *= keep[j];
  }
  // loops over models outside, elements inside (vectorized); same per-element order of operations
  float sum[kBlock], merged[kBlock], den[kBlock];
  for (int64_t j = 0; j < n; ++j) { sum[j] = 0; merged[j] = 0; den[j] = 0; }
  for (int i = 0; i < k; ++i)
    for (int64_t j = 0; j < n; ++j) sum[j] += d[i * kBlock + j];
  for (int64_t j = 0; j < n; ++j) sum[j] = sum[j] >= 0 ? 1.f : -1.f;  // the elected sign; NaN sums elect -1
  for (int i = 0; i < k; ++i) {
    const float* __restrict di = d + i * kBlock;
    const float wi = w[i];
    for (int64_t j = 0; j < n; ++j) {
      const float v = di[j];
      const float sign = v > 0 ? 1.f : (v < 0 ? -1.f : 0.f);  // NaN: 0, never the elected sign
      const float ew = wi * (sign == sum[j] ? 1.f : 0.f);
      merged[j] += v * ew;
      den[j] += ew;
    }
  }
  for (int64_t j = 0; j < n; ++j) {
    const float dn = den[j] < 1e-6f ? 1e-6f : den[j];  // clamp(min=1e-6); NaN stays NaN
    keep[j] = bb[j] + merged[j] / dn;
  }
  tv::store_f32(out, odt, s, n, keep);
}

PM_AVX512 void variance_avx512(const Group& g, int64_t s, float* sc, float* v) { variance_block<0>(g, s, sc, v); }
PM_AVX2 void variance_avx2(const Group& g, int64_t s, float* sc, float* v) { variance_block<2>(g, s, sc, v); }
PM_PLAIN void variance_plain(const Group& g, int64_t s, float* sc, float* v) { variance_block<1>(g, s, sc, v); }
PM_AVX512 void squares_avx512(const Group& g, const Mask* m, int64_t s, float* sc, double* o) {
  squares_block<0>(g, m, s, sc, o);
}
PM_AVX2 void squares_avx2(const Group& g, const Mask* m, int64_t s, float* sc, double* o) {
  squares_block<2>(g, m, s, sc, o);
}
PM_PLAIN void squares_plain(const Group& g, const Mask* m, int64_t s, float* sc, double* o) {
  squares_block<1>(g, m, s, sc, o);
}
PM_AVX512 void sce_avx512(const Group& g, const Mask* m, const float* w, uintptr_t out, int odt, int64_t s, float* sc) {
  sce_block<0>(g, m, w, out, odt, s, sc);
}
PM_AVX2 void sce_avx2(const Group& g, const Mask* m, const float* w, uintptr_t out, int odt, int64_t s, float* sc) {
  sce_block<2>(g, m, w, out, odt, s, sc);
}
PM_PLAIN void sce_plain(const Group& g, const Mask* m, const float* w, uintptr_t out, int odt, int64_t s, float* sc) {
  sce_block<1>(g, m, w, out, odt, s, sc);
}

void sce_variance(const std::vector<uintptr_t>& x, const std::vector<int>& dt, uintptr_t base, int bdt, int64_t n,
                  uintptr_t var, int num_threads) {
  const Group g = make_group(x, dt, base, bdt, n, "sce_variance");
  if (!var) throw std::invalid_argument("sce_variance: no output");
  auto fn = tv::pick(variance_avx512, variance_avx2, variance_plain);
  float* v = reinterpret_cast<float*>(var);
  for_blocks(n, int(x.size()), num_threads, [&](int64_t s, float* sc) { fn(g, s, sc, v); });
}

// mask == 0: no mask (select_topk >= 1).
std::vector<double> sce_squares(const std::vector<uintptr_t>& x, const std::vector<int>& dt, uintptr_t base, int bdt,
                                int64_t n, uintptr_t mask, int num_threads) {
  const Group g = make_group(x, dt, base, bdt, n, "sce_squares");
  const Mask* m = reinterpret_cast<const Mask*>(mask);
  auto fn = tv::pick(squares_avx512, squares_avx2, squares_plain);
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  const int k = int(x.size());
  // per-chunk partial sums, added in chunk order: the result does not depend on the thread count
  const int64_t chunks = (blocks + kBlocksPerChunk - 1) / kBlocksPerChunk;
  std::vector<double> part(size_t(chunks) * k, 0.0);
  parallel_for(chunks, 1, threads_for(n, num_threads), [&](int64_t c0, int64_t c1) {
    std::vector<float> scratch(size_t(k + 2) * kBlock);
    for (int64_t c = c0; c < c1; ++c)
      for (int64_t blk = c * kBlocksPerChunk; blk < std::min(blocks, (c + 1) * kBlocksPerChunk); ++blk)
        fn(g, m, blk * kBlock, scratch.data(), part.data() + c * k);
  });
  std::vector<double> sums(k, 0.0);
  for (int64_t c = 0; c < chunks; ++c)
    for (int i = 0; i < k; ++i) sums[i] += part[c * k + i];
  return sums;
}

void sce_merge(const std::vector<uintptr_t>& x, const std::vector<int>& dt, uintptr_t base, int bdt, int64_t n,
               uintptr_t mask, const std::vector<float>& weights, uintptr_t out, int odt, int num_threads) {
  const Group g = make_group(x, dt, base, bdt, n, "sce_merge");
  check_out(odt, "sce_merge");
  if (weights.size() != x.size() || !out) throw std::invalid_argument("sce_merge: one weight per input and an output");
  const Mask* m = reinterpret_cast<const Mask*>(mask);
  auto fn = tv::pick(sce_avx512, sce_avx2, sce_plain);
  for_blocks(n, int(x.size()), num_threads, [&](int64_t s, float* sc) { fn(g, m, weights.data(), out, odt, s, sc); });
}

// The k largest of (value, index) pairs in index order, by value alone, NaN largest: torch.topk's CPU
// selection (its pairs hold a float64 and an int64; the comparisons, so the permutation, are the same for
// a float and an int32 index: 8 bytes an element instead of 16 where n fits).
template <class Index>
void topk_pairs(const float* v, int64_t n, int64_t k, uint8_t* m) {
  using elem_t = std::pair<float, Index>;
  std::vector<elem_t> queue(n);
  for (int64_t j = 0; j < n; ++j) queue[j] = {v[j], Index(j)};
  auto larger = [](const elem_t& a, const elem_t& b) {
    return (std::isnan(a.first) && !std::isnan(b.first)) || a.first > b.first;
  };
  if (k * 64 <= n)
    std::partial_sort(queue.begin(), queue.begin() + k, queue.end(), larger);
  else
    std::nth_element(queue.begin(), queue.begin() + k - 1, queue.end(), larger);
  std::memset(m, 0, size_t(n));
  for (int64_t i = 0; i < k; ++i) m[queue[i].second] = 1;
}

void sce_topk_mask(uintptr_t var, int64_t n, int64_t k, uintptr_t mask) {
  if (!var || !mask || n < 1 || k < 1 || k > n) throw std::invalid_argument("sce_topk_mask: need 1 <= k <= n");
  const float* v = reinterpret_cast<const float*>(var);
  uint8_t* m = reinterpret_cast<uint8_t*>(mask);
  if (n <= INT32_MAX)
    topk_pairs<int32_t>(v, n, k, m);
  else
    topk_pairs<int64_t>(v, n, k, m);
}

// ---- ram / ramplus_tl ----------------------------------------------------------------------------
template <int Dummy>
inline void counts_block(const Group& g, float eps, int64_t s, float* sc, int64_t* shared, int64_t* unique) {
  float* bb = sc; float* d = sc + kBlock;
  const int64_t n = load_deltas(g, s, bb, d);
  const int k = int(g.x.size());
  int32_t cnt[kBlock];
  for (int64_t j = 0; j < n; ++j) cnt[j] = 0;
  for (int i = 0; i < k; ++i)
    for (int64_t j = 0; j < n; ++j) cnt[j] += std::fabs(d[i * kBlock + j]) > eps;
  for (int i = 0; i < k; ++i) {
    int64_t sh = 0, un = 0;
    for (int64_t j = 0; j < n; ++j) {
      const int32_t moved = std::fabs(d[i * kBlock + j]) > eps;
      sh += moved & (cnt[j] > 1);
      un += moved & (cnt[j] == 1);
    }
    shared[i] += sh;
    unique[i] += un;
  }
}

PM_AVX512 void counts_avx512(const Group& g, float e, int64_t s, float* sc, int64_t* sh, int64_t* un) {
  counts_block<0>(g, e, s, sc, sh, un);
}
PM_AVX2 void counts_avx2(const Group& g, float e, int64_t s, float* sc, int64_t* sh, int64_t* un) {
  counts_block<2>(g, e, s, sc, sh, un);
}
PM_PLAIN void counts_plain(const Group& g, float e, int64_t s, float* sc, int64_t* sh, int64_t* un) {
  counts_block<1>(g, e, s, sc, sh, un);
}
// (shared, unique) counts per model.
std::pair<std::vector<int64_t>, std::vector<int64_t>> ram_counts(const std::vector<uintptr_t>& x,
                                                                 const std::vector<int>& dt, uintptr_t base, int bdt,
                                                                 int64_t n, float eps, int num_threads) {
  const Group g = make_group(x, dt, base, bdt, n, "ram_counts");
  auto fn = tv::pick(counts_avx512, counts_avx2, counts_plain);
  const int k = int(x.size());
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  std::vector<int64_t> shared(k, 0), unique(k, 0);
  std::mutex lock;
  parallel_for(blocks, kBlocksPerChunk, threads_for(n, num_threads), [&](int64_t b0, int64_t b1) {
    std::vector<float> scratch(size_t(k + 2) * kBlock);
    std::vector<int64_t> sh(k, 0), un(k, 0);
    for (int64_t blk = b0; blk < b1; ++blk) fn(g, eps, blk * kBlock, scratch.data(), sh.data(), un.data());
    std::lock_guard<std::mutex> hold(lock);  // integer sums: the order does not matter
    for (int i = 0; i < k; ++i) { shared[i] += sh[i]; unique[i] += un[i]; }
  });
  return {shared, unique};
}

// ---- arcee_fusion --------------------------------------------------------------------------------
void fusion_blend(uintptr_t x, int xdt, uintptr_t base, int bdt, int64_t n, uintptr_t scores, float threshold,
                  uintptr_t out, int odt, int num_threads) {
  make_group({x}, {xdt}, base, bdt, n, "fusion_blend");
  check_out(odt, "fusion_blend");
  if (!scores || !out) throw std::invalid_argument("fusion_blend: no scores or output");
  const float* sc = reinterpret_cast<const float*>(scores);
  for_blocks(n, 1, num_threads, [&](int64_t s, float* buf) {
    const int64_t len = std::min<int64_t>(kBlock, n - s);
    float* bb = buf; float* xb = buf + kBlock;
    tv::load_f32(base, bdt, s, len, bb);
    tv::load_f32(x, xdt, s, len, xb);
    for (int64_t j = 0; j < len; ++j) bb[j] = bb[j] + (xb[j] - bb[j]) * (sc[s + j] >= threshold ? 1.f : 0.f);
    tv::store_f32(out, odt, s, len, bb);
  });
}

void register_consensus(py::module_& m) {
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("sce_variance", &sce_variance, py::arg("x"), py::arg("dtypes"), py::arg("base"), py::arg("base_dtype"),
        py::arg("n"), py::arg("var"), py::arg("num_threads") = 0, nogil, "sce: float32 variance of the deltas.");
  m.def("sce_topk_mask", &sce_topk_mask, py::arg("var"), py::arg("n"), py::arg("k"), py::arg("mask"), nogil,
        "sce: 1 (uint8) at the k elements torch.topk picks from the float32 variances.");
  m.def("sce_squares", &sce_squares, py::arg("x"), py::arg("dtypes"), py::arg("base"), py::arg("base_dtype"),
        py::arg("n"), py::arg("mask"), py::arg("num_threads") = 0, nogil,
        "sce: float64 sums of the masked squared deltas, per model.");
  m.def("sce_merge", &sce_merge, py::arg("x"), py::arg("dtypes"), py::arg("base"), py::arg("base_dtype"),
        py::arg("n"), py::arg("mask"), py::arg("weights"), py::arg("out"),
        py::arg("out_dtype"), py::arg("num_threads") = 0, nogil, "sce: the sign-elected weighted mean, fused.");
  m.def("ram_counts", &ram_counts, py::arg("x"), py::arg("dtypes"), py::arg("base"), py::arg("base_dtype"),
        py::arg("n"), py::arg("epsilon"), py::arg("num_threads") = 0, nogil,
        "ramplus_tl: per model, (shared, unique) counts of moved elements.");
  m.def("fusion_blend", &fusion_blend, py::arg("x"), py::arg("x_dtype"), py::arg("base"), py::arg("base_dtype"),
        py::arg("n"), py::arg("scores"), py::arg("threshold"), py::arg("out"), py::arg("out_dtype"),
        py::arg("num_threads") = 0, nogil, "arcee_fusion: B + (x - B) where score >= threshold.");
}

PYMERGE_REGISTER(register_consensus);

}  // namespace
}  // namespace pymerge
