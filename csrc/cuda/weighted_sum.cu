// CUDA weighted sum of N checkpoints into K outputs: out_k = sum_i W[k,i] * x_i.
// Same contract as the CPU kernel: float32 accumulation in input order, one read of every input
// element, one round-to-nearest-even store per output element, and the CPU kernel's delta form (a base B:
// out_k = fma(w_k0, B, sum_i w_ki (x_i - B)), task_arithmetic). One exception: a NaN comes out as the
// GPU's canonical NaN (sign and payload not kept), where the CPU kernel keeps them. Raw pointers, dtype codes and the
// caller's stream come in from Python; nothing here links libtorch.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>
#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>
#include "cuda/dtypes.cuh"
#include "cuda/weighted_sum.h"

namespace pymerge_cuda {
namespace {


constexpr int kVec = 8;      // elements per vector: one 16-byte load of bf16/fp16, two of float32
constexpr int kThreads = 256;
constexpr int kMixed = -1;   // inputs of several dtypes (or float8): the load dispatches per input
// Bytes in flight decide the bandwidth: each thread owns one vector per grid-stride step and loads
// Step<DT> inputs' vectors before it adds any (64 bytes per thread per step), and 64 registers or fewer
// (ptxas -v) keep 4 blocks of 256 threads resident per SM: 64 KB of loads in flight per SM. The first
// version (4 vectors of one input per step, 96-128 registers, 2 blocks) ran at 0.44-0.49 of copy on
// an H200, where the Triton kernel (32 registers, full occupancy) reached 0.89-0.91.
constexpr int kMinBlocks = 4;
// Inputs loaded per step: 64 bytes per thread (one 16-byte vector of bf16/fp16, two of float32, per input).
// Mixed dtypes convert as they load, so they hold 8 floats per input and take fewer per step.
// A delta sum holds its base's vector too: with 3 or 4 outputs that needs more than 64 registers, so those
// keep 3 blocks resident (80 registers) rather than halve each thread's loads, and 4 outputs of 16-bit inputs
// load 3 inputs per step (48 bytes; no spill on sm_90, 16 bytes spilled on sm_80).
template <int DT, int K = 1, bool Delta = false> struct Step {
  static constexpr int value = DT == F32 ? 2 : DT == kMixed ? 2 : Delta && K == 4 ? 3 : 4;
};
template <int K, bool Delta> struct MinBlocks { static constexpr int value = Delta && K >= 3 ? 3 : kMinBlocks; };

struct Params {
  const void* in[kMaxInputs];
  int in_dtype[kMaxInputs];
  float w[kMaxOutputs][kMaxInputs];
  void* out[kMaxOutputs];
  int out_dtype[kMaxOutputs];
  const float* w_dev;   // weights in device memory (row k at w_dev + k * w_stride), or null: use w
  int64_t w_stride;
  const float* acc_in;  // float32 partial sums from an earlier launch (row k at k * acc_stride), or null
  float* acc_out;       // write float32 partial sums here instead of the outputs, or null
  int64_t acc_stride;   // scratch_stride(numel): keeps every row 16-byte aligned for the vector path
  const void* base;     // delta form: every input is taken relative to this base, or null
  int base_dtype;
  const float* w0_dev;  // the base's own weights (row k at w0_dev + k * w_stride), or null: use w0
  float w0[kMaxOutputs];
  int n_in, n_out;
  int64_t numel;
};

// Weights live in the kernel parameters, or in device memory when the caller updates them without
// a host round trip (CUDA graphs, the search loop).
__device__ __forceinline__ float weight(const Params& p, int k, int i) {
  return p.w_dev ? __ldg(p.w_dev + k * p.w_stride + i) : p.w[k][i];
}

__device__ __forceinline__ float base_weight(const Params& p, int k) {
  return p.w0_dev ? __ldg(p.w0_dev + k * p.w_stride) : p.w0[k];
}

// Loads kVec consecutive elements starting at i (16-byte aligned for 2-byte types), as float32.
__device__ __forceinline__ void load_vec(const void* p, int64_t i, int dt, float (&x)[kVec]) {
  if (dt == BF16 || dt == F16) {
    uint4 raw = __ldg(reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(p) + i));
    const uint16_t* h = reinterpret_cast<const uint16_t*>(&raw);
#pragma unroll
    for (int j = 0; j < kVec; ++j)
      x[j] = dt == BF16 ? __uint_as_float(uint32_t(h[j]) << 16) : __half2float(__ushort_as_half(h[j]));
  } else if (dt == F32) {
    const float4* q = reinterpret_cast<const float4*>(static_cast<const float*>(p) + i);
    float4 a = __ldg(q), b = __ldg(q + 1);
    x[0] = a.x; x[1] = a.y; x[2] = a.z; x[3] = a.w; x[4] = b.x; x[5] = b.y; x[6] = b.z; x[7] = b.w;
  } else {
#pragma unroll
    for (int j = 0; j < kVec; ++j) x[j] = load_f32(p, i + j, dt);
  }
}

// kVec elements as loaded: raw bits of one dtype DT (4 registers for bf16/fp16, 8 for float32, turned into
// float32 as they are added), or already float32 for kMixed.
template <int DT> struct Loaded {
  static constexpr int kWords = DT == kMixed ? kVec : DT == F32 ? 8 : 4;
  uint32_t w[kWords];
  __device__ __forceinline__ void load(const void* p, int64_t i, int dt) {
    if constexpr (DT == kMixed) {
      float x[kVec];
      load_vec(p, i, dt, x);
#pragma unroll
      for (int j = 0; j < kVec; ++j) w[j] = __float_as_uint(x[j]);
    } else if constexpr (DT == F32) {
      const uint4* q = reinterpret_cast<const uint4*>(static_cast<const float*>(p) + i);
      uint4 a = __ldg(q), b = __ldg(q + 1);
      w[0] = a.x; w[1] = a.y; w[2] = a.z; w[3] = a.w; w[4] = b.x; w[5] = b.y; w[6] = b.z; w[7] = b.w;
    } else {
      uint4 a = __ldg(reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(p) + i));
      w[0] = a.x; w[1] = a.y; w[2] = a.z; w[3] = a.w;
    }
  }
  __device__ __forceinline__ float operator[](int j) const {
    if constexpr (DT == kMixed || DT == F32) return __uint_as_float(w[j]);
    const uint32_t h = (w[j / 2] >> (16 * (j % 2))) & 0xFFFF;  // little-endian: element 2m is the low half
    if constexpr (DT == BF16) return __uint_as_float(h << 16);
    return __half2float(__ushort_as_half(uint16_t(h)));
  }
};

