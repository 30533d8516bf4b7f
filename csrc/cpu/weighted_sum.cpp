// Fused weighted sum of N checkpoints into K outputs: out_k = sum_i W[k,i] * x_i.
// Each input element is read once and converted to float32 in registers; accumulation is in
// float32, in input order (first term w*x, then fused multiply-adds); every output is written once
// with round-to-nearest-even. A delta job (ws::Job::delta, task_arithmetic) takes input 0 as the base B:
// the sum runs over d_i = x_i - B from input 1 on (first w*d, then fmas), and B's own term comes last,
// fma(w_0, B, sum) (w_0 * B alone when B is the only input). Work is split into L1-sized blocks spread over the thread pool
// (parallel.cpp); grouped.cpp runs the same blocks over every tensor of a model in one call.
#include <immintrin.h>
#include <pybind11/stl.h>
#include <algorithm>
#include <stdexcept>
#include "cpu/avx2_store.h"
#include "cpu/avx512_store.h"
#include "cpu/weighted_sum.h"

namespace py = pybind11;

namespace pymerge {
namespace {

using ws::kBlock;

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

// ---- AVX-512 -----------------------------------------------------------------------------------
#define AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,fma,f16c")))

using ws::Job;

inline char* out_at(const Job& J, int64_t k, int64_t e) {
  return reinterpret_cast<char*>(J.out[k]) + e * dtype_size(J.out_dt[k]);
}

// Portable block: each input block is converted once into xbuf (or straight into the accumulator
// when K = 1), then fused-multiply-added into K float32 accumulators, then stored once.
// xbuf: 2 * kBlock floats (a delta job keeps the base's block in the second half).
template <class Acc, class AccFirst, class Store>
void block_buffered(const Job& J, int64_t start, int64_t len, float* accs, float* xbuf, AccFirst acc_first,
                    Acc acc_next, Store store) {
  if (J.delta) {
    auto src = [&](int64_t i) { return reinterpret_cast<const char*>(J.in[i]) + start * dtype_size(J.in_dt[i]); };
    float* base = xbuf + kBlock;
    acc_first(base, src(0), len, 1.0f, J.in_dt[0]);  // 1 * x: the value itself
    for (int64_t i = 1; i < J.n_in; ++i) {
      acc_first(xbuf, src(i), len, 1.0f, J.in_dt[i]);
      for (int64_t j = 0; j < len; ++j) xbuf[j] -= base[j];
      for (int64_t k = 0; k < J.n_out; ++k)
        (i == 1 ? acc_first : acc_next)(accs + k * kBlock, xbuf, len, J.w[k * J.n_in + i], F32);
    }
    for (int64_t k = 0; k < J.n_out; ++k)
      (J.n_in == 1 ? acc_first : acc_next)(accs + k * kBlock, base, len, J.w[k * J.n_in], F32);
    for (int64_t k = 0; k < J.n_out; ++k) store(out_at(J, k, start), accs + k * kBlock, len, J.out_dt[k]);
    return;
  }
  for (int64_t i = 0; i < J.n_in; ++i) {
    const char* src = reinterpret_cast<const char*>(J.in[i]) + start * dtype_size(J.in_dt[i]);
    if (J.n_out == 1) {
      (i == 0 ? acc_first : acc_next)(accs, src, len, J.w[i], J.in_dt[i]);
      continue;
    }
    acc_first(xbuf, src, len, 1.0f, J.in_dt[i]);
    for (int64_t k = 0; k < J.n_out; ++k)
      (i == 0 ? acc_first : acc_next)(accs + k * kBlock, xbuf, len, J.w[k * J.n_in + i], F32);
  }
  for (int64_t k = 0; k < J.n_out; ++k) store(out_at(J, k, start), accs + k * kBlock, len, J.out_dt[k]);
}

// AVX-512 block: strips of 32 elements with all K accumulators in registers, so every input
// element is loaded once and every output element stored once, with nothing in between.
// Past kDirectInputs inputs, so many streams at once starve the prefetchers (N = 16 on a Zen 4 ran at
// 0.5-0.7 of copy and below torch.compile): a single output's block is swept in passes of
// kInputsPerPass inputs, the float32 partial sums kept in an L2-sized buffer between passes (1.1-1.5x
// for N = 9-32; with 2-4 outputs the partials' traffic cancels the gain, within this machine's noise).
// Each element sees the same operations in the same order.
constexpr int kStrip = 32;
constexpr int kMaxK = 8;                  // accumulators per pass: 2 * 8 of the 32 zmm registers
constexpr int64_t kDirectInputs = 8;      // up to this many inputs: one pass over the block
constexpr int64_t kInputsPerPass = 4;
constexpr int64_t kPassOutputs = 1;       // up to this many outputs
constexpr int64_t kPassBlock = 16384;     // elements per block when sweeping in passes: partials in L2

inline bool in_passes(const Job& J) {
  return (J.streams > 0 ? J.streams : J.n_in) > kDirectInputs && J.n_out <= kPassOutputs;
}

// Inputs [i0, i1) of strips at a time; the partial sums of K outputs live at part[k * kPassBlock + j]
// between passes (a pass that does not start at input 0 loads them, one that does not end at the last
// input stores them instead of the outputs).
struct Pass {
  int64_t i0, i1;
  float* part;
  bool first() const { return i0 == 0; }
};

// Prefetch distance per input stream: fewer streams at once into one output can run further ahead
// (measured with one output only).
inline int64_t prefetch_bytes(const Job& J, const Pass& P) {
  return P.i1 - P.i0 <= kInputsPerPass && J.n_out <= kPassOutputs ? 2048 : 1024;
}

AVX512_TARGET inline __m512 load16_any(const char* p, int dt) {
  switch (dt) {
    case F32: return _mm512_loadu_ps(reinterpret_cast<const float*>(p));
    case F16: return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    case BF16: return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
    default: {  // float8: decode through the 256-entry table
      __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
      return _mm512_i32gather_ps(idx, fp8_table(dt), 4);
    }
  }
}

// The last len % 32 elements of a block: the strip loop again with masked loads and stores, so small
// tensors (a model of many) do not fall to scalar code. Masked-off lanes are neither read nor written.
AVX512_TARGET inline __m512 load16_masked(const char* p, int dt, __mmask16 m) {
  switch (dt) {
    case F32: return _mm512_maskz_loadu_ps(m, p);
    case F16: return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
    case BF16: return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
    default: return _mm512_i32gather_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, p)), fp8_table(dt), 4);
  }
}

