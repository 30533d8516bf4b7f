// Reductions and linear combinations for SLERP, NuSLERP and Model Stock, over a [rows, cols] view
// of each tensor and one of three groupings: the whole tensor, each row, or each column.
//   group_dots:    every pairwise dot <v_i, v_j> (i <= j) per row or column, v_i = x_i - (sub ? B : 0),
//                  float32 products summed per block, blocks summed in float64: one read of inputs.
//   whole_dots:    the same over the whole tensor as exact sums (csrc/cpu/exact_sum.h), so the dot
//                  does not depend on how the tensor is split (threads, blocks, ranks of a sharded pool).
//   group_lincomb: out = cB[g] * B + sum_i c_i[g] * (x_i - (sub ? B : 0)), rounded once: one pass.
// The spherical coefficients between the two passes are a handful of scalars computed in Python.
#include <pybind11/stl.h>
#include <algorithm>
#include <memory>
#include <mutex>
#include <stdexcept>
#include "cpu/exact_sum.h"
#include "cpu/tv_common.h"

namespace py = pybind11;

namespace pymerge {
namespace {

using tv::kBlock;
constexpr int64_t kBlocksPerChunk = 16;  // blocks claimed at a time by a thread (16K elements)
enum Group : int { WHOLE = 0, ROWS = 1, COLS = 2 };

struct Args {
  std::vector<uintptr_t> x; std::vector<int> dt;
  uintptr_t base; int bdt; bool sub;
  int64_t rows, cols; int group; int threads;
};

// buf[i*kBlock + j] = v_i at elements start .. start+n-1.
inline void load_vs(const Args& a, int64_t start, int64_t n, float* buf, float* bb) {
  const int64_t k = int64_t(a.x.size());
  if (a.sub) tv::load_f32(a.base, a.bdt, start, n, bb);
  for (int64_t i = 0; i < k; ++i) {
    float* __restrict v = buf + i * kBlock;
    tv::load_f32(a.x[i], a.dt[i], start, n, v);
    if (a.sub) for (int64_t j = 0; j < n; ++j) v[j] -= bb[j];
  }
}

// Per-block kernels, built three times (PM_AVX512, PM_AVX2, PM_PLAIN); parallel_for hands them whole blocks.
// out[p] += dot of pair p over elements start .. start+n-1 (one group).
template <int Dummy>
inline void dots_block(const Args& a, int64_t start, int64_t n, double* out, float* buf, float* bb) {
  const int64_t k = int64_t(a.x.size());
  load_vs(a, start, n, buf, bb);
  for (int64_t i = 0, p = 0; i < k; ++i)
    for (int64_t j = i; j < k; ++j, ++p) {
      const float* __restrict u = buf + i * kBlock;
      const float* __restrict v = buf + j * kBlock;
      out[p] += tv::dot_lanes(u, v, n);
    }
}

// Column grouping: out[(c0 + e) * pairs + p] += u[e] * v[e] in float64.
template <int Dummy>
inline void dots_cols_block(const Args& a, int64_t r, int64_t c0, int64_t n, double* acc, float* buf, float* bb) {
  const int64_t k = int64_t(a.x.size()), pairs = k * (k + 1) / 2;
  load_vs(a, r * a.cols + c0, n, buf, bb);
  for (int64_t i = 0, p = 0; i < k; ++i)
    for (int64_t j = i; j < k; ++j, ++p) {
      const float* __restrict u = buf + i * kBlock;
      const float* __restrict v = buf + j * kBlock;
      double* __restrict o = acc + c0 * pairs + p;
      for (int64_t e = 0; e < n; ++e) o[e * pairs] += double(u[e]) * double(v[e]);
    }
}

// Exact sums of every pair's products over elements start .. start+n-1 (one ProdF32 per pair).
template <int Isa>
inline void exact_dots_block(const Args& a, int64_t start, int64_t n, exact::Acc* acc, float* buf, float* bb) {
  const int64_t k = int64_t(a.x.size());
  load_vs(a, start, n, buf, bb);
  for (int64_t i = 0, p = 0; i < k; ++i)
    for (int64_t j = i; j < k; ++j, ++p) acc[p].template add_products<Isa>(buf + i * kBlock, buf + j * kBlock, n);
}

template <int Dummy>
inline void lincomb_block(const Args& a, const float* coef, uintptr_t out, int odt, int64_t start, float* buf,
                          float* bb, float* acc) {
  const int64_t k = int64_t(a.x.size()), stride = k + 1;
  const int64_t n = std::min(kBlock, a.rows * a.cols - start);
  load_vs(a, start, n, buf, bb);
  if (a.base && !a.sub) tv::load_f32(a.base, a.bdt, start, n, bb);
  if (a.group == WHOLE) {
    for (int64_t j = 0; j < n; ++j) acc[j] = 0.f;
    for (int64_t i = 0; i < k; ++i) {
      const float c = coef[i];
      const float* __restrict v = buf + i * kBlock;
      for (int64_t j = 0; j < n; ++j) acc[j] += c * v[j];
    }
    if (a.base) { const float c = coef[k]; for (int64_t j = 0; j < n; ++j) acc[j] += c * bb[j]; }
  } else {
    for (int64_t j = 0; j < n; ++j) {
      const int64_t e = start + j;
      const float* c = coef + (a.group == ROWS ? e / a.cols : e % a.cols) * stride;
      float s = 0.f;
      for (int64_t i = 0; i < k; ++i) s += c[i] * buf[i * kBlock + j];
      acc[j] = a.base ? s + c[k] * bb[j] : s;
    }
  }
  tv::store_f32(out, odt, start, n, acc);
}

PM_AVX512 void dots_avx512(const Args& a, int64_t s, int64_t n, double* o, float* b, float* bb) { dots_block<0>(a, s, n, o, b, bb); }
PM_AVX2 void dots_avx2(const Args& a, int64_t s, int64_t n, double* o, float* b, float* bb) { dots_block<2>(a, s, n, o, b, bb); }
PM_PLAIN void dots_plain(const Args& a, int64_t s, int64_t n, double* o, float* b, float* bb) { dots_block<1>(a, s, n, o, b, bb); }
PM_AVX512 void exact_avx512(const Args& a, int64_t s, int64_t n, exact::Acc* o, float* b, float* bb) { exact_dots_block<exact::kAvx512>(a, s, n, o, b, bb); }
PM_AVX2 void exact_avx2(const Args& a, int64_t s, int64_t n, exact::Acc* o, float* b, float* bb) { exact_dots_block<exact::kAvx2>(a, s, n, o, b, bb); }
PM_PLAIN void exact_plain(const Args& a, int64_t s, int64_t n, exact::Acc* o, float* b, float* bb) { exact_dots_block<exact::kPlain>(a, s, n, o, b, bb); }
PM_AVX512 void cols_avx512(const Args& a, int64_t r, int64_t c, int64_t n, double* o, float* b, float* bb) { dots_cols_block<0>(a, r, c, n, o, b, bb); }
PM_AVX2 void cols_avx2(const Args& a, int64_t r, int64_t c, int64_t n, double* o, float* b, float* bb) { dots_cols_block<2>(a, r, c, n, o, b, bb); }
PM_PLAIN void cols_plain(const Args& a, int64_t r, int64_t c, int64_t n, double* o, float* b, float* bb) { dots_cols_block<1>(a, r, c, n, o, b, bb); }
PM_AVX512 void lincomb_avx512(const Args& a, const float* c, uintptr_t o, int d, int64_t s, float* b, float* bb, float* acc) { lincomb_block<0>(a, c, o, d, s, b, bb, acc); }
PM_AVX2 void lincomb_avx2(const Args& a, const float* c, uintptr_t o, int d, int64_t s, float* b, float* bb, float* acc) { lincomb_block<2>(a, c, o, d, s, b, bb, acc); }
PM_PLAIN void lincomb_plain(const Args& a, const float* c, uintptr_t o, int d, int64_t s, float* b, float* bb, float* acc) { lincomb_block<1>(a, c, o, d, s, b, bb, acc); }

std::vector<double> dots_driver(const Args& a) {
  const int64_t k = int64_t(a.x.size()), pairs = k * (k + 1) / 2;
  const int64_t groups = a.group == ROWS ? a.rows : a.cols;
  auto dots = tv::pick(dots_avx512, dots_avx2, dots_plain);
  auto cols = tv::pick(cols_avx512, cols_avx2, cols_plain);
  std::vector<double> total(size_t(groups * pairs), 0.0);
  // Every sum below runs in one fixed order whatever the thread count and whichever thread ran
  // which chunk, so the results are bit-identical for any number of threads.
  if (a.group == ROWS) {
    // Each row's sums belong to the one chunk that holds the row.
    const int64_t grain = std::max<int64_t>(1, kBlocksPerChunk * kBlock / std::max<int64_t>(a.cols, 1));
    parallel_for(a.rows, grain, a.threads, [&](int64_t r0, int64_t r1) {
      std::vector<float> buf(size_t(k) * kBlock), bb(kBlock);
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = 0; c < a.cols; c += kBlock)
          dots(a, r * a.cols + c, std::min(kBlock, a.cols - c), total.data() + r * pairs, buf.data(), bb.data());
    });
  } else {
    // Columns are split into tiles; a tile's chunk walks every row in order, so each column's sums
    // run over the rows in row order (the tile width does not change any result).
    const int64_t want = (a.cols + a.threads - 1) / a.threads;  // wide tiles: long contiguous reads per row
    const int64_t width = std::min(kBlock, std::max<int64_t>(64, (want + 15) / 16 * 16));
    const int64_t tiles = (a.cols + width - 1) / width;
    parallel_for(tiles, 1, a.threads, [&](int64_t t0, int64_t t1) {
      std::vector<float> buf(size_t(k) * kBlock), bb(kBlock);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t c0 = t * width, n = std::min(width, a.cols - c0);
        for (int64_t r = 0; r < a.rows; ++r) cols(a, r, c0, n, total.data(), buf.data(), bb.data());
      }
    });
  }
  return total;
}

