// Helpers shared by pymerge's task-vector, selection and interpolation kernels (select.cpp,
// task_vectors.cpp, interp.cpp): block loads to float32, rounding stores, Philox4x32-10, and the
// run-time choice between an AVX-512 build of a kernel body and a portable one.
#pragma once
#include <cstdint>
#include <cstring>
#include "cpu/common.h"

// A kernel body is written once as an inline function; each file instantiates it three times, under
// PM_AVX512, PM_AVX2 and PM_PLAIN (baseline x86-64), and picks one with pick() (simd_level() is
// read once per process), so the build needs no -march flag. setup.py compiles with
// -ffp-contract=off: the FMA builds never contract a * b + c into one fma behind our back (the
// plain build has no fma to contract to), so every build rounds each product and all three give
// the same bits; an fma is written out where one is meant. (exact_sum.h's products of floats are exact in double:
// its sums are the same with or without contraction.)
#define PM_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi2"), flatten))
#define PM_AVX2 __attribute__((target("avx2,fma,f16c,bmi2"), flatten))
#define PM_PLAIN __attribute__((flatten))

namespace pymerge {
namespace tv {

constexpr int64_t kBlock = 1024;  // elements per inner block: a few KiB per buffer, stays in L1

// 2 (AVX-512), 1 (AVX2) or 0 (portable): which build of a kernel this CPU takes.
inline int simd_tier() {
  static const int tier = !std::strcmp(simd_level(), "avx512") ? 2 : !std::strcmp(simd_level(), "avx2") ? 1 : 0;
  return tier;
}

// The build of a kernel that this process takes: simd_tier() 2, 1 or 0.
template <class Fn>
inline Fn pick(Fn avx512, Fn avx2, Fn plain) {
  const int tier = simd_tier();
  return tier == 2 ? avx512 : tier == 1 ? avx2 : plain;
}

inline const char* byte_at(uintptr_t p, int64_t i, int dt) {
  return reinterpret_cast<const char*>(p) + i * int64_t(dtype_size(dt));
}

// dst[0..n) = float32(src[start .. start+n)), any input dtype code.
inline void load_f32(uintptr_t src, int dt, int64_t start, int64_t n, float* __restrict dst) {
  switch (dt) {
    case F32: std::memcpy(dst, byte_at(src, start, dt), size_t(n) * 4); break;
    case BF16: {
      const uint16_t* s = reinterpret_cast<const uint16_t*>(byte_at(src, start, dt));
      for (int64_t i = 0; i < n; ++i) dst[i] = bits_to_f32(uint32_t(s[i]) << 16);
      break;
    }
    case F16: {
      const _Float16* s = reinterpret_cast<const _Float16*>(byte_at(src, start, dt));
      for (int64_t i = 0; i < n; ++i) dst[i] = float(s[i]);
      break;
    }
    default: {
      const uint8_t* s = reinterpret_cast<const uint8_t*>(byte_at(src, start, dt));
      const float* t = fp8_table(dt);
      for (int64_t i = 0; i < n; ++i) dst[i] = t[s[i]];
    }
  }
}

// dst[start .. start+n) = round-to-nearest-even(src[0..n)) in the output dtype (f32/f16/bf16).
inline void store_f32(uintptr_t dst, int dt, int64_t start, int64_t n, const float* __restrict src) {
  char* d = reinterpret_cast<char*>(dst) + start * int64_t(dtype_size(dt));
  if (dt == F32) { std::memcpy(d, src, size_t(n) * 4); return; }
  if (dt == F16) {
    _Float16* o = reinterpret_cast<_Float16*>(d);
    for (int64_t i = 0; i < n; ++i) o[i] = (_Float16)src[i];
    return;
  }
  uint16_t* o = reinterpret_cast<uint16_t*>(d);
  for (int64_t i = 0; i < n; ++i) {
    uint32_t b = f32_to_bits(src[i]);
    uint32_t r = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
    o[i] = uint16_t((b & 0x7fffffffu) > 0x7f800000u ? ((b >> 16) | 0x40u) : r);
  }
}

// sum_e u[e] * v[e] in float64 with 16 independent lanes: vectorizes without -ffast-math (a single
// running sum would need reassociation, which GCC will not do on its own). Each product is exact in
// float64; float32 lanes erred by up to ~(n / 16) * 2^-24, so exactly antiparallel rows of 1000
// elements gave nuslerp a cosine 3e-7 off -1 and outputs ~800x too large.
inline double dot_lanes(const float* __restrict u, const float* __restrict v, int64_t n) {
  double part[16] = {0};
  int64_t e = 0;
  for (; e + 16 <= n; e += 16)
    for (int l = 0; l < 16; ++l) part[l] += double(u[e + l]) * double(v[e + l]);
  for (; e < n; ++e) part[e & 15] += double(u[e]) * double(v[e]);
  double s = 0;
  for (int l = 0; l < 16; ++l) s += part[l];
  return s;
}

// |d| as an ordered integer key: the float bits with the sign cleared (NaN sorts above inf).
inline uint32_t mag_key(float d) { return f32_to_bits(d) & 0x7fffffffu; }

// ---- Philox4x32-10, the layout of pymerge/ops/philox.py -----------------------------------------
struct PhiloxKey {
  uint32_t k0, k1;      // seed low / high words
  uint32_t c1, c2, c3;  // model index, tensor-name hash low / high
};

inline void philox4x32(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1,
                       uint32_t out[4]) {
  for (int r = 0; r < 10; ++r) {
    uint64_t pb = uint64_t(0xCD9E8D57u) * c2, pa = uint64_t(0xD2511F53u) * c0;
    uint32_t n0 = uint32_t(pb >> 32) ^ c1 ^ k0, n2 = uint32_t(pa >> 32) ^ c3 ^ k1;
    c1 = uint32_t(pb); c3 = uint32_t(pa); c0 = n0; c2 = n2;
    k0 += 0x9E3779B9u; k1 += 0xBB67AE85u;
  }
  out[0] = c0; out[1] = c1; out[2] = c2; out[3] = c3;
}

// bits[0..n) = draws of elements e0 .. e0+n-1. scratch holds n + 8 words.
inline void philox_bits(const PhiloxKey& k, int64_t e0, int64_t n, uint32_t* __restrict bits,
                        uint32_t* __restrict scratch) {
  const int64_t g0 = e0 >> 2, g1 = (e0 + n + 3) >> 2;
  for (int64_t g = g0; g < g1; ++g) {  // four words per counter: no draw is wasted
    uint32_t w[4];
    philox4x32(uint32_t(g), k.c1, k.c2, k.c3, k.k0, k.k1, w);
    uint32_t* s = scratch + 4 * (g - g0);
    s[0] = w[0]; s[1] = w[1]; s[2] = w[2]; s[3] = w[3];
  }
  const int64_t skip = e0 - 4 * g0;
  for (int64_t i = 0; i < n; ++i) bits[i] = scratch[skip + i];
}

}  // namespace tv
}  // namespace pymerge
