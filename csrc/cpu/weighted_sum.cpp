// Fused weighted sum of N checkpoints into K outputs: out_k = sum_i W[k,i] * x_i.
// Each input element is read once and converted to float32 in registers; accumulation is in
// float32, in input order (first term w*x, then fused multiply-adds); every output is written once
// with round-to-nearest-even. Work is split into L1-sized blocks spread over OpenMP threads.
#include <immintrin.h>
#include <omp.h>
#include <pybind11/stl.h>
#include <algorithm>
#include <stdexcept>
#include "cpu/common.h"

namespace py = pybind11;

namespace pymerge {
namespace {

constexpr int64_t kBlock = 4096;  // floats per accumulator block: 16 KiB, stays in L1

// ---- scalar path (any x86-64 or other CPU) ---------------------------------------------------
template <bool First>
void acc_scalar(float* acc, const void* src, int64_t n, float w, int dt) {
  auto put = [&](int64_t i, float x) { acc[i] = First ? w * x : std::fma(w, x, acc[i]); };
  switch (dt) {
    case F32: { auto s = static_cast<const float*>(src); for (int64_t i = 0; i < n; ++i) put(i, s[i]); break; }
    case F16: { auto s = static_cast<const uint16_t*>(src); for (int64_t i = 0; i < n; ++i) put(i, f16_to_f32(s[i])); break; }
    case BF16: { auto s = static_cast<const uint16_t*>(src); for (int64_t i = 0; i < n; ++i) put(i, bf16_to_f32(s[i])); break; }
    default: {
      auto s = static_cast<const uint8_t*>(src);
      const float* t = fp8_table(dt);
      for (int64_t i = 0; i < n; ++i) put(i, t[s[i]]);
    }
  }
}

void store_scalar(void* dst, const float* acc, int64_t n, int dt) {
  switch (dt) {
    case F32: std::memcpy(dst, acc, n * 4); break;
    case F16: { auto d = static_cast<uint16_t*>(dst); for (int64_t i = 0; i < n; ++i) d[i] = f32_to_f16(acc[i]); break; }
    default: { auto d = static_cast<uint16_t*>(dst); for (int64_t i = 0; i < n; ++i) d[i] = f32_to_bf16(acc[i]); }
  }
}

// ---- AVX2 + FMA + F16C -------------------------------------------------------------------------
#define AVX2_TARGET __attribute__((target("avx2,fma,f16c")))

AVX2_TARGET inline __m256 load8(const void* src, int64_t i, int dt) {
  if (dt == F32) return _mm256_loadu_ps(static_cast<const float*>(src) + i);
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(src) + i));
  if (dt == F16) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

template <bool First>
AVX2_TARGET void acc_avx2(float* acc, const void* src, int64_t n, float w, int dt) {
  if (dt > BF16) return acc_scalar<First>(acc, src, n, w, dt);
  const __m256 vw = _mm256_set1_ps(w);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 x = load8(src, i, dt);
    _mm256_storeu_ps(acc + i, First ? _mm256_mul_ps(vw, x) : _mm256_fmadd_ps(vw, x, _mm256_loadu_ps(acc + i)));
  }
  const char* base = static_cast<const char*>(src) + i * dtype_size(dt);
  acc_scalar<First>(acc + i, base, n - i, w, dt);
}

AVX2_TARGET void store_avx2(void* dst, const float* acc, int64_t n, int dt) {
  if (dt != F16) return store_scalar(dst, acc, n, dt);
  auto d = static_cast<uint16_t*>(dst);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i), _mm256_cvtps_ph(_mm256_loadu_ps(acc + i), _MM_FROUND_TO_NEAREST_INT));
  store_scalar(d + i, acc + i, n - i, dt);
}

// ---- AVX-512 -----------------------------------------------------------------------------------
#define AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,fma,f16c")))

AVX512_TARGET inline __m512 load16(const void* src, int64_t i, int dt) {
  if (dt == F32) return _mm512_loadu_ps(static_cast<const float*>(src) + i);
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(src) + i));
  if (dt == F16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

template <bool First>
AVX512_TARGET void acc_avx512(float* acc, const void* src, int64_t n, float w, int dt) {
  if (dt > BF16) return acc_scalar<First>(acc, src, n, w, dt);
  const __m512 vw = _mm512_set1_ps(w);
  const char* bytes = static_cast<const char*>(src);
  const size_t esize = dtype_size(dt);
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {  // two vectors per step keeps two loads in flight
    // The same thread takes the next block next (static schedule): fetch this input's share of it
    // now, since hardware prefetchers stop at page edges and juggle N streams poorly.
    _mm_prefetch(bytes + (i + kBlock) * esize, _MM_HINT_T0);
    if (esize == 4) _mm_prefetch(bytes + (i + kBlock + 16) * esize, _MM_HINT_T0);
    __m512 x0 = load16(src, i, dt), x1 = load16(src, i + 16, dt);
    _mm512_storeu_ps(acc + i, First ? _mm512_mul_ps(vw, x0) : _mm512_fmadd_ps(vw, x0, _mm512_loadu_ps(acc + i)));
    _mm512_storeu_ps(acc + i + 16, First ? _mm512_mul_ps(vw, x1) : _mm512_fmadd_ps(vw, x1, _mm512_loadu_ps(acc + i + 16)));
  }
  const char* base = static_cast<const char*>(src) + i * dtype_size(dt);
  acc_scalar<First>(acc + i, base, n - i, w, dt);
}

// float32 -> bfloat16, round to nearest even, done on integers so denormals are kept
// (VCVTNEPS2BF16 would flush them to zero).
AVX512_TARGET inline __m256i f32_to_bf16_16(__m512 x) {
  __m512i b = _mm512_castps_si512(x);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(b, 16), _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(r);
}

// Streaming (non-temporal) stores where the output is aligned: the output is not read back,
// so skipping the read-for-ownership saves a third of its memory traffic.
AVX512_TARGET void store_avx512(void* dst, const float* acc, int64_t n, int dt) {
  if (dt == F32) return store_scalar(dst, acc, n, dt);
  auto d = static_cast<uint16_t*>(dst);
  const bool stream = (reinterpret_cast<uintptr_t>(d) % 32) == 0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m512 x = _mm512_loadu_ps(acc + i);
    __m256i h = dt == F16 ? _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC) : f32_to_bf16_16(x);
    if (stream) _mm256_stream_si256(reinterpret_cast<__m256i*>(d + i), h);
    else _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i), h);
  }
  store_scalar(d + i, acc + i, n - i, dt);
}

