// CUDA decode-and-accumulate for delta-compressed pools: out_k = sum_t W[k, t] * decode(term_t).
// The arithmetic and layouts of csrc/cpu/delta_decode.cpp, so the bits are the C++ kernel's:
// coef = float32(w * scale) per 64-element block (w for dense terms), acc = fma(coef, x, acc) over
// the terms in order from -0.0 (x: the code, exact in float32, or the dense value), one
// round-to-nearest-even store (NaN payloads aside: the GPU's arithmetic returns canonical NaNs). Terms come as device tables (addresses, scale addresses, kinds)
// and weights as a device [K, T] float32 array, so one compiled kernel serves every mix of formats
// and any number of terms.
//
// A thread owns half of an int4 group (8 of its 16 words, 32 bytes) and walks the group's eight
// runs h: elements 16h + 8q .. 16h + 8q + 7 of the group are 8 consecutive elements, so dense
// terms load 16 bytes (bf16/f16) or 32 bytes (f32) and outputs store 16/32 bytes per run; int4
// codes are two 16-byte loads per run (L1 hits after the first), int8 codes one 8-byte load.
// The pool is bandwidth-bound on a GPU: these vector loads keep the load instructions per byte
// low (the Triton kernel loads every element on its own; benchmarks/gpu_codegen.py).
#include <cuda_runtime.h>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>
#include "cuda/delta_decode.h"
#include "cuda/dtypes.cuh"

namespace pymerge_cuda {
namespace {

constexpr int kQ8 = 16, kQ4 = 17;  // term kinds beyond the dtype codes (pymerge/pool/compressed.py)
constexpr int kThreads = 256;
constexpr int kMaxK = 4;         // outputs per launch: 4 x 8 accumulators

struct Outs {
  void* p[kMaxK];
  int dt[kMaxK];
};

__device__ __forceinline__ float bf16_bits_to_f32(uint32_t h) { return __uint_as_float(h << 16); }

// float32 -> bfloat16 on the bits, as the C++ stores: nearest even, NaNs kept quiet with their sign.
__device__ __forceinline__ uint16_t f32_to_bf16_bits(float f) {
  const uint32_t b = __float_as_uint(f);
  if ((b & 0x7fffffffu) > 0x7f800000u) return uint16_t((b >> 16) | 0x40u);
  return uint16_t((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

// x[0..n) = term values (codes unscaled) at elements e .. e+n-1 of one run; vec: n == 8 and
// every address 16-byte aligned.
template <bool VEC>
__device__ __forceinline__ void load_run(const void* p, int kind, int64_t e, int n, float (&x)[8]) {
  if (kind == kQ4) {  // word (e % 128) % 16 of group e / 128, nibble (e % 128) / 16
    const uint32_t* words = static_cast<const uint32_t*>(p) + e / 128 * 16;
    const int h = int(e % 128) / 16, i0 = int(e % 16);
    uint32_t w[8];
    if (VEC) {
      const uint4 a = __ldg(reinterpret_cast<const uint4*>(words + i0)), b = __ldg(reinterpret_cast<const uint4*>(words + i0) + 1);
      w[0] = a.x; w[1] = a.y; w[2] = a.z; w[3] = a.w; w[4] = b.x; w[5] = b.y; w[6] = b.z; w[7] = b.w;
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) w[j] = j < n ? __ldg(words + i0 + j) : 0u;
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) x[j] = float(int((w[j] >> (4 * h)) & 15u) - 8);
  } else if (kind == kQ8) {
    const int8_t* c = static_cast<const int8_t*>(p) + e;
    if (VEC) {
      const uint2 v = __ldg(reinterpret_cast<const uint2*>(c));
#pragma unroll
      for (int j = 0; j < 8; ++j) x[j] = float(int8_t(((j < 4 ? v.x : v.y) >> (8 * (j % 4))) & 0xffu));
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) x[j] = j < n ? float(c[j]) : 0.0f;
    }
  } else if (VEC && (kind == BF16 || kind == F16)) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(p) + e));
    const uint32_t u[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const uint32_t h = (u[j / 2] >> (16 * (j % 2))) & 0xffffu;
      x[j] = kind == BF16 ? bf16_bits_to_f32(h) : __half2float(__ushort_as_half(uint16_t(h)));
    }
  } else if (VEC && kind == F32) {
    const float4* q = reinterpret_cast<const float4*>(static_cast<const float*>(p) + e);
    const float4 a = __ldg(q), b = __ldg(q + 1);
    x[0] = a.x; x[1] = a.y; x[2] = a.z; x[3] = a.w; x[4] = b.x; x[5] = b.y; x[6] = b.z; x[7] = b.w;
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) x[j] = j < n ? load_f32(p, e + j, kind) : 0.0f;
  }
}