AVX512_TARGET inline void store16_masked(char* p, __m512 x, int dt, __mmask16 m) {
  if (dt == F32) return _mm512_mask_storeu_ps(p, m, x);
  __m256i h = dt == F16 ? _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC) : f32_to_bf16_16(x);
  _mm256_mask_storeu_epi16(p, m, h);
}

// A delta job's last step: the base's own term, fma(w_0, B, sum), or w_0 * B where B is the only input.
template <int K>
AVX512_TARGET inline void add_base(__m512 (&acc)[K][2], const __m512 (&b)[2], const float* w, int64_t n_in) {
  for (int k = 0; k < K; ++k) {
    const __m512 wk = _mm512_set1_ps(w[k * n_in]);
    acc[k][0] = n_in > 1 ? _mm512_fmadd_ps(wk, b[0], acc[k][0]) : _mm512_mul_ps(wk, b[0]);
    acc[k][1] = n_in > 1 ? _mm512_fmadd_ps(wk, b[1], acc[k][1]) : _mm512_mul_ps(wk, b[1]);
  }
}

template <int K>
AVX512_TARGET void tail_avx512(const Job& J, int64_t k0, int64_t e, int64_t n) {
  const __mmask16 m0 = n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
  const __mmask16 m1 = n > 16 ? __mmask16((1u << (n - 16)) - 1) : __mmask16(0);
  __m512 acc[K][2], b[2];
  const int64_t first = J.delta ? 1 : 0;  // the input whose term starts the sums
  for (int64_t i = 0; i < J.n_in; ++i) {
    const int dt = J.in_dt[i];
    const size_t es = dtype_size(dt);
    const char* src = reinterpret_cast<const char*>(J.in[i]) + e * es;
    __m512 x0 = load16_masked(src, dt, m0), x1 = load16_masked(src + 16 * es, dt, m1);
    if (J.delta && i == 0) { b[0] = x0; b[1] = x1; continue; }
    if (J.delta) { x0 = _mm512_sub_ps(x0, b[0]); x1 = _mm512_sub_ps(x1, b[1]); }
    const float* w = J.w + k0 * J.n_in + i;
    for (int k = 0; k < K; ++k) {
      const __m512 wk = _mm512_set1_ps(w[k * J.n_in]);
      acc[k][0] = i != first ? _mm512_fmadd_ps(wk, x0, acc[k][0]) : _mm512_mul_ps(wk, x0);
      acc[k][1] = i != first ? _mm512_fmadd_ps(wk, x1, acc[k][1]) : _mm512_mul_ps(wk, x1);
    }
  }
  if (J.delta) add_base<K>(acc, b, J.w + k0 * J.n_in, J.n_in);
  for (int k = 0; k < K; ++k) {
    const int dt = J.out_dt[k0 + k];
    char* dst = out_at(J, k0 + k, e);
    store16_masked(dst, acc[k][0], dt, m0);
    store16_masked(dst + 16 * dtype_size(dt), acc[k][1], dt, m1);
  }
}