__device__ __forceinline__ void store_vec(void* p, int64_t i, int dt, const float (&a)[kVec]) {
  if (dt == F32) {
    float4* q = reinterpret_cast<float4*>(static_cast<float*>(p) + i);
    q[0] = make_float4(a[0], a[1], a[2], a[3]);
    q[1] = make_float4(a[4], a[5], a[6], a[7]);
    return;
  }
  uint4 raw;
  uint16_t* h = reinterpret_cast<uint16_t*>(&raw);
#pragma unroll
  for (int j = 0; j < kVec; ++j)
    h[j] = dt == BF16 ? __bfloat16_as_ushort(__float2bfloat16_rn(a[j])) : __half_as_ushort(__float2half_rn(a[j]));
  *reinterpret_cast<uint4*>(static_cast<uint16_t*>(p) + i) = raw;
}

__device__ __forceinline__ void store_one(void* p, int64_t i, int dt, float a) {
  if (dt == F32) static_cast<float*>(p)[i] = a;
  else if (dt == F16) static_cast<__half*>(p)[i] = __float2half_rn(a);
  else static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(a);
}

// Vectorized body: every thread owns one vector of kVec elements per grid-stride step. Sums start at
// -0.0 (fma(w, x, -0.0) is w * x, bits and all) and add the inputs in order; with a base, x - B, and
// the base's own term after the last input (in the launch that writes the outputs).
template <int K, int DT, bool Delta>
__global__ void __launch_bounds__(kThreads, (MinBlocks<K, Delta>::value)) weighted_sum_vec(const __grid_constant__ Params p) {
  constexpr int kS = Step<DT, K, Delta>::value;
  const int64_t n_vec = p.numel / kVec;
  for (int64_t v = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; v < n_vec; v += int64_t(gridDim.x) * blockDim.x) {
    const int64_t e = v * kVec;
    float acc[K][kVec];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (p.acc_in) load_vec(p.acc_in + k * p.acc_stride, e, F32, acc[k]);
      else
#pragma unroll
        for (int j = 0; j < kVec; ++j) acc[k][j] = -0.f;
    }
    Loaded<DT> b;  // (a compile-time choice: the plain sum keeps its registers)
    if constexpr (Delta) b.load(p.base, e, p.base_dtype);
    for (int i0 = 0; i0 < p.n_in; i0 += kS) {
      Loaded<DT> x[kS];
#pragma unroll
      for (int s = 0; s < kS; ++s)  // every load of the step issued before the first add
        if (i0 + s < p.n_in) x[s].load(p.in[i0 + s], e, p.in_dtype[i0 + s]);
#pragma unroll
      for (int s = 0; s < kS; ++s) {
        if (i0 + s >= p.n_in) break;
#pragma unroll
        for (int k = 0; k < K; ++k) {
          const float wk = weight(p, k, i0 + s);
#pragma unroll
          for (int j = 0; j < kVec; ++j) acc[k][j] = fmaf(wk, Delta ? x[s][j] - b[j] : x[s][j], acc[k][j]);
        }
      }
    }
    if (Delta && !p.acc_out)
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const float wk = base_weight(p, k);
#pragma unroll
        for (int j = 0; j < kVec; ++j) acc[k][j] = fmaf(wk, b[j], acc[k][j]);
      }
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (p.acc_out) store_vec(p.acc_out + k * p.acc_stride, e, F32, acc[k]);
      else store_vec(p.out[k], e, p.out_dtype[k], acc[k]);
    }
  }
}

