// Exact sums of doubles, in the integer layout of pymerge/ops/exact_sum.py ("parts"): parts[b]
// counts multiples of 2^(b - kLow), then the counts of NaN, +inf and -inf. Integer bins add
// exactly in any order (threads, blocks, ranks), and Python rounds the total once, so a statistic
// has one value however its elements were split.
//
// Fast path (add_block): values with at most 24 significant bits (a float32, or either half of a
// product of two float32s, see add_products) are summed in float64 lanes by exponent window: within
// a block of <= 2048 values, those within 16 binary orders of window w below the block's largest
// exponent are multiples of one unit and their sum fits 50 bits, so plain float64 additions are
// exact. Five windows cover 80 orders; anything smaller (rare) is added one by one.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>

namespace pymerge {
namespace exact {

constexpr int kLow = 1133;            // = pymerge.ops.exact_sum.LOW
constexpr int kBins = 2160;           // = pymerge.ops.exact_sum.BINS
constexpr int kParts = kBins + 3;     // bins, then #NaN, #+inf, #-inf
constexpr int64_t kMaxBlock = 2048;   // values per add_block call
constexpr int kWindows = 5, kWidth = 16, kLanes = 8;

inline uint64_t bits_of(double v) { uint64_t b; std::memcpy(&b, &v, 8); return b; }
inline double of_bits(uint64_t b) { double v; std::memcpy(&v, &b, 8); return v; }
inline int exponent(double v) { return int(bits_of(v) >> 52) & 0x7ff; }

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

  // Adds w[0..n) (n <= kMaxBlock), each with at most 24 significant bits.
  void add_block(const double* __restrict w, int64_t n) {
    int64_t top = 0;
    for (int64_t i = 0; i < n; ++i) top = std::max<int64_t>(top, int64_t(bits_of(w[i]) >> 52) & 0x7ff);
    if (top == 0) return;  // all zero
    if (top == 0x7ff) { for (int64_t i = 0; i < n; ++i) add(w[i]); return; }
    // One float64 lane array per window, one per-lane count of values below the windows; branch-free
    // so that it vectorizes.
    double a0[kLanes] = {}, a1[kLanes] = {}, a2[kLanes] = {}, a3[kLanes] = {}, a4[kLanes] = {};
    int64_t below[kLanes] = {};
    const int64_t full = n / kLanes * kLanes;
    for (int64_t i = 0; i < full; i += kLanes)
      for (int l = 0; l < kLanes; ++l) {
        const uint64_t b = bits_of(w[i + l]);  // selects by masking the bits: no branches
        const int64_t win = (top - (int64_t(b >> 52) & 0x7ff)) >> 4;
        a0[l] += of_bits(b & -uint64_t(win == 0));
        a1[l] += of_bits(b & -uint64_t(win == 1));
        a2[l] += of_bits(b & -uint64_t(win == 2));
        a3[l] += of_bits(b & -uint64_t(win == 3));
        a4[l] += of_bits(b & -uint64_t(win == 4));
        below[l] += int64_t(win >= kWindows) & int64_t((b << 1) != 0);
      }
    int64_t rest = 0;
    for (int l = 0; l < kLanes; ++l) rest += below[l];
    for (int64_t i = full; i < n; ++i) {  // the tail, one by one (exact: any value may go to add())
      add(w[i]);
    }
    const double* lanes[kWindows] = {a0, a1, a2, a3, a4};
    for (int k = 0; k < kWindows; ++k) {
      double sum = 0;
      for (int l = 0; l < kLanes; ++l) sum += lanes[k][l];  // exact: see the header comment
      add(sum);
    }
    if (rest)
      for (int64_t j = 0; j < full; ++j)
        if ((top - exponent(w[j])) >> 4 >= kWindows && w[j] != 0.0) add(w[j]);
  }

  // Adds u[e] * v[e] for e < n (n <= kMaxBlock / 2): each product is exact in float64 with at most
  // 48 significant bits, split into its top 24 bits and the rest (both <= 24 bits). buf: 2n doubles.
  void add_products(const float* __restrict u, const float* __restrict v, int64_t n, double* __restrict buf) {
    constexpr uint64_t kTop = ~((uint64_t(1) << 29) - 1);
    for (int64_t e = 0; e < n; ++e) {
      const double p = double(u[e]) * double(v[e]);
      const bool finite = exponent(p) != 0x7ff;
      const double hi = finite ? of_bits(bits_of(p) & kTop) : p;
      buf[e] = hi;
      buf[n + e] = finite ? p - hi : 0.0;
    }
    add_block(buf, 2 * n);
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

}  // namespace exact
}  // namespace pymerge