template <int K>
AVX512_TARGET void strips_avx512(const Job& J, int64_t k0, int64_t start, int64_t len, const Pass& P) {
  bool stream[K];
  for (int k = 0; k < K; ++k)  // stream only where every strip's store is aligned (bf16: 32 B, f32: 64 B)
    stream[k] = J.stream && reinterpret_cast<uintptr_t>(out_at(J, k0 + k, start)) % (J.out_dt[k0 + k] == F32 ? 64 : 32) == 0;
  const bool last = P.i1 == J.n_in;
  const int64_t ahead = prefetch_bytes(J, P);
  const int64_t first = J.delta ? 1 : 0;  // the input whose term starts the sums (a delta job's base: none)
  const int bdt = J.in_dt[0];
  const size_t bes = dtype_size(bdt);
  for (int64_t j = 0; j + kStrip <= len; j += kStrip) {
    const int64_t e = start + j;
    __m512 acc[K][2], b[2];
    if (!P.first())
      for (int k = 0; k < K; ++k) {
        acc[k][0] = _mm512_loadu_ps(P.part + k * kPassBlock + j);
        acc[k][1] = _mm512_loadu_ps(P.part + k * kPassBlock + j + 16);
      }
    if (J.delta) {  // the base's strip, in every pass (after the first, from cache)
      const char* src = reinterpret_cast<const char*>(J.in[0]) + e * bes;
      if (P.first()) _mm_prefetch(src + ahead, _MM_HINT_T0);
      b[0] = load16_any(src, bdt); b[1] = load16_any(src + 16 * bes, bdt);
    }
    for (int64_t i = std::max(P.i0, first); i < P.i1; ++i) {
      const int dt = J.in_dt[i];
      const size_t es = dtype_size(dt);
      const char* src = reinterpret_cast<const char*>(J.in[i]) + e * es;
      _mm_prefetch(src + ahead, _MM_HINT_T0);
      if (es == 4) _mm_prefetch(src + ahead + 64, _MM_HINT_T0);
      __m512 x0 = load16_any(src, dt), x1 = load16_any(src + 16 * es, dt);
      if (J.delta) { x0 = _mm512_sub_ps(x0, b[0]); x1 = _mm512_sub_ps(x1, b[1]); }
      const float* w = J.w + k0 * J.n_in + i;
#pragma GCC unroll 8
      for (int k = 0; k < K; ++k) {
        const __m512 wk = _mm512_set1_ps(w[k * J.n_in]);
        acc[k][0] = i != first ? _mm512_fmadd_ps(wk, x0, acc[k][0]) : _mm512_mul_ps(wk, x0);
        acc[k][1] = i != first ? _mm512_fmadd_ps(wk, x1, acc[k][1]) : _mm512_mul_ps(wk, x1);
      }
    }
    if (last && J.delta) add_base<K>(acc, b, J.w + k0 * J.n_in, J.n_in);
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k) {
      if (!last) {
        _mm512_storeu_ps(P.part + k * kPassBlock + j, acc[k][0]);
        _mm512_storeu_ps(P.part + k * kPassBlock + j + 16, acc[k][1]);
        continue;
      }
      const int dt = J.out_dt[k0 + k];
      char* dst = out_at(J, k0 + k, e);
      store16_any(dst, acc[k][0], dt, stream[k]);
      store16_any(dst + 16 * dtype_size(dt), acc[k][1], dt, stream[k]);
    }
  }
}