// Scalar body: the tail past the last full vector, or everything when a pointer is misaligned.
__global__ void weighted_sum_scalar(const __grid_constant__ Params p, int64_t begin) {
  for (int64_t e = begin + int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < p.numel; e += int64_t(gridDim.x) * blockDim.x) {
    const float b = p.base ? load_f32(p.base, e, p.base_dtype) : 0.f;
    for (int k = 0; k < p.n_out; ++k) {
      float acc = p.acc_in ? p.acc_in[k * p.acc_stride + e] : -0.f;
      for (int i = 0; i < p.n_in; ++i) {
        const float x = load_f32(p.in[i], e, p.in_dtype[i]);
        acc = fmaf(weight(p, k, i), p.base ? x - b : x, acc);  // (from -0.0: the first is w * x, bits and all)
      }
      if (p.base && !p.acc_out) acc = fmaf(base_weight(p, k), b, acc);
      if (p.acc_out) p.acc_out[k * p.acc_stride + e] = acc;
      else store_one(p.out[k], e, p.out_dtype[k], acc);
    }
  }
}

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("pymerge CUDA ") + what + ": " + cudaGetErrorString(e));
}

// Of the current device (the caller's guard sets it): a machine may mix GPUs, so one per device index.
// Racing first calls write the same value.
int sm_count() {
  static std::atomic<int> known[64] = {};
  int dev = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  int sms = dev >= 0 && dev < 64 ? known[dev].load(std::memory_order_relaxed) : 0;
  if (sms == 0) {
    check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
    if (dev >= 0 && dev < 64) known[dev].store(sms, std::memory_order_relaxed);
  }
  return sms;
}

template <int K, int DT>
void launch_vec(const Params& p, int64_t n_vec, cudaStream_t s) {
  int64_t blocks = std::min<int64_t>((n_vec + kThreads - 1) / kThreads, int64_t(sm_count()) * 16);
  if (p.base) weighted_sum_vec<K, DT, true><<<unsigned(blocks), kThreads, 0, s>>>(p);
  else weighted_sum_vec<K, DT, false><<<unsigned(blocks), kThreads, 0, s>>>(p);
}

template <int DT>
void launch_vec(const Params& p, int64_t n_vec, cudaStream_t s) {
  switch (p.n_out) {
    case 1: launch_vec<1, DT>(p, n_vec, s); break;
    case 2: launch_vec<2, DT>(p, n_vec, s); break;
    case 3: launch_vec<3, DT>(p, n_vec, s); break;
    default: launch_vec<4, DT>(p, n_vec, s); break;
  }
}

// The dtype all of the launch's inputs (and base) share, if it has a 16-byte load path; kMixed otherwise.
int shared_dtype(const Params& p) {
  const int dt = p.n_in ? p.in_dtype[0] : p.base_dtype;
  for (int i = 1; i < p.n_in; ++i)
    if (p.in_dtype[i] != dt) return kMixed;
  if (p.base && p.base_dtype != dt) return kMixed;
  return dt == BF16 || dt == F16 || dt == F32 ? dt : kMixed;
}

