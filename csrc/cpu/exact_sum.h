// Exact sums of doubles, in the integer layout of pymerge/ops/exact_sum.py ("parts"): parts[b]
// counts multiples of 2^(b - kLow), then the counts of NaN, +inf and -inf. Integer bins add
// exactly in any order (threads, blocks, ranks), and Python rounds the total once, so a statistic
// has one value however its elements were split.
//
// Fast path (add_block, add_products): error-free extraction (Rump, Ogita and Oishi, "Accurate
// floating-point summation", 2008). For a block of n <= 2048 finite values with |x| < 2^t and
// sigma = 2^(t + 12), q = (sigma + x) - sigma and r = x - q are computed exactly, every q is a
// multiple of 2^(t - 41) with |q| <= 2^-11 sigma, so float64 sums of the q's are exact in any
// order; r (|r| <= 2^(t - 41)) goes through a second level at sigma * 2^-41. Two levels keep 82
// binary orders below the block's top; the rare remainder below them is added one by one.
//
// The lane loops have AVX-512 and AVX2 builds in intrinsics (the compiler leaves the portable loop
// scalar); a caller built for that target picks one with the Isa template argument.
#pragma once
#include <immintrin.h>
#include <pybind11/numpy.h>
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace pymerge {
namespace exact {

constexpr int kLow = 1133;            // = pymerge.ops.exact_sum.LOW
constexpr int kBins = 2160;           // = pymerge.ops.exact_sum.BINS
constexpr int kParts = kBins + 3;     // bins, then #NaN, #+inf, #-inf
constexpr int64_t kMaxBlock = 2048;   // values per add_block call
constexpr int kLanes = 8;
enum Isa { kPlain, kAvx2, kAvx512 };

inline uint64_t bits_of(double v) { uint64_t b; std::memcpy(&b, &v, 8); return b; }
inline double of_bits(uint64_t b) { double v; std::memcpy(&v, &b, 8); return v; }
inline int exponent(double v) { return int(bits_of(v) >> 52) & 0x7ff; }

// The two extraction levels of one block (see the header comment), kLanes lanes each.
struct Extract {
  double s1, s2;                          // sigma of each level
  double a1[kLanes] = {}, a2[kLanes] = {};  // exact lane sums of each level's q
  int64_t rest[kLanes] = {};              // nonzero where some remainder was left below both levels

  explicit Extract(int top)  // top: the largest biased exponent in the block, 29 <= top <= 2033
      : s1(of_bits(uint64_t(top + 13) << 52)), s2(of_bits(uint64_t(top - 28) << 52)) {}

  // x - (the parts of x both levels keep): exact, 0 unless x has bits below 2^-82 of the top.
  inline double remainder(double x) const {
    const double r = x - ((s1 + x) - s1);
    return r - ((s2 + r) - s2);
  }

  inline void put(int l, double x) {
    const double q1 = (s1 + x) - s1, r1 = x - q1;
    const double q2 = (s2 + r1) - s2;
    a1[l] += q1;
    a2[l] += q2;
    rest[l] |= int64_t(bits_of(r1 - q2) << 1);  // without the sign: -0.0 is no remainder
  }

  bool any_rest() const {
    int64_t any = 0;
    for (int l = 0; l < kLanes; ++l) any |= rest[l];
    return any != 0;
  }
};

// Subsets of PM_AVX512 and PM_AVX2 (csrc/cpu/tv_common.h), so that those builds inline them.
#define PM_EXACT_AVX512 __attribute__((target("avx512f")))
#define PM_EXACT_AVX2 __attribute__((target("avx2")))

PM_EXACT_AVX512 inline void put8_avx512(__m512d x, __m512d s1, __m512d s2, __m512d& a1, __m512d& a2, __m512i& rest) {
  const __m512d q1 = _mm512_sub_pd(_mm512_add_pd(s1, x), s1), r1 = _mm512_sub_pd(x, q1);
  const __m512d q2 = _mm512_sub_pd(_mm512_add_pd(s2, r1), s2);
  a1 = _mm512_add_pd(a1, q1);
  a2 = _mm512_add_pd(a2, q2);
  rest = _mm512_or_si512(rest, _mm512_slli_epi64(_mm512_castpd_si512(_mm512_sub_pd(r1, q2)), 1));
}

PM_EXACT_AVX2 inline void put4_avx2(__m256d x, __m256d s1, __m256d s2, __m256d& a1, __m256d& a2, __m256i& rest) {
  const __m256d q1 = _mm256_sub_pd(_mm256_add_pd(s1, x), s1), r1 = _mm256_sub_pd(x, q1);
  const __m256d q2 = _mm256_sub_pd(_mm256_add_pd(s2, r1), s2);
  a1 = _mm256_add_pd(a1, q1);
  a2 = _mm256_add_pd(a2, q2);
  rest = _mm256_or_si256(rest, _mm256_slli_epi64(_mm256_castpd_si256(_mm256_sub_pd(r1, q2)), 1));
}

// Extract::put of x[0..full), or of u[e] * v[e] (v != nullptr); full: a multiple of kLanes.
PM_EXACT_AVX512 inline void put_avx512(Extract& ex, const double* x, const float* u, const float* v, int64_t full) {
  const __m512d s1 = _mm512_set1_pd(ex.s1), s2 = _mm512_set1_pd(ex.s2);
  __m512d a1 = _mm512_loadu_pd(ex.a1), a2 = _mm512_loadu_pd(ex.a2);
  __m512i rest = _mm512_loadu_si512(ex.rest);
  for (int64_t i = 0; i < full; i += 8) {
    const __m512d y = v ? _mm512_mul_pd(_mm512_cvtps_pd(_mm256_loadu_ps(u + i)), _mm512_cvtps_pd(_mm256_loadu_ps(v + i)))
                        : _mm512_loadu_pd(x + i);
    put8_avx512(y, s1, s2, a1, a2, rest);
  }
  _mm512_storeu_pd(ex.a1, a1);
  _mm512_storeu_pd(ex.a2, a2);
  _mm512_storeu_si512(ex.rest, rest);
}

PM_EXACT_AVX2 inline void put_avx2(Extract& ex, const double* x, const float* u, const float* v, int64_t full) {
  const __m256d s1 = _mm256_set1_pd(ex.s1), s2 = _mm256_set1_pd(ex.s2);
  __m256d a1[2], a2[2];
  __m256i rest[2];
  for (int h = 0; h < 2; ++h) {
    a1[h] = _mm256_loadu_pd(ex.a1 + 4 * h);
    a2[h] = _mm256_loadu_pd(ex.a2 + 4 * h);
    rest[h] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ex.rest + 4 * h));
  }
  for (int64_t i = 0; i < full; i += 8)
    for (int h = 0; h < 2; ++h) {
      const int64_t e = i + 4 * h;
      const __m256d y = v ? _mm256_mul_pd(_mm256_cvtps_pd(_mm_loadu_ps(u + e)), _mm256_cvtps_pd(_mm_loadu_ps(v + e)))
                          : _mm256_loadu_pd(x + e);
      put4_avx2(y, s1, s2, a1[h], a2[h], rest[h]);
    }
  for (int h = 0; h < 2; ++h) {
    _mm256_storeu_pd(ex.a1 + 4 * h, a1[h]);
    _mm256_storeu_pd(ex.a2 + 4 * h, a2[h]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(ex.rest + 4 * h), rest[h]);
  }
}