// All inputs and outputs bfloat16 (the common case): one 64-byte load per input gives 32 elements
// as two float32 vectors without any widening shuffle, the even elements (low halves shifted up) and
// the odd ones (high halves masked); the per-element arithmetic is strips_avx512's exactly, and the
// two rounded halves are interleaved back on integers into one 64-byte store.
AVX512_TARGET inline __m512i bf16_round_bits(__m512 x) {  // f32_to_bf16_16 before its narrowing
  const __m512i b = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  return _mm512_mask_or_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_srli_epi32(b, 16),
                              _mm512_set1_epi32(0x40));
}

template <int K>
AVX512_TARGET void strips_bf16(const Job& J, int64_t k0, int64_t start, int64_t len, const Pass& P) {
  bool stream[K];
  for (int k = 0; k < K; ++k) stream[k] = J.stream && reinterpret_cast<uintptr_t>(out_at(J, k0 + k, start)) % 64 == 0;
  const __m512i high = _mm512_set1_epi32(int(0xFFFF0000u));
  const bool last = P.i1 == J.n_in;
  const int64_t ahead = prefetch_bytes(J, P);
  const int64_t first = J.delta ? 1 : 0;
  for (int64_t j = 0; j + kStrip <= len; j += kStrip) {
    const int64_t e = start + j;
    __m512 acc[K][2], b[2];
    if (!P.first())
      for (int k = 0; k < K; ++k) {
        acc[k][0] = _mm512_loadu_ps(P.part + k * kPassBlock + j);
        acc[k][1] = _mm512_loadu_ps(P.part + k * kPassBlock + j + 16);
      }
    if (J.delta) {  // the base's strip (even and odd halves as the inputs'), in every pass
      const char* src = reinterpret_cast<const char*>(J.in[0]) + e * 2;
      if (P.first()) _mm_prefetch(src + ahead, _MM_HINT_T0);
      const __m512i v = _mm512_loadu_si512(src);
      b[0] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)); b[1] = _mm512_castsi512_ps(_mm512_and_si512(v, high));
    }
    for (int64_t i = std::max(P.i0, first); i < P.i1; ++i) {
      const char* src = reinterpret_cast<const char*>(J.in[i]) + e * 2;
      _mm_prefetch(src + ahead, _MM_HINT_T0);
      const __m512i v = _mm512_loadu_si512(src);
      __m512 x0 = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), x1 = _mm512_castsi512_ps(_mm512_and_si512(v, high));
      if (J.delta) { x0 = _mm512_sub_ps(x0, b[0]); x1 = _mm512_sub_ps(x1, b[1]); }
      const float* w = J.w + k0 * J.n_in + i;