// ---- driver ------------------------------------------------------------------------------------
struct Kernels {
  void (*acc_first)(float*, const void*, int64_t, float, int);
  void (*acc_next)(float*, const void*, int64_t, float, int);
  void (*store)(void*, const float*, int64_t, int);
};

Kernels pick_kernels() {
  std::string level = simd_level();
  if (level == "avx512") return {acc_avx512<true>, acc_avx512<false>, store_avx512};
  if (level == "avx2") return {acc_avx2<true>, acc_avx2<false>, store_avx2};
  return {acc_scalar<true>, acc_scalar<false>, store_scalar};
}

const void* at(uintptr_t p, int64_t i, int dt) { return reinterpret_cast<const char*>(p) + i * dtype_size(dt); }

void weighted_sum_many(const std::vector<uintptr_t>& in_ptrs, const std::vector<int>& in_dtypes, int64_t numel,
                       const std::vector<float>& weights, const std::vector<uintptr_t>& out_ptrs,
                       const std::vector<int>& out_dtypes, int num_threads) {
  const int64_t n_in = int64_t(in_ptrs.size()), n_out = int64_t(out_ptrs.size());
  if (n_in == 0 || n_out == 0) throw std::invalid_argument("weighted_sum: need at least one input and one output");
  if (int64_t(in_dtypes.size()) != n_in || int64_t(out_dtypes.size()) != n_out ||
      int64_t(weights.size()) != n_in * n_out)
    throw std::invalid_argument("weighted_sum: inconsistent argument lengths");
  for (int dt : in_dtypes) if (dt < F32 || dt > F8E5M2) throw std::invalid_argument("weighted_sum: bad input dtype code");
  for (int dt : out_dtypes) if (dt < F32 || dt > BF16) throw std::invalid_argument("weighted_sum: bad output dtype code");
  if (numel <= 0) return;
  static const Kernels k = pick_kernels();
  const int64_t n_blocks = (numel + kBlock - 1) / kBlock;
  const int threads = int(std::max<int64_t>(1, std::min<int64_t>(num_threads > 0 ? num_threads : omp_get_max_threads(), n_blocks)));

#pragma omp parallel num_threads(threads)
  {
    // K accumulators; with K > 1 each input block is converted once into xbuf, then reused K times.
    std::vector<float> accs(size_t(n_out) * kBlock), xbuf(n_out > 1 ? kBlock : 0);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < n_blocks; ++b) {
      const int64_t start = b * kBlock, len = std::min(kBlock, numel - start);
      if (n_out == 1) {
        float* acc = accs.data();
        for (int64_t i = 0; i < n_in; ++i)
          (i == 0 ? k.acc_first : k.acc_next)(acc, at(in_ptrs[i], start, in_dtypes[i]), len, weights[i], in_dtypes[i]);
      } else {
        for (int64_t i = 0; i < n_in; ++i) {
          k.acc_first(xbuf.data(), at(in_ptrs[i], start, in_dtypes[i]), len, 1.0f, in_dtypes[i]);
          for (int64_t o = 0; o < n_out; ++o)
            (i == 0 ? k.acc_first : k.acc_next)(accs.data() + o * kBlock, xbuf.data(), len, weights[o * n_in + i], F32);
        }
      }
      for (int64_t o = 0; o < n_out; ++o)
        k.store(reinterpret_cast<char*>(out_ptrs[o]) + start * dtype_size(out_dtypes[o]), accs.data() + o * kBlock, len, out_dtypes[o]);
    }
    _mm_sfence();  // order the streaming stores before the results are used
  }
}

void register_weighted_sum(py::module_& m) {
  m.def("weighted_sum_many", &weighted_sum_many, py::arg("in_ptrs"), py::arg("in_dtypes"), py::arg("numel"),
        py::arg("weights"), py::arg("out_ptrs"), py::arg("out_dtypes"), py::arg("num_threads") = 0,
        py::call_guard<py::gil_scoped_release>(),
        "out_k = sum_i weights[k*N+i] * in_i over numel elements (raw pointers, dtype codes).");
}

PYMERGE_REGISTER(register_weighted_sum);

}  // namespace
}  // namespace pymerge