// [pairs * kParts] int64: each pair's exact dot as parts (pymerge/ops/exact_sum.py). Per-thread sums
// are merged with integer adds, so the result does not depend on the thread count.
std::vector<int64_t> whole_dots_driver(const Args& a) {
  const int64_t k = int64_t(a.x.size()), pairs = k * (k + 1) / 2, numel = a.rows * a.cols;
  auto dots = tv::pick(exact_avx512, exact_avx2, exact_plain);
  auto total = std::make_unique<exact::Acc[]>(size_t(pairs));
  std::mutex lock;
  const int64_t n_blocks = (numel + kBlock - 1) / kBlock;
  parallel_for(n_blocks, kBlocksPerChunk, a.threads, [&](int64_t b0, int64_t b1) {
    std::vector<float> buf(size_t(k) * kBlock), bb(kBlock);
    auto acc = std::make_unique<exact::Acc[]>(size_t(pairs));
    for (int64_t b = b0; b < b1; ++b)
      dots(a, b * kBlock, std::min(kBlock, numel - b * kBlock), acc.get(), buf.data(), bb.data());
    std::lock_guard<std::mutex> g(lock);
    for (int64_t p = 0; p < pairs; ++p) total[p].merge(acc[p]);
  });
  std::vector<int64_t> out(size_t(pairs) * exact::kParts, 0);
  for (int64_t p = 0; p < pairs; ++p) total[p].write(out.data() + p * exact::kParts);
  return out;
}