#pragma GCC unroll 8
      for (int k = 0; k < K; ++k) {
        const __m512 wk = _mm512_set1_ps(w[k * J.n_in]);
        acc[k][0] = i != first ? _mm512_fmadd_ps(wk, x0, acc[k][0]) : _mm512_mul_ps(wk, x0);
        acc[k][1] = i != first ? _mm512_fmadd_ps(wk, x1, acc[k][1]) : _mm512_mul_ps(wk, x1);
      }
    }
    if (last && J.delta) add_base<K>(acc, b, J.w + k0 * J.n_in, J.n_in);
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k) {
      if (!last) {  // the even and odd halves as they are: the next pass reads them back alike
        _mm512_storeu_ps(P.part + k * kPassBlock + j, acc[k][0]);
        _mm512_storeu_ps(P.part + k * kPassBlock + j + 16, acc[k][1]);
        continue;
      }
      const __m512i h = _mm512_or_si512(bf16_round_bits(acc[k][0]), _mm512_slli_epi32(bf16_round_bits(acc[k][1]), 16));
      void* dst = out_at(J, k0 + k, e);
      if (stream[k]) _mm512_stream_si512(static_cast<__m512i*>(dst), h);
      else _mm512_storeu_si512(dst, h);
    }
  }
}

inline bool all_bf16(const Job& J) {
  for (int64_t i = 0; i < J.n_in; ++i) if (J.in_dt[i] != BF16) return false;
  for (int64_t k = 0; k < J.n_out; ++k) if (J.out_dt[k] != BF16) return false;
  return true;
}

// part: kPassOutputs * kPassBlock floats (used when the inputs are swept in passes).
AVX512_TARGET void block_avx512(const Job& J, int64_t start, int64_t len, float* part, float*) {
  using StripFn = void (*)(const Job&, int64_t, int64_t, int64_t, const Pass&);
  static const StripFn by_k[kMaxK] = {
      strips_avx512<1>, strips_avx512<2>, strips_avx512<3>, strips_avx512<4>,
      strips_avx512<5>, strips_avx512<6>, strips_avx512<7>, strips_avx512<8>};
  static void (*const tail_k[kMaxK])(const Job&, int64_t, int64_t, int64_t) = {
      tail_avx512<1>, tail_avx512<2>, tail_avx512<3>, tail_avx512<4>,
      tail_avx512<5>, tail_avx512<6>, tail_avx512<7>, tail_avx512<8>};
  static const StripFn bf16_k[kMaxK] = {
      strips_bf16<1>, strips_bf16<2>, strips_bf16<3>, strips_bf16<4>,
      strips_bf16<5>, strips_bf16<6>, strips_bf16<7>, strips_bf16<8>};
  const int64_t done = len / kStrip * kStrip;
  const auto strips = all_bf16(J) ? bf16_k : by_k;
  const int64_t per_pass = in_passes(J) ? kInputsPerPass : J.n_in;
  for (int64_t k0 = 0; k0 < J.n_out; k0 += kMaxK) {  // more than 8 outputs: re-read the block from cache
    const int64_t kk = std::min<int64_t>(kMaxK, J.n_out - k0) - 1;
    for (int64_t i0 = 0; i0 < J.n_in; i0 += per_pass)
      strips[kk](J, k0, start, done, Pass{i0, std::min(J.n_in, i0 + per_pass), part});
    if (done < len) tail_k[kk](J, k0, start + done, len - done);  // the last few elements of the tensor
  }
}

// ---- AVX2 strips ---------------------------------------------------------------------------------
// strips_avx512's loop at half the width: strips of 16 elements, the accumulators of up to 6
// outputs (12 of the 16 ymm registers) held in registers, the same operations in the same order.
// No software prefetch: on Zen 3 it cost 10-30 % (N = 8 and 16 bfloat16 inputs of 4M elements),
// the hardware prefetchers keep up with these streams.
#define AVX2_TARGET __attribute__((target("avx2,fma,f16c")))
constexpr int kStrip2 = 16;
constexpr int kMaxK2 = 6;

// acc[k] = w[k * stride] * x (input i = 0) or fma(w[k * stride], x, acc[k]), for the strip's two halves.
template <int K>
AVX2_TARGET inline void accumulate_strip(__m256 (&acc)[K][2], __m256 x0, __m256 x1, const float* w, int64_t stride,
                                         bool first) {
#pragma GCC unroll 6
  for (int k = 0; k < K; ++k) {
    const __m256 wk = _mm256_set1_ps(w[k * stride]);
    acc[k][0] = first ? _mm256_mul_ps(wk, x0) : _mm256_fmadd_ps(wk, x0, acc[k][0]);
    acc[k][1] = first ? _mm256_mul_ps(wk, x1) : _mm256_fmadd_ps(wk, x1, acc[k][1]);
  }
}