void launch(const Params& p, bool aligned, cudaStream_t s) {
  int64_t n_vec = aligned ? p.numel / kVec : 0;
  if (n_vec > 0) {
    switch (shared_dtype(p)) {
      case BF16: launch_vec<BF16>(p, n_vec, s); break;
      case F16: launch_vec<F16>(p, n_vec, s); break;
      case F32: launch_vec<F32>(p, n_vec, s); break;
      default: launch_vec<kMixed>(p, n_vec, s); break;
    }
  }
  int64_t rest = p.numel - n_vec * kVec;
  if (rest > 0) {
    int64_t blocks = std::min<int64_t>((rest + kThreads - 1) / kThreads, int64_t(sm_count()) * 16);
    weighted_sum_scalar<<<unsigned(blocks), kThreads, 0, s>>>(p, n_vec * kVec);
  }
  check(cudaGetLastError(), "kernel launch");
}

}  // namespace

void weighted_sum_many(const std::vector<uintptr_t>& in_ptrs, const std::vector<int>& in_dtypes, int64_t numel,
                       const std::vector<float>& weights, const std::vector<uintptr_t>& out_ptrs,
                       const std::vector<int>& out_dtypes, uintptr_t scratch, uintptr_t stream,
                       uintptr_t weights_dev, bool delta) {
  const int n_in = int(in_ptrs.size()), n_out = int(out_ptrs.size());
  if (n_in == 0 || n_out == 0 || n_out > kMaxOutputs) throw std::invalid_argument("weighted_sum: need 1..4 outputs and >= 1 input");
  if (int(in_dtypes.size()) != n_in || int(out_dtypes.size()) != n_out ||
      (!weights_dev && int64_t(weights.size()) != int64_t(n_in) * n_out))
    throw std::invalid_argument("weighted_sum: inconsistent argument lengths");
  // the codes as the CPU kernel checks them (a float8 output code was stored as bf16 past the buffer's end)
  for (int dt : in_dtypes) if (dt < F32 || dt > kMaxInputDType) throw std::invalid_argument("weighted_sum: bad input dtype code");
  for (int dt : out_dtypes) if (dt < F32 || dt > kMaxOutputDType) throw std::invalid_argument("weighted_sum: bad output dtype code");
  const int terms = delta ? n_in - 1 : n_in;  // inputs summed (a delta call's base is input 0, not a term)
  const int skip = n_in - terms;
  if (terms > kMaxInputs && !scratch) throw std::invalid_argument("weighted_sum: more than 64 inputs need a float32 scratch buffer");
  if (numel <= 0) return;
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  // Inputs beyond kMaxInputs go in several launches that carry float32 partial sums in scratch (a delta
  // call's base alone: one launch with none).
  for (int first = skip; first < n_in || first == skip; first += kMaxInputs) {
    const int cnt = std::min(kMaxInputs, n_in - first);
    const bool last = first + cnt == n_in;
    Params p{};
    p.n_in = cnt; p.n_out = n_out; p.numel = numel;
    p.acc_stride = scratch_stride(numel);
    p.w_dev = weights_dev ? reinterpret_cast<const float*>(weights_dev) + first : nullptr;
    p.w_stride = n_in;
    p.acc_in = first > skip ? reinterpret_cast<const float*>(scratch) : nullptr;
    p.acc_out = last ? nullptr : reinterpret_cast<float*>(scratch);
    bool aligned = true;
    if (delta) {
      p.base = reinterpret_cast<const void*>(in_ptrs[0]);
      p.base_dtype = in_dtypes[0];
      aligned &= in_ptrs[0] % 16 == 0;
      p.w0_dev = weights_dev ? reinterpret_cast<const float*>(weights_dev) : nullptr;
      if (!weights_dev)
        for (int k = 0; k < n_out; ++k) p.w0[k] = weights[size_t(k) * n_in];
    }
    for (int i = 0; i < cnt; ++i) {
      p.in[i] = reinterpret_cast<const void*>(in_ptrs[first + i]);
      p.in_dtype[i] = in_dtypes[first + i];
      aligned &= in_ptrs[first + i] % 16 == 0;
      if (!weights_dev)
        for (int k = 0; k < n_out; ++k) p.w[k][i] = weights[size_t(k) * n_in + first + i];
    }
    for (int k = 0; k < n_out; ++k) {
      p.out[k] = reinterpret_cast<void*>(out_ptrs[k]);
      p.out_dtype[k] = out_dtypes[k];
      aligned &= out_ptrs[k] % 16 == 0;
    }
    aligned &= scratch % 16 == 0;
    launch(p, aligned, s);
  }
}

}  // namespace pymerge_cuda