// The Isa build of the lane loop (same sums: the extraction is exact).
template <int I>
inline void put_lanes(Extract& ex, const double* x, const float* u, const float* v, int64_t full) {
  if constexpr (I == kAvx512) {
    put_avx512(ex, x, u, v, full);
  } else if constexpr (I == kAvx2) {
    put_avx2(ex, x, u, v, full);
  } else {
    for (int64_t i = 0; i < full; i += kLanes)
      for (int l = 0; l < kLanes; ++l) ex.put(l, v ? double(u[i + l]) * double(v[i + l]) : x[i + l]);
  }
}

struct Acc {
  __int128 s[2048] = {};  // s[e]: sum of signed 53-bit mantissas of values with biased exponent e
  int64_t nan = 0, pinf = 0, ninf = 0;

  inline void add(double v) {
    const uint64_t b = bits_of(v);
    const int e = int(b >> 52) & 0x7ff;
    const uint64_t frac = b & ((uint64_t(1) << 52) - 1);
    if (e == 0x7ff) { ++(frac ? nan : (b >> 63) ? ninf : pinf); return; }
    const int64_t m = int64_t(frac | (e ? uint64_t(1) << 52 : 0));  // value = m * 2^(max(e, 1) - 1075)
    s[std::max(e, 1)] += (b >> 63) ? -m : m;
  }