// A delta job's last step, as add_base.
template <int K>
AVX2_TARGET inline void add_base_avx2(__m256 (&acc)[K][2], const __m256 (&b)[2], const float* w, int64_t n_in) {
#pragma GCC unroll 6
  for (int k = 0; k < K; ++k) {
    const __m256 wk = _mm256_set1_ps(w[k * n_in]);
    acc[k][0] = n_in > 1 ? _mm256_fmadd_ps(wk, b[0], acc[k][0]) : _mm256_mul_ps(wk, b[0]);
    acc[k][1] = n_in > 1 ? _mm256_fmadd_ps(wk, b[1], acc[k][1]) : _mm256_mul_ps(wk, b[1]);
  }
}

template <int K>
AVX2_TARGET void strips_avx2(const Job& J, int64_t k0, int64_t start, int64_t len) {
  bool stream[K];
  for (int k = 0; k < K; ++k)  // stream only where every strip's store is aligned (bf16: 16 B, f32: 32 B)
    stream[k] = J.stream && reinterpret_cast<uintptr_t>(out_at(J, k0 + k, start)) % (J.out_dt[k0 + k] == F32 ? 32 : 16) == 0;
  const int64_t first = J.delta ? 1 : 0;  // the input whose term starts the sums (a delta job's base: none)
  for (int64_t j = 0; j + kStrip2 <= len; j += kStrip2) {
    const int64_t e = start + j;
    __m256 acc[K][2], b[2];
    if (J.delta) {  // the base's strip
      const int dt = J.in_dt[0];
      const char* src = reinterpret_cast<const char*>(J.in[0]) + e * dtype_size(dt);
      b[0] = load8_any(src, dt); b[1] = load8_any(src + 8 * dtype_size(dt), dt);
    }
    for (int64_t i = first; i < J.n_in; ++i) {
      const int dt = J.in_dt[i];
      const size_t es = dtype_size(dt);
      const char* src = reinterpret_cast<const char*>(J.in[i]) + e * es;
      __m256 x0 = load8_any(src, dt), x1 = load8_any(src + 8 * es, dt);
      if (J.delta) { x0 = _mm256_sub_ps(x0, b[0]); x1 = _mm256_sub_ps(x1, b[1]); }
      accumulate_strip<K>(acc, x0, x1, J.w + k0 * J.n_in + i, J.n_in, i == first);
    }
    if (J.delta) add_base_avx2<K>(acc, b, J.w + k0 * J.n_in, J.n_in);
#pragma GCC unroll 6
    for (int k = 0; k < K; ++k) {
      const int dt = J.out_dt[k0 + k];
      char* dst = out_at(J, k0 + k, e);
      store8_any(dst, acc[k][0], dt, stream[k]);
      store8_any(dst + 8 * dtype_size(dt), acc[k][1], dt, stream[k]);
    }
  }
}

// All bfloat16, as strips_bf16: one 32-byte load gives the even elements (low halves shifted up)
// and the odd ones (high halves masked), and the two rounded halves interleave into one store.
template <int K>
AVX2_TARGET void strips_bf16_avx2(const Job& J, int64_t k0, int64_t start, int64_t len) {
  bool stream[K];
  for (int k = 0; k < K; ++k) stream[k] = J.stream && reinterpret_cast<uintptr_t>(out_at(J, k0 + k, start)) % 32 == 0;
  const __m256i high = _mm256_set1_epi32(int(0xFFFF0000u));
  const int64_t first = J.delta ? 1 : 0;
  for (int64_t j = 0; j + kStrip2 <= len; j += kStrip2) {
    const int64_t e = start + j;
    __m256 acc[K][2], b[2];
    if (J.delta) {  // the base's strip, even and odd halves as the inputs'
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(reinterpret_cast<const char*>(J.in[0]) + e * 2));
      b[0] = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)); b[1] = _mm256_castsi256_ps(_mm256_and_si256(v, high));
    }
    for (int64_t i = first; i < J.n_in; ++i) {
      const char* src = reinterpret_cast<const char*>(J.in[i]) + e * 2;
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
      __m256 x0 = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), x1 = _mm256_castsi256_ps(_mm256_and_si256(v, high));
      if (J.delta) { x0 = _mm256_sub_ps(x0, b[0]); x1 = _mm256_sub_ps(x1, b[1]); }
      accumulate_strip<K>(acc, x0, x1, J.w + k0 * J.n_in + i, J.n_in, i == first);
    }
    if (J.delta) add_base_avx2<K>(acc, b, J.w + k0 * J.n_in, J.n_in);