void lincomb_driver(const Args& a, const std::vector<float>& coef, uintptr_t out, int odt) {
  const int64_t k = int64_t(a.x.size()), numel = a.rows * a.cols;
  const int64_t n_blocks = (numel + kBlock - 1) / kBlock;
  auto fn = tv::pick(lincomb_avx512, lincomb_avx2, lincomb_plain);
  parallel_for(n_blocks, kBlocksPerChunk, a.threads, [&](int64_t b0, int64_t b1) {
    std::vector<float> buf(size_t(k) * kBlock), bb(kBlock), acc(kBlock);
    for (int64_t b = b0; b < b1; ++b) fn(a, coef.data(), out, odt, b * kBlock, buf.data(), bb.data(), acc.data());
  });
}

Args make_args(const std::vector<uintptr_t>& x, const std::vector<int>& dt, uintptr_t base, int bdt, bool sub,
               int64_t rows, int64_t cols, int group, int num_threads) {
  if (x.empty() || x.size() != dt.size()) throw std::invalid_argument("interp: need inputs with one dtype each");
  for (int d : dt) if (d < F32 || d > F8E5M2) throw std::invalid_argument("interp: bad dtype code");
  if (group < WHOLE || group > COLS) throw std::invalid_argument("interp: bad grouping");
  if (sub && !base) throw std::invalid_argument("interp: sub needs a base");
  Args a{x, dt, base, bdt, sub, rows, cols, group, 1};
  const int64_t work = group == WHOLE ? (rows * cols + kBlock - 1) / kBlock : rows;
  a.threads = int(std::max<int64_t>(1, std::min<int64_t>(num_threads > 0 ? num_threads : default_threads(), work)));
  return a;
}

