// CUDA fused task-vector pass (ties, dare_*, breadcrumbs*, della*): same contract as
// csrc/cpu/task_vectors.cpp and kernels/task_vectors.py. Each input element is read once per
// model walk; with consensus the models are walked twice (sign election, then agreeing sum),
// the second read of the same elements coming from L2. Philox4x32-10 with the layout of
// pymerge/ops/philox.py, so masks match the CPU and Triton bit for bit. One exception, as in
// weighted_sum.cu: a NaN comes out as the GPU's canonical NaN (the CPU keeps its sign and payload).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>
#include <algorithm>
#include <stdexcept>
#include <string>
#include "cuda/dtypes.cuh"
#include "cuda/task_vectors.h"

namespace pymerge_cuda {
namespace {

constexpr int kThreads = 256;

struct TvModel {
  const void* x; int dt; int mode;
  long long t_lo, i_lo, t_hi, i_hi;
  unsigned long long thr;
  const unsigned long long* bits;
  float scale, weight;
  unsigned model;
};

struct TvParams {
  TvModel m[kMaxTvModels];
  int n_models;
  const void* base; int base_dt;
  void* out; int out_dt;
  long long numel, offset;
  bool consensus, normalize;
  float lam, divisor;
  unsigned k0, k1, h0, h1;
};

__device__ __forceinline__ unsigned philox_word(unsigned c0, unsigned c1, unsigned c2, unsigned c3, unsigned k0,
                                                unsigned k1, int lane) {
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    const unsigned hb = __umulhi(0xCD9E8D57u, c2), lb = 0xCD9E8D57u * c2;
    const unsigned ha = __umulhi(0xD2511F53u, c0), la = 0xD2511F53u * c0;
    c0 = hb ^ c1 ^ k0; c2 = ha ^ c3 ^ k1; c1 = lb; c3 = la;
    k0 += 0x9E3779B9u; k1 += 0xBB67AE85u;
  }
  return lane == 0 ? c0 : lane == 1 ? c1 : lane == 2 ? c2 : c3;
}

// v_i of element e (global index g) and model m.
__device__ __forceinline__ float delta_value(const TvParams& p, const TvModel& m, long long e, long long g, float b) {
  const float d = load_f32(m.x, e, m.dt) - b;
  const long long key = (long long)(__float_as_uint(d) & 0x7fffffffu);
  bool keep = true;
  switch (m.mode) {
    case TOPK: keep = key > m.t_hi || (key == m.t_hi && g < m.i_hi); break;
    case RANGE: {
      const bool below_hi = key < m.t_hi || (key == m.t_hi && g < m.i_hi);
      const bool below_lo = key < m.t_lo || (key == m.t_lo && g < m.i_lo);
      keep = below_hi && !below_lo;
      break;
    }
    case RANDOM:
      keep = (unsigned long long)philox_word(unsigned(g >> 2), m.model, p.h0, p.h1, p.k0, p.k1, int(g & 3)) < m.thr;
      break;
    case BITS: keep = (m.bits[g >> 6] >> (g & 63)) & 1ull; break;
    case ZERO: keep = false; break;
    default: break;
  }
  return keep ? __fmul_rn(__fmul_rn(d, m.scale), m.weight) : d * 0.f;
}

__global__ void __launch_bounds__(kThreads) tv_merge_kernel(const __grid_constant__ TvParams p) {
  for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < p.numel;
       e += (long long)gridDim.x * blockDim.x) {
    const long long g = e + p.offset;
    const float b = load_f32(p.base, e, p.base_dt);
    float mixed = 0.f, div = p.divisor;
    if (p.consensus) {
      float s = 0.f;
      for (int i = 0; i < p.n_models; ++i) s = __fadd_rn(s, delta_value(p, p.m[i], e, g, b));
      const bool positive = s >= 0.f;
      div = 0.f;
      for (int i = 0; i < p.n_models; ++i) {
        const float v = delta_value(p, p.m[i], e, g, b);
        const float agree = (positive ? v > 0.f : v < 0.f) ? 1.f : 0.f;
        mixed = __fadd_rn(mixed, __fmul_rn(v, agree));
        div = __fadd_rn(div, __fmul_rn(p.m[i].weight, agree));
      }
      if (div == 0.f) div = 1.f;
    } else {
      for (int i = 0; i < p.n_models; ++i) mixed = __fadd_rn(mixed, delta_value(p, p.m[i], e, g, b));
    }
    if (p.normalize) mixed = __fdiv_rn(mixed, div);
    if (p.lam != 1.f) mixed = __fmul_rn(mixed, p.lam);
    const float r = __fadd_rn(b, mixed);
    if (p.out_dt == F32) static_cast<float*>(p.out)[e] = r;
    else if (p.out_dt == F16) static_cast<__half*>(p.out)[e] = __float2half_rn(r);
    else static_cast<__nv_bfloat16*>(p.out)[e] = __float2bfloat16_rn(r);
  }
}

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("pymerge CUDA ") + what + ": " + cudaGetErrorString(e));
}

}  // namespace

void tv_merge(const std::vector<TvModelSpec>& models, uintptr_t base, int base_dtype, uintptr_t out, int out_dtype,
              int64_t numel, int64_t offset, bool consensus, bool normalize, float lam, float divisor, uint64_t seed,
              uint32_t h0, uint32_t h1, uintptr_t stream) {
  const int n = int(models.size());
  if (n == 0 || n > kMaxTvModels) throw std::invalid_argument("tv_merge: need 1..16 models (use the triton backend for more)");
  if (base_dtype < F32 || base_dtype > F8E5M2 || out_dtype < F32 || out_dtype > BF16)
    throw std::invalid_argument("tv_merge: bad dtype code");
  if (numel <= 0) return;
  TvParams p{};
  for (int i = 0; i < n; ++i) {
    TvModel& m = p.m[i];
    uintptr_t x, bits;
    std::tie(x, m.dt, m.mode, m.t_lo, m.i_lo, m.t_hi, m.i_hi, m.thr, bits, m.scale, m.weight, m.model) = models[i];
    if (m.dt < F32 || m.dt > F8E5M2) throw std::invalid_argument("tv_merge: bad input dtype code");
    if (m.mode < NONE || m.mode > ZERO || (m.mode == BITS && !bits)) throw std::invalid_argument("tv_merge: bad mode");
    m.x = reinterpret_cast<const void*>(x);
    m.bits = reinterpret_cast<const unsigned long long*>(bits);
  }
  p.n_models = n;
  p.base = reinterpret_cast<const void*>(base); p.base_dt = base_dtype;
  p.out = reinterpret_cast<void*>(out); p.out_dt = out_dtype;
  p.numel = numel; p.offset = offset; p.consensus = consensus; p.normalize = normalize;
  p.lam = lam; p.divisor = divisor;
  p.k0 = uint32_t(seed); p.k1 = uint32_t(seed >> 32); p.h0 = h0; p.h1 = h1;
  int dev = 0, sms = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
  const long long blocks = std::min<long long>((numel + kThreads - 1) / kThreads, (long long)sms * 32);
  tv_merge_kernel<<<unsigned(blocks), kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(p);
  check(cudaGetLastError(), "tv_merge launch");
}

}  // namespace pymerge_cuda