#pragma GCC unroll 6
    for (int k = 0; k < K; ++k) {
      const __m256i h = _mm256_or_si256(bf16_round_bits_8(acc[k][0]), _mm256_slli_epi32(bf16_round_bits_8(acc[k][1]), 16));
      __m256i* dst = reinterpret_cast<__m256i*>(out_at(J, k0 + k, e));
      if (stream[k]) _mm256_stream_si256(dst, h);
      else _mm256_storeu_si256(dst, h);
    }
  }
}

// ---- driver ------------------------------------------------------------------------------------
using BlockFn = void (*)(const Job&, int64_t, int64_t, float*, float*);

void block_scalar(const Job& J, int64_t start, int64_t len, float* accs, float* xbuf) {
  block_buffered(J, start, len, accs, xbuf, acc_scalar<true>, acc_scalar<false>, store_scalar);
}

AVX2_TARGET void block_avx2(const Job& J, int64_t start, int64_t len, float* accs, float* xbuf) {
  static void (*const by_k[kMaxK2])(const Job&, int64_t, int64_t, int64_t) = {
      strips_avx2<1>, strips_avx2<2>, strips_avx2<3>, strips_avx2<4>, strips_avx2<5>, strips_avx2<6>};
  static void (*const bf16_k[kMaxK2])(const Job&, int64_t, int64_t, int64_t) = {
      strips_bf16_avx2<1>, strips_bf16_avx2<2>, strips_bf16_avx2<3>,
      strips_bf16_avx2<4>, strips_bf16_avx2<5>, strips_bf16_avx2<6>};
  const auto strips = all_bf16(J) ? bf16_k : by_k;
  for (int64_t k0 = 0; k0 < J.n_out; k0 += kMaxK2)  // more than 6 outputs: re-read the block from cache
    strips[std::min<int64_t>(kMaxK2, J.n_out - k0) - 1](J, k0, start, len);
  const int64_t done = len / kStrip2 * kStrip2;
  if (done < len) block_scalar(J, start + done, len - done, accs, xbuf);  // the last few elements: the same operations
}

BlockFn pick_block() {
  std::string level = simd_level();
  if (level == "avx512") return block_avx512;
  if (level == "avx2") return block_avx2;
  return block_scalar;
}

constexpr int64_t kBlocksPerChunk = 16;          // 64K elements claimed at a time by a thread
constexpr int64_t kOutputsPerPass = 64;          // outputs per pass over a block: 1 MiB of accumulators

}  // namespace

void ws::check_codes(const std::vector<int>& in_dtypes, const std::vector<int>& out_dtypes) {
  for (int dt : in_dtypes) if (dt < F32 || dt > kMaxInputDType) throw std::invalid_argument("weighted_sum: bad input dtype code");
  for (int dt : out_dtypes) if (dt < F32 || dt > kMaxOutputDType) throw std::invalid_argument("weighted_sum: bad output dtype code");
}

void ws::fence() { _mm_sfence(); }

int64_t ws::distinct_inputs(const uintptr_t* in, int64_t n) {
  if (n <= kDirectInputs) return n;
  std::vector<uintptr_t> sorted(in, in + n);
  std::sort(sorted.begin(), sorted.end());
  return int64_t(std::unique(sorted.begin(), sorted.end()) - sorted.begin());
}