std::vector<double> group_dots(const std::vector<uintptr_t>& x, const std::vector<int>& dt, uintptr_t base, int bdt,
                               bool sub, int64_t rows, int64_t cols, int group, int num_threads) {
  if (group == WHOLE) throw std::invalid_argument("group_dots: whole-tensor dots are exact sums (whole_dots)");
  Args a = make_args(x, dt, base, bdt, sub, rows, cols, group, num_threads);
  if (rows * cols <= 0) {
    const int64_t k = int64_t(x.size());
    return std::vector<double>(size_t(std::max<int64_t>(group == ROWS ? rows : cols, 0) * k * (k + 1) / 2), 0.0);
  }
  return dots_driver(a);
}

std::vector<int64_t> whole_dots(const std::vector<uintptr_t>& x, const std::vector<int>& dt, uintptr_t base, int bdt,
                                bool sub, int64_t numel, int num_threads) {
  if (numel <= 0) return std::vector<int64_t>(x.size() * (x.size() + 1) / 2 * exact::kParts, 0);
  Args a = make_args(x, dt, base, bdt, sub, 1, numel, WHOLE, num_threads);
  return whole_dots_driver(a);
}

void group_lincomb(const std::vector<uintptr_t>& x, const std::vector<int>& dt, uintptr_t base, int bdt, bool sub,
                   int64_t rows, int64_t cols, int group, const std::vector<float>& coef, uintptr_t out, int out_dtype,
                   int num_threads) {
  Args a = make_args(x, dt, base, bdt, sub, rows, cols, group, num_threads);
  if (out_dtype < F32 || out_dtype > BF16) throw std::invalid_argument("interp: bad output dtype");
  const int64_t groups = group == WHOLE ? 1 : group == ROWS ? rows : cols;
  if (int64_t(coef.size()) != groups * int64_t(x.size() + 1)) throw std::invalid_argument("interp: coefficient count");
  if (rows * cols <= 0) return;
  lincomb_driver(a, coef, out, out_dtype);
}

void register_interp(py::module_& m) {
  m.def("group_dots", &group_dots, py::arg("x"), py::arg("dtypes"), py::arg("base"), py::arg("base_dtype"),
        py::arg("sub"), py::arg("rows"), py::arg("cols"), py::arg("group"), py::arg("num_threads") = 0,
        py::call_guard<py::gil_scoped_release>(), "Pairwise dot products per row or column (see csrc/cpu/interp.cpp).");
  m.def("whole_dots", exact::parts_as_array(&whole_dots), py::arg("x"), py::arg("dtypes"), py::arg("base"),
        py::arg("base_dtype"), py::arg("sub"), py::arg("numel"), py::arg("num_threads") = 0,
        "Exact pairwise dot products over whole tensors: int64 parts (pymerge/ops/exact_sum.py) per pair.");
  m.attr("EXACT_PARTS") = py::make_tuple(exact::kLow, exact::kBins);
  m.def("group_lincomb", &group_lincomb, py::arg("x"), py::arg("dtypes"), py::arg("base"), py::arg("base_dtype"),
        py::arg("sub"), py::arg("rows"), py::arg("cols"), py::arg("group"), py::arg("coef"), py::arg("out"),
        py::arg("out_dtype"), py::arg("num_threads") = 0, py::call_guard<py::gil_scoped_release>(),
        "out = cB*B + sum_i c_i*(x_i - sub*B) with per-group coefficients.");
}

PYMERGE_REGISTER(register_interp);

}  // namespace
}  // namespace pymerge
