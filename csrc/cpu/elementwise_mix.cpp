// Elementwise merges of mergekit 0.1.5's nearswap and ram, fused: one read of every input, one
// rounded write, float32 arithmetic in mergekit's order (pymerge/methods/{swap,consensus}.py).
//   nearswap: w = clamp(t / max(|B - x|, 1e-6), 0, 1); out = w * x + (1 - w) * B
//   ram:      d_i = x_i - B, moved_i = |d_i| > eps, c = sum_i moved_i;
//             out = B + sum_i (c == 1 ? d_i lam_i : c > 1 ? d_i / c : 0) over the moved d_i
//             (lam_i = 1 for ram; ramplus_tl's boosts of unique deltas, csrc/cpu/consensus.cpp)
// NaN and inf behave as in mergekit's torch code: ram multiplies by its 0/1 masks (a NaN or inf
// delta makes the element NaN), nearswap's clamps keep a NaN distance NaN.
#include <pybind11/stl.h>
#include <algorithm>
#include <stdexcept>
#include "cpu/tv_common.h"

namespace py = pybind11;

namespace pymerge {
namespace {

using tv::kBlock;
constexpr int64_t kBlocksPerChunk = 16;

struct Mix {
  std::vector<uintptr_t> x; std::vector<int> dt;
  uintptr_t base; int bdt; uintptr_t out; int odt; int64_t n; float param;
  std::vector<float> boosts;  // ram: per input
};

template <int Dummy>
inline void nearswap_block(const Mix& m, int64_t s, float* a, float* b) {
  const int64_t n = std::min<int64_t>(kBlock, m.n - s);
  tv::load_f32(m.base, m.bdt, s, n, a);
  tv::load_f32(m.x[0], m.dt[0], s, n, b);
  const float t = m.param;
  for (int64_t j = 0; j < n; ++j) {
    float d = a[j] - b[j];
    d = d < 0 ? -d : d;
    d = d < 1e-6f ? 1e-6f : d;                // clamp(min=1e-6); NaN stays NaN
    float w = (1.f / d) * t;                  // torch's `scalar / tensor` is reciprocal(tensor) * scalar
    w = w < 0.f ? 0.f : (w > 1.f ? 1.f : w);  // clamp(0, 1); NaN stays NaN
    const float wb = w * b[j], rest = 1.f - w;
    a[j] = wb + rest * a[j];
  }
  tv::store_f32(m.out, m.odt, s, n, a);
}

template <int Dummy>
inline void ram_block(const Mix& m, int64_t s, float* bb, float* d, float* acc) {
  const int64_t n = std::min<int64_t>(kBlock, m.n - s);
  const int64_t k = int64_t(m.x.size());
  const float eps = m.param;
  tv::load_f32(m.base, m.bdt, s, n, bb);
  float cnt[kBlock];
  for (int64_t j = 0; j < n; ++j) { cnt[j] = 0.f; acc[j] = 0.f; }
  for (int64_t i = 0; i < k; ++i) {
    float* __restrict di = d + i * kBlock;
    tv::load_f32(m.x[i], m.dt[i], s, n, di);
    for (int64_t j = 0; j < n; ++j) {
      di[j] -= bb[j];
      const float mag = di[j] < 0 ? -di[j] : di[j];
      cnt[j] += mag > eps ? 1.f : 0.f;
    }
  }
  for (int64_t i = 0; i < k; ++i) {
    const float* __restrict di = d + i * kBlock;
    for (int64_t j = 0; j < n; ++j) {
      const float mag = di[j] < 0 ? -di[j] : di[j];
      const float z = di[j] * (mag > eps ? 1.f : 0.f);  // products, as mergekit: NaN and inf deltas give NaN
      const float c = cnt[j] < 1.f ? 1.f : cnt[j];
      acc[j] += (z * (cnt[j] == 1.f ? 1.f : 0.f)) * m.boosts[i] + z * (cnt[j] > 1.f ? 1.f : 0.f) / c;
    }
  }
  for (int64_t j = 0; j < n; ++j) acc[j] = bb[j] + acc[j];
  tv::store_f32(m.out, m.odt, s, n, acc);
}

PM_AVX512 void nearswap_avx512(const Mix& m, int64_t s, float* a, float* b) { nearswap_block<0>(m, s, a, b); }
PM_AVX2 void nearswap_avx2(const Mix& m, int64_t s, float* a, float* b) { nearswap_block<2>(m, s, a, b); }
PM_PLAIN void nearswap_plain(const Mix& m, int64_t s, float* a, float* b) { nearswap_block<1>(m, s, a, b); }
PM_AVX512 void ram_avx512(const Mix& m, int64_t s, float* bb, float* d, float* acc) { ram_block<0>(m, s, bb, d, acc); }
PM_AVX2 void ram_avx2(const Mix& m, int64_t s, float* bb, float* d, float* acc) { ram_block<2>(m, s, bb, d, acc); }
PM_PLAIN void ram_plain(const Mix& m, int64_t s, float* bb, float* d, float* acc) { ram_block<1>(m, s, bb, d, acc); }

Mix make_mix(const std::vector<uintptr_t>& x, const std::vector<int>& dt, uintptr_t base, int bdt, int64_t n,
             float param, uintptr_t out, int odt, const char* what) {
  if (x.empty() || x.size() != dt.size() || !base || !out || n < 0)
    throw std::invalid_argument(std::string(what) + ": need a base, inputs with one dtype each and an output");
  for (int d : dt) if (d < F32 || d > F8E5M2) throw std::invalid_argument(std::string(what) + ": bad dtype code");
  if (bdt < F32 || bdt > F8E5M2 || odt < F32 || odt > BF16)
    throw std::invalid_argument(std::string(what) + ": bad base or output dtype");
  return Mix{x, dt, base, bdt, out, odt, n, param, {}};
}

int threads_for(int64_t n, int num_threads) {
  const int64_t work = (n + kBlock * kBlocksPerChunk - 1) / (kBlock * kBlocksPerChunk);
  return int(std::max<int64_t>(1, std::min<int64_t>(num_threads > 0 ? num_threads : default_threads(), work)));
}

void nearswap(uintptr_t base, int bdt, uintptr_t x, int xdt, int64_t n, float t, uintptr_t out, int odt,
              int num_threads) {
  const Mix m = make_mix({x}, {xdt}, base, bdt, n, t, out, odt, "nearswap");
  auto fn = tv::pick(nearswap_avx512, nearswap_avx2, nearswap_plain);
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  parallel_for(blocks, kBlocksPerChunk, threads_for(n, num_threads), [&](int64_t b0, int64_t b1) {
    std::vector<float> a(kBlock), b(kBlock);
    for (int64_t blk = b0; blk < b1; ++blk) fn(m, blk * kBlock, a.data(), b.data());
  });
}

void ram(const std::vector<uintptr_t>& x, const std::vector<int>& dt, uintptr_t base, int bdt, int64_t n,
         float epsilon, const std::vector<float>& boosts, uintptr_t out, int odt, int num_threads) {
  Mix m = make_mix(x, dt, base, bdt, n, epsilon, out, odt, "ram");
  if (boosts.size() != x.size()) throw std::invalid_argument("ram: one boost per input");
  m.boosts = boosts;
  auto fn = tv::pick(ram_avx512, ram_avx2, ram_plain);
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  parallel_for(blocks, kBlocksPerChunk, threads_for(n, num_threads), [&](int64_t b0, int64_t b1) {
    std::vector<float> bb(kBlock), d(x.size() * kBlock), acc(kBlock);
    for (int64_t blk = b0; blk < b1; ++blk) fn(m, blk * kBlock, bb.data(), d.data(), acc.data());
  });
}

void register_elementwise_mix(py::module_& m) {
  m.def("nearswap", &nearswap, py::arg("base"), py::arg("base_dtype"), py::arg("x"), py::arg("x_dtype"),
        py::arg("n"), py::arg("t"), py::arg("out"), py::arg("out_dtype"), py::arg("num_threads") = 0,
        py::call_guard<py::gil_scoped_release>(), "mergekit's nearswap, fused (see csrc/cpu/elementwise_mix.cpp).");
  m.def("ram", &ram, py::arg("x"), py::arg("dtypes"), py::arg("base"), py::arg("base_dtype"), py::arg("n"),
        py::arg("epsilon"), py::arg("boosts"), py::arg("out"), py::arg("out_dtype"), py::arg("num_threads") = 0,
        py::call_guard<py::gil_scoped_release>(), "mergekit's ram (ramplus_tl with boosts), fused (see csrc/cpu/elementwise_mix.cpp).");
}

PYMERGE_REGISTER(register_elementwise_mix);

}  // namespace
}  // namespace pymerge