void ws::run_range(const Job& J, int64_t start, int64_t end, bool fence) {
  static const BlockFn block = pick_block();
  // Inputs swept in passes (block_avx512) take longer blocks, their partial sums in L2.
  const bool passes = block == block_avx512 && in_passes(J);
  const int64_t step = passes ? kPassBlock : kBlock;
  thread_local std::vector<float> accs, xbuf;
  // Partials of up to kPassOutputs outputs (a last group of outputs may be that few), else accumulators.
  const bool some_passes = block == block_avx512 && J.n_in > kDirectInputs;
  accs.resize(std::max(size_t(std::min(J.n_out, kOutputsPerPass) * kBlock),
                       some_passes ? size_t(kPassOutputs * kPassBlock) : size_t(0)));
  xbuf.resize(2 * kBlock);  // an input's block, and a delta job's base (block_buffered)
  for (int64_t b = start; b < end; b += step) {
    // Any number of outputs, kOutputsPerPass at a time: the accumulators stay bounded and the
    // block is re-read from cache for each group.
    for (int64_t k0 = 0; k0 < J.n_out; k0 += kOutputsPerPass) {
      const Job G{J.in, J.in_dt, J.n_in, J.w + k0 * J.n_in, J.out + k0, J.out_dt + k0,
                  std::min(kOutputsPerPass, J.n_out - k0), J.stream, J.streams, J.delta};
      block(G, b, std::min(step, end - b), accs.data(), xbuf.data());
    }
  }
  if (J.stream && fence) _mm_sfence();  // make this thread's streaming stores visible before the call returns
}

namespace {

void weighted_sum_many(const std::vector<uintptr_t>& in_ptrs, const std::vector<int>& in_dtypes, int64_t numel,
                       const std::vector<float>& weights, const std::vector<uintptr_t>& out_ptrs,
                       const std::vector<int>& out_dtypes, int num_threads, bool delta) {
  const int64_t n_in = int64_t(in_ptrs.size()), n_out = int64_t(out_ptrs.size());
  if (n_in == 0 || n_out == 0) throw std::invalid_argument("weighted_sum: need at least one input and one output");
  if (int64_t(in_dtypes.size()) != n_in || int64_t(out_dtypes.size()) != n_out ||
      int64_t(weights.size()) != n_in * n_out)
    throw std::invalid_argument("weighted_sum: inconsistent argument lengths");
  ws::check_codes(in_dtypes, out_dtypes);
  if (numel <= 0) return;
  const Job J{in_ptrs.data(), in_dtypes.data(), n_in, weights.data(), out_ptrs.data(), out_dtypes.data(), n_out,
              numel * 2 >= ws::kStreamBytes, ws::distinct_inputs(in_ptrs.data(), n_in), delta};
  const int64_t n_blocks = (numel + kBlock - 1) / kBlock;
  const int64_t wanted = num_threads > 0 ? num_threads : default_threads();
  const int threads = int(std::max<int64_t>(1, std::min(wanted, (numel + ws::kMinPerThread - 1) / ws::kMinPerThread)));
  // Chunks of several blocks keep each thread's input streams long (prefetching runs ahead).
  parallel_for(n_blocks, kBlocksPerChunk, threads, [&](int64_t b0, int64_t b1) {
    ws::run_range(J, b0 * kBlock, std::min(numel, b1 * kBlock));
  });
}

void register_weighted_sum(py::module_& m) {
  m.def("weighted_sum_many", &weighted_sum_many, py::arg("in_ptrs"), py::arg("in_dtypes"), py::arg("numel"),
        py::arg("weights"), py::arg("out_ptrs"), py::arg("out_dtypes"), py::arg("num_threads") = 0,
        py::arg("delta") = false, py::call_guard<py::gil_scoped_release>(),
        "out_k = sum_i weights[k*N+i] * in_i over numel elements (raw pointers, dtype codes); delta: in_0 is a "
        "base B, out_k = weights[k*N] * B + sum_{i>=1} weights[k*N+i] * (in_i - B).");
}

PYMERGE_REGISTER(register_weighted_sum);

}  // namespace
}  // namespace pymerge