template <bool VEC>
__device__ __forceinline__ void store_run(void* p, int dt, int64_t e, int n, const float (&a)[8]) {
  if (VEC && dt == F32) {
    float4* q = reinterpret_cast<float4*>(static_cast<float*>(p) + e);  // __stcg: one 16-byte store each
    __stcg(q, make_float4(a[0], a[1], a[2], a[3]));
    __stcg(q + 1, make_float4(a[4], a[5], a[6], a[7]));
  } else if (VEC) {
    uint32_t u[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint32_t lo = dt == BF16 ? f32_to_bf16_bits(a[2 * j]) : __half_as_ushort(__float2half_rn(a[2 * j]));
      const uint32_t hi = dt == BF16 ? f32_to_bf16_bits(a[2 * j + 1]) : __half_as_ushort(__float2half_rn(a[2 * j + 1]));
      u[j] = lo | (hi << 16);
    }
    __stcg(reinterpret_cast<uint4*>(static_cast<uint16_t*>(p) + e), make_uint4(u[0], u[1], u[2], u[3]));
  } else {
#pragma unroll  // static indices keep the accumulators in registers
    for (int j = 0; j < 8; ++j) {
      if (j >= n) break;
      if (dt == F32) static_cast<float*>(p)[e + j] = a[j];
      else static_cast<uint16_t*>(p)[e + j] = dt == F16 ? __half_as_ushort(__float2half_rn(a[j])) : f32_to_bf16_bits(a[j]);
    }
  }
}

// One run of 8 elements starting at e (n of them inside the tensor) for K outputs.
template <int K, bool VEC>
__device__ __forceinline__ void run(const uint64_t* __restrict__ data, const uint64_t* __restrict__ scales,
                                    const int* __restrict__ kinds, const float* __restrict__ w, int n_terms,
                                    const Outs& outs, int64_t e, int n) {
  float acc[K][8];
#pragma unroll
  for (int k = 0; k < K; ++k)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[k][j] = -0.0f;
  for (int t = 0; t < n_terms; ++t) {
    const int kind = __ldg(kinds + t);
    const void* p = reinterpret_cast<const void*>(__ldg(data + t));
    float x[8];
    load_run<VEC>(p, kind, e, n, x);
    const bool q = kind == kQ4 || kind == kQ8;
    // runs never straddle a scale block (8 | 64)
    const float s = q ? bf16_bits_to_f32(__ldg(reinterpret_cast<const uint16_t*>(__ldg(scales + t)) + e / 64)) : 1.0f;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const float wk = __ldg(w + k * n_terms + t);
      const float c = q ? __fmul_rn(wk, s) : wk;
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[k][j] = __fmaf_rn(c, x[j], acc[k][j]);
    }
  }
#pragma unroll
  for (int k = 0; k < K; ++k) store_run<VEC>(outs.p[k], outs.dt[k], e, n, acc[k]);
}

