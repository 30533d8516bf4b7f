// Exact sums of float32 magnitudes and of products of two float32s, in the integer layout of
// pymerge/ops/exact_sum.py ("parts"): parts[b] counts multiples of 2^(b - kLow), then the counts of
// NaN, +inf and -inf. Integer bins add exactly in any order (threads, blocks, ranks), and Python
// rounds the total once, so a statistic has one value however its elements were split.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include "cpu/common.h"

namespace pymerge {
namespace exact {

constexpr int kLow = 1133;            // = pymerge.ops.exact_sum.LOW
constexpr int kBins = 2132;           // = pymerge.ops.exact_sum.BINS
constexpr int kParts = kBins + 3;     // bins, then #NaN, #+inf, #-inf

// sum |x| of float32s: 24-bit mantissas per float32 exponent (2^39 values before an int64 overflows).
struct AbsF32 {
  int64_t m[256] = {0};
  int64_t nan = 0, inf = 0;

  inline void add(float x) {
    const uint32_t b = f32_to_bits(x) & 0x7fffffffu, e = b >> 23;
    if (e == 255) { ++((b & 0x7fffffu) ? nan : inf); return; }
    m[e] += int64_t((b & 0x7fffffu) | (e ? 0x800000u : 0u));
  }
  void merge(const AbsF32& o) {
    for (int e = 0; e < 256; ++e) m[e] += o.m[e];
    nan += o.nan; inf += o.inf;
  }
  void write(int64_t* parts) const {  // exponent field e counts multiples of 2^(max(e, 1) - 150)
    for (int e = 0; e < 255; ++e) parts[std::max(e, 1) - 150 + kLow] += m[e];
    parts[kBins] += nan; parts[kBins + 1] += inf;
  }
};

// sum u*v of float32 pairs: each product is exact in float64 with at most 48 significant bits, and
// its biased float64 exponent lies in [kE0, kE0 + kE); 128-bit sums per exponent never overflow.
struct ProdF32 {
  static constexpr int kE0 = 700, kE = 600;
  __int128 s[kE] = {};
  int64_t nan = 0, pinf = 0, ninf = 0;

  inline void add(float u, float v) {
    const double p = double(u) * double(v);
    uint64_t b;
    std::memcpy(&b, &p, 8);
    const int e = int(b >> 52) & 0x7ff;
    const uint64_t frac = b & ((uint64_t(1) << 52) - 1);
    if (e == 0x7ff) { ++(frac ? nan : (b >> 63) ? ninf : pinf); return; }
    if (e == 0) return;  // zero: products of float32s are never subnormal in float64
    const int64_t m = int64_t((frac | (uint64_t(1) << 52)) >> 5);  // the low 5 bits are zero
    s[e - kE0] += (b >> 63) ? -m : m;
  }
  void merge(const ProdF32& o) {
    for (int i = 0; i < kE; ++i) s[i] += o.s[i];
    nan += o.nan; pinf += o.pinf; ninf += o.ninf;
  }
  void write(int64_t* parts) const {  // s[i] counts multiples of 2^(i + kE0 - 1070): low 40 bits, then the rest
    for (int i = 0; i < kE; ++i) {
      if (!s[i]) continue;
      const int b = i + kE0 - 1070 + kLow;
      parts[b] += int64_t(s[i] & ((__int128(1) << 40) - 1));
      parts[b + 40] += int64_t(s[i] >> 40);
    }
    parts[kBins] += nan; parts[kBins + 1] += pinf; parts[kBins + 2] += ninf;
  }
};

}  // namespace exact
}  // namespace pymerge