  // Adds x[0..n) (n <= kMaxBlock), any doubles.
  template <int I = kPlain>
  void add_block(const double* __restrict x, int64_t n) {
    int top = 0;
    for (int64_t i = 0; i < n; ++i) top = std::max(top, exponent(x[i]));
    if (top == 0) {  // zeros and subnormals only
      for (int64_t i = 0; i < n; ++i) add(x[i]);
      return;
    }
    if (top < 29 || top > 2033) { for (int64_t i = 0; i < n; ++i) add(x[i]); return; }  // NaN, inf, extremes
    Extract ex(top);
    const int64_t full = n / kLanes * kLanes;
    put_lanes<I>(ex, x, nullptr, nullptr, full);
    for (int64_t i = full; i < n; ++i) add(x[i]);  // the tail, one by one
    finish(ex);
    if (ex.any_rest())
      for (int64_t i = 0; i < full; ++i) add(ex.remainder(x[i]));
  }

  // Adds u[e] * v[e] for e < n (n <= kMaxBlock): each product is exact in float64, so it goes
  // straight to the extraction (two passes over u and v: the top exponent, then the sums).
  template <int I = kPlain>
  void add_products(const float* __restrict u, const float* __restrict v, int64_t n) {
    int top = 0;
    for (int64_t e = 0; e < n; ++e) top = std::max(top, exponent(double(u[e]) * double(v[e])));
    if (top == 0) return;  // all zero (products of float32s are never subnormal)
    if (top < 29 || top > 2033) {  // NaN or inf
      for (int64_t e = 0; e < n; ++e) add(double(u[e]) * double(v[e]));
      return;
    }
    Extract ex(top);
    const int64_t full = n / kLanes * kLanes;
    put_lanes<I>(ex, nullptr, u, v, full);
    for (int64_t e = full; e < n; ++e) add(double(u[e]) * double(v[e]));
    finish(ex);
    if (ex.any_rest())
      for (int64_t e = 0; e < full; ++e) add(ex.remainder(double(u[e]) * double(v[e])));
  }

  // Adds both levels' lane sums (each exact: see the header comment).
  void finish(const Extract& ex) {
    double t1 = 0, t2 = 0;
    for (int l = 0; l < kLanes; ++l) { t1 += ex.a1[l]; t2 += ex.a2[l]; }
    add(t1);
    add(t2);
  }

  void merge(const Acc& o) {
    for (int e = 0; e < 2048; ++e) s[e] += o.s[e];
    nan += o.nan; pinf += o.pinf; ninf += o.ninf;
  }

  // Adds this sum into parts: s[e] counts multiples of 2^(e - 1075), in 26-bit pieces (int64-safe).
  void write(int64_t* parts) const {
    for (int e = 1; e < 2047; ++e) {
      if (!s[e]) continue;
      const int b = e - 1075 + kLow;
      const __int128 low = s[e] & ((__int128(1) << 26) - 1), rest = s[e] >> 26;
      parts[b] += int64_t(low);
      parts[b + 26] += int64_t(rest & ((__int128(1) << 26) - 1));
      parts[b + 52] += int64_t(rest >> 26);
    }
    parts[kBins] += nan; parts[kBins + 1] += pinf; parts[kBins + 2] += ninf;
  }
};

// fn bound for Python with the GIL released while it runs, its parts returned as one int64 numpy
// array: a list of ~4300 Python ints made into a tensor cost ~1 ms a call, per tensor and model.
template <class... A>
auto parts_as_array(std::vector<int64_t> (*fn)(A...)) {
  return [fn](A... a) {
    std::vector<int64_t> parts;
    {
      pybind11::gil_scoped_release nogil;
      parts = fn(a...);
    }
    return pybind11::array_t<int64_t>(pybind11::ssize_t(parts.size()), parts.data());
  };
}

}  // namespace exact
}  // namespace pymerge