template <int K, bool VEC>
__global__ void __launch_bounds__(kThreads, 2)
delta_accumulate_kernel(const uint64_t* __restrict__ data, const uint64_t* __restrict__ scales,
                        const int* __restrict__ kinds, const float* __restrict__ w, int n_terms,
                        const __grid_constant__ Outs outs, int64_t numel) {
  const int64_t n_halves = (numel + 127) / 128 * 2;
  for (int64_t u = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; u < n_halves; u += int64_t(gridDim.x) * blockDim.x) {
    const int64_t g0 = u / 2 * 128 + (u % 2) * 8;
    for (int h = 0; h < 8; ++h) {
      const int64_t e = g0 + 16 * h;
      if (e >= numel) break;  // runs grow with h
      const int n = numel - e >= 8 ? 8 : int(numel - e);
      if (n == 8) run<K, VEC>(data, scales, kinds, w, n_terms, outs, e, 8);
      else run<K, false>(data, scales, kinds, w, n_terms, outs, e, n);
    }
  }
}

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("pymerge CUDA ") + what + ": " + cudaGetErrorString(e));
}

template <int K>
void launch(bool aligned, const uint64_t* d, const uint64_t* s, const int* kd, const float* w, int n_terms,
            const Outs& o, int64_t numel, cudaStream_t st) {
  const int64_t halves = (numel + 127) / 128 * 2;
  const int blocks = int(std::min<int64_t>((halves + kThreads - 1) / kThreads, int64_t(1) << 20));
  if (aligned) delta_accumulate_kernel<K, true><<<blocks, kThreads, 0, st>>>(d, s, kd, w, n_terms, o, numel);
  else delta_accumulate_kernel<K, false><<<blocks, kThreads, 0, st>>>(d, s, kd, w, n_terms, o, numel);
}

}  // namespace

void delta_accumulate(uintptr_t data_table, uintptr_t scale_table, uintptr_t kind_table, uintptr_t weights,
                      int64_t n_terms, int64_t numel, const std::vector<uintptr_t>& out_ptrs,
                      const std::vector<int>& out_dtypes, bool aligned, uintptr_t stream) {
  const int64_t n_out = int64_t(out_ptrs.size());
  if (n_terms <= 0 || n_out == 0 || int64_t(out_dtypes.size()) != n_out || !data_table || !scale_table || !kind_table ||
      !weights)
    throw std::invalid_argument("delta_accumulate: need tables, at least one term and one output per dtype");
  for (int dt : out_dtypes)
    if (dt < F32 || dt > BF16) throw std::invalid_argument("delta_accumulate: bad output dtype code");
  if (numel <= 0) return;
  const auto* d = reinterpret_cast<const uint64_t*>(data_table);
  const auto* s = reinterpret_cast<const uint64_t*>(scale_table);
  const auto* kd = reinterpret_cast<const int*>(kind_table);
  auto st = reinterpret_cast<cudaStream_t>(stream);
  for (int64_t k0 = 0; k0 < n_out; k0 += kMaxK) {  // more outputs: the codes are read again (from L2 when they fit)
    Outs o{};
    const int K = int(std::min<int64_t>(kMaxK, n_out - k0));
    for (int k = 0; k < K; ++k) {
      o.p[k] = reinterpret_cast<void*>(out_ptrs[k0 + k]);
      o.dt[k] = out_dtypes[k0 + k];
    }
    const float* w = reinterpret_cast<const float*>(weights) + k0 * n_terms;
    switch (K) {
      case 1: launch<1>(aligned, d, s, kd, w, int(n_terms), o, numel, st); break;
      case 2: launch<2>(aligned, d, s, kd, w, int(n_terms), o, numel, st); break;
      case 3: launch<3>(aligned, d, s, kd, w, int(n_terms), o, numel, st); break;
      default: launch<4>(aligned, d, s, kd, w, int(n_terms), o, numel, st); break;
    }
    check(cudaGetLastError(), "delta_accumulate launch");
  }
}

}  // namespace pymerge_cuda
