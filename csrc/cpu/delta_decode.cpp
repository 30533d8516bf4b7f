// Fused decode-and-accumulate for delta-compressed pools (pymerge/pool/compressed.py):
//   out_k = sum_t W[k, t] * decode(term_t), accumulated in float32, rounded once (nearest even).
// A term is a dense tensor (the exact base, or a checkpoint kept exact: float32/float16/bfloat16)
// or a quantized task vector: int8 or int4 codes with one bfloat16 scale per 64 elements.
// int4 layout (version 2), shared by every backend: each group of 128 elements is 64 bytes read
// as 16 little-endian 32-bit words; bits 4h..4h+3 of word i hold element 16h + i (h = 0..7), as
// code + 8. So one 64-byte load and a shift by 4h give 16 consecutive elements, one per 32-bit
// lane, with no lane-crossing unpack (measured on Zen 4: 15-20 % less decode time than the
// version-1 byte strips, whose vpmovzxbd competes with the table permutes for the shuffle unit).
// int4 codes are padded to whole groups (padding nibbles hold code 0), int8 codes and every
// term's scales to whole 64-element blocks, so no path reads past its codes.
//
// Every code byte is read once per call for all K outputs. The AVX-512 path decodes a scale block
// of 64 elements in registers (int4: one table permute per 16 values, the nibble is the index) and
// keeps the accumulators of up to 4 outputs there; the AVX2 path decodes in registers too, one
// output per pass (8 accumulators); the plain build (and every path's last partial scale block)
// decodes 4096 elements into L1 and accumulates.
//
// Paired int4 terms (CPU pools; see "paired int4" below) sum in int32 instead, two checkpoints per
// vpmaddwd: half the instructions of the float decode, which is this CPU path's limit.
#include <immintrin.h>
#include <pybind11/numpy.h>
#include <pybind11/stl.h>
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <stdexcept>
#include <string>
#include "cpu/avx2_store.h"
#include "cpu/avx512_store.h"
#include "cpu/tv_common.h"

namespace py = pybind11;

namespace pymerge {
namespace {

enum Kind : int { Q8 = 16, Q4 = 17, Q4PA = 18, Q4PB = 19 };  // dense terms carry their dtype code (F32, F16, BF16)
constexpr int64_t kQBlock = 64;        // elements per scale
constexpr int64_t kGroup = 128;        // int4 packing unit: two scale blocks
constexpr int64_t kBlock = 4096;       // elements per work unit, a multiple of kQBlock
constexpr int kMaxK = 4;               // outputs per AVX-512 pass: 4 * 4 accumulators of the 32 zmm registers
constexpr int64_t kMaxPairs = 1024;    // paired terms per call: their int32 sums cannot overflow

// ---- arithmetic, shared by every path and backend -----------------------------------------------
// coef = float32(w * s) once per output, term and scale block (s = 1 for dense terms), then
// acc = fma(coef, x, acc) over the terms in order from acc = -0.0, where x is the code (exact in
// float32) or the dense value. -0.0 is the exact identity of addition, so the first step equals
// coef * x, sign of zero included. kernels/delta_decode.py and csrc/cuda/delta_decode.cu compute
// the same operations, so every backend gives the same bits.

// Terms of one kind that follow each other: the hot loops run over a run without dispatching.
struct Run {
  int kind;
  int64_t t0, t1;
};

struct Job {
  const uintptr_t* data;
  const uintptr_t* scales;
  const int* kind;
  int64_t n_terms;
  const float* w;  // [n_out, n_terms]
  const uintptr_t* out;
  const int* out_dt;
  int64_t n_out;
  bool stream;  // non-temporal stores: outputs too big to stay in cache anyway
  const Run* runs;     // of the terms before pair_t0
  int64_t n_runs;
  int64_t pair_t0;     // terms pair_t0.. are paired int4 terms, Q4PA then Q4PB, n_pairs of each
  int64_t n_pairs;
  bool dense_runs_only;  // every term before pair_t0 is dense (float32, float16, bfloat16)
  const int64_t* group_stride;  // int4 terms: bytes from one group of 128 codes to the next (64: contiguous)
};

inline bool quantized(int kind) { return kind == Q8 || kind == Q4; }
inline bool paired(int kind) { return kind == Q4PA || kind == Q4PB; }
inline bool dense(int kind) { return kind == F32 || kind == F16 || kind == BF16; }

inline float scale_at(const Job& J, int64_t t, int64_t e) {
  return bf16_to_f32(reinterpret_cast<const uint16_t*>(J.scales[t])[e / kQBlock]);
}

// ---- paired int4 ----------------------------------------------------------------------------------
// A CPU pool holds its int4 checkpoints two by two (pymerge/pool/compressed.py, pair_int4): per block
// of 64 elements, 64 bytes read as 16 little-endian 32-bit words; element 8j + i (j = 4r + h) is in
// word 8r + i, bits 4h..4h+3 for the pair's first checkpoint and 16 + 4h..19 + 4h for its second,
// as code + 8. One shift and one mask give 8 elements of both, one int16 each, which vpmaddwd
// multiplies by the two coefficients and adds.
//
// Their arithmetic, per output and block: c_t = float32(w * s_t) as for any term; M = max_t |c_t|
// (compared as bits, so NaN and inf show); e = M's exponent, biased as float32's (M in [2^(e-127),
// 2^(e-126)); for a subnormal M it goes below 1, down to -22; e = 1 for M = 0); k_t = clamp(
// nearbyint(c_t * 2^(141 - e)), -32767, 32767): each coefficient to 15 bits of the largest (|k| <
// 2^15); S = sum_t k_t * code_t exactly in int32; the block's accumulation starts at P = float32(S) *
// 2^(e - 141) (where a float term would start at -0.0: an exact zero S gives +0.0, which the float
// path can give as -0.0) and the other terms follow in order. Per element the error against the
// float64 sum of c_t * code_t is below sum_t |code_t| * 2^-14 * M. 2^(141 - e) and 2^(e - 141) can
// exceed float32's range, so each is two multiplications by powers of two, 2^a * 2^b with a + b =
// 141 - e (|a|, |b| <= 82), all exact (S * 2^(e - 141) is a multiple of 2^-149 whatever e is), so
// P = float32(S) scaled. A non-finite M makes P NaN.
inline float pow2f(int e) { return bits_to_f32(uint32_t(127 + e) << 23); }  // -126 <= e <= 127

struct PairScale {
  float up1, up2, down1, down2;  // 2^a, 2^b, 2^-a, 2^-b with a + b = 141 - e
};

// e as above from M's bits (< 0x7f800000): a subnormal's from its mantissa m (M = m * 2^-149), whose
// exact float32 conversion has the biased exponent floor(log2 m) + 127.
inline int pair_exponent(uint32_t max_bits) {
  if (max_bits >= 0x00800000u) return int(max_bits >> 23);
  if (max_bits == 0) return 1;
  return int(f32_to_bits(float(int32_t(max_bits))) >> 23) - 149;
}

inline PairScale pair_scale(uint32_t max_bits) {
  if (max_bits >= 0x7f800000u) {
    const float nan = bits_to_f32(0x7fc00000u);
    return {1.0f, 1.0f, nan, nan};
  }
  const int e = pair_exponent(max_bits);
  const int a = (141 - e) >> 1, b = 141 - e - a;
  return {pow2f(a), pow2f(b), pow2f(-a), pow2f(-b)};
}

inline int32_t pair_coef(float c, const PairScale& ps) {
  const float x = std::nearbyint(c * ps.up1 * ps.up2);
  return int32_t(std::min(32767.0f, std::max(-32767.0f, x)));
}

// The code + 8 of element e of a pair's first (second = 0) or second (1) checkpoint.
inline int q4p_nibble(const uint8_t* p, int64_t e, int second) {
  const int64_t l = e % kQBlock, j = l / 8;
  uint32_t word;
  std::memcpy(&word, p + e / kQBlock * 64 + 32 * (j / 4) + 4 * (l % 8), 4);
  return int((word >> (16 * second + 4 * (j % 4))) & 15);
}

// dst[0..n) = P for output k at elements start .. start+n-1 (start a multiple of kQBlock).
inline void pairs_portable(const Job& J, int64_t k, int64_t start, int64_t n, float* __restrict dst) {
  thread_local std::vector<float> ct;  // c_t of the block's paired terms
  thread_local std::vector<int32_t> kt;
  ct.resize(size_t(2 * J.n_pairs));
  kt.resize(size_t(2 * J.n_pairs));
  for (int64_t i = 0; i < n; i += kQBlock) {
    const int64_t e = start + i;
    uint32_t max_bits = 0;
    for (int64_t t = J.pair_t0; t < J.n_terms; ++t) {
      ct[t - J.pair_t0] = J.w[k * J.n_terms + t] * scale_at(J, t, e);
      max_bits = std::max(max_bits, f32_to_bits(ct[t - J.pair_t0]) & 0x7fffffffu);
    }
    const PairScale ps = pair_scale(max_bits);
    int64_t bias = 0;
    for (int64_t t = 0; t < 2 * J.n_pairs; ++t) {
      kt[t] = pair_coef(ct[t], ps);
      bias += 8 * int64_t(kt[t]);
    }
    for (int64_t j = i; j < std::min(n, i + kQBlock); ++j) {
      int32_t sum = 0;
      for (int64_t p = 0; p < J.n_pairs; ++p) {
        const uint8_t* codes = reinterpret_cast<const uint8_t*>(J.data[J.pair_t0 + 2 * p]);
        sum += kt[2 * p] * q4p_nibble(codes, start + j, 0) + kt[2 * p + 1] * q4p_nibble(codes, start + j, 1);
      }
      dst[j] = float(sum - int32_t(bias)) * ps.down1 * ps.down2;
    }
  }
}


// ---- portable path (plain x86-64; an AVX2 build of it does the AVX2 path's partial blocks) -----
// int4 layout: element e's code is in 32-bit word (e % 128) % 16 of its 64-byte group, nibble (e % 128) / 16.
// dst[0..n) = term t's codes (as float32, unscaled) or dense values at elements start ..
// start+n-1; start is a multiple of kQBlock.
inline void decode_block(const Job& J, int64_t t, int64_t start, int64_t n, float* __restrict dst) {
  const int kind = J.kind[t];
  if (!quantized(kind)) return tv::load_f32(J.data[t], kind, start, n, dst);
  for (int64_t i = 0; i < n; i += kQBlock) {
    const int64_t e = start + i;
    float block[kQBlock];
    if (kind == Q8) {
      const int8_t* c = reinterpret_cast<const int8_t*>(J.data[t]) + e;
      for (int j = 0; j < kQBlock; ++j) block[j] = float(c[j]);
    } else {  // the block's half of its group: 16 words, nibbles 4 * half .. 4 * half + 3
      uint32_t word[16];
      std::memcpy(word, reinterpret_cast<const uint8_t*>(J.data[t]) + e / kGroup * J.group_stride[t], 64);
      const int shift0 = e % kGroup ? 16 : 0;
      for (int h = 0; h < 4; ++h)
        for (int j = 0; j < 16; ++j) block[16 * h + j] = float(int((word[j] >> (shift0 + 4 * h)) & 15) - 8);
    }
    std::memcpy(dst + i, block, size_t(std::min(kQBlock, n - i)) * 4);
  }
}

// __builtin_fmaf: one instruction where the target has FMA (AVX2 build), glibc's exact fmaf otherwise.
inline void block_portable_body(const Job& J, int64_t start, int64_t n, float* accs, float* xbuf) {
  std::fill(accs, accs + J.n_out * kBlock, -0.0f);
  if (J.n_pairs > 0)
    for (int64_t k = 0; k < J.n_out; ++k) pairs_portable(J, k, start, n, accs + k * kBlock);
  for (int64_t t = 0; t < J.pair_t0; ++t) {
    decode_block(J, t, start, n, xbuf);
    const bool q = quantized(J.kind[t]);
    for (int64_t k = 0; k < J.n_out; ++k) {
      const float w = J.w[k * J.n_terms + t];
      float* __restrict a = accs + k * kBlock;
      const float* __restrict x = xbuf;
      for (int64_t b = 0; b < n; b += kQBlock) {
        const float c = q ? w * scale_at(J, t, start + b) : w;
        for (int64_t j = b; j < std::min(n, b + kQBlock); ++j) a[j] = __builtin_fmaf(c, x[j], a[j]);
      }
    }
  }
  for (int64_t k = 0; k < J.n_out; ++k) tv::store_f32(J.out[k], J.out_dt[k], start, n, accs + k * kBlock);
}

PM_PLAIN void block_plain(const Job& J, int64_t s, int64_t n, float* a, float* x) { block_portable_body(J, s, n, a, x); }
__attribute__((target("avx2,fma,f16c"), flatten)) void block_avx2(const Job& J, int64_t s, int64_t n, float* a,
                                                                  float* x) {
  block_portable_body(J, s, n, a, x);
}

// ---- AVX-512 ------------------------------------------------------------------------------------
#define DD_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,fma,f16c")))

DD_AVX512 inline __m512 load16_dense(const char* p, int dt) {
  if (dt == F32) return _mm512_loadu_ps(reinterpret_cast<const float*>(p));
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  if (dt == F16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

inline char* out_at(const Job& J, int64_t k, int64_t e) {
  return reinterpret_cast<char*>(J.out[k]) + e * int64_t(dtype_size(J.out_dt[k]));
}

constexpr int64_t kPrefetchBytes = 1024;  // per stream, as weighted_sum: prefetchers juggle many streams poorly
constexpr int64_t kPrefetchGroups = kPrefetchBytes / 64;  // int4 groups ahead (of interleaved codes too)
constexpr int64_t kUnitBlocks = kBlock / kQBlock;

// coef[(t * K + k) * kUnitBlocks + b] = float32(w[k0 + k, t] * scale of block b) for the quantized
// terms of the unit at `start` (nb blocks): 16 scales per step instead of one scalar per block in
// the hot loop.
template <int K>
DD_AVX512 void unit_coefs(const Job& J, int64_t k0, int64_t start, int64_t nb, float* coef) {
  for (int64_t t = 0; t < J.n_terms; ++t) {
    if (!quantized(J.kind[t])) continue;
    const uint16_t* s = reinterpret_cast<const uint16_t*>(J.scales[t]) + start / kQBlock;
    for (int64_t b = 0; b < nb; b += 16) {
      const __mmask16 m = nb - b >= 16 ? __mmask16(0xffff) : __mmask16((1u << (nb - b)) - 1);
      const __m512 sv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, s + b)), 16));
      for (int k = 0; k < K; ++k)
        _mm512_storeu_ps(coef + (t * K + k) * kUnitBlocks + b, _mm512_mul_ps(_mm512_set1_ps(J.w[(k0 + k) * J.n_terms + t]), sv));
    }
  }
}

// acc[k][0..3] += coef_k * x[0..3] for the 64 values of one block.
template <int K>
DD_AVX512 inline void fma_block(__m512 acc[][4], const __m512 x[4], const float* c, int64_t stride) {
#pragma GCC unroll 4
  for (int k = 0; k < K; ++k) {
    const __m512 ck = _mm512_set1_ps(c[k * stride]);
    for (int h = 0; h < 4; ++h) acc[k][h] = _mm512_fmadd_ps(ck, x[h], acc[k][h]);
  }
}

// Whole scale blocks of one unit, all K accumulators (4 zmm each) in registers: every code byte
// and input element is loaded once, every output element stored once.
template <int K>
DD_AVX512 void blocks_avx512(const Job& J, int64_t k0, int64_t start, int64_t len, float* coef) {
  const __m512 lut = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  const int64_t nb = len / kQBlock;
  unit_coefs<K>(J, k0, start, nb, coef);
  bool stream[K];
  for (int k = 0; k < K; ++k)  // stream only where every store is aligned (bf16: 32 B, f32: 64 B)
    stream[k] = J.stream && reinterpret_cast<uintptr_t>(out_at(J, k0 + k, start)) % (J.out_dt[k0 + k] == F32 ? 64 : 32) == 0;
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t e = start + b * kQBlock;
    const bool second = e % kGroup != 0;  // int4: the upper half of a group (and one prefetch per group)
    __m512 acc[K][4];
    for (int k = 0; k < K; ++k)
      for (int h = 0; h < 4; ++h) acc[k][h] = _mm512_set1_ps(-0.0f);
    for (int64_t r = 0; r < J.n_runs; ++r) {
      const Run run = J.runs[r];
      if (run.kind == Q4) {
        for (int64_t t = run.t0; t < run.t1; ++t) {
          const char* p = reinterpret_cast<const char*>(J.data[t]) + e / kGroup * J.group_stride[t];  // this block's group
          if (second) _mm_prefetch(p + kPrefetchGroups * J.group_stride[t], _MM_HINT_T0);
          // lane i of word i: nibble h is element 16h + i, and the low 4 bits index the table
          __m512i v = _mm512_loadu_si512(p);
          if (second) v = _mm512_srli_epi32(v, 16);
          __m512 x[4];
          for (int h = 0; h < 4; ++h) x[h] = _mm512_permutexvar_ps(h ? _mm512_srli_epi32(v, 4 * h) : v, lut);
          fma_block<K>(acc, x, coef + t * K * kUnitBlocks + b, kUnitBlocks);
        }
      } else if (run.kind == Q8) {
        for (int64_t t = run.t0; t < run.t1; ++t) {
          const char* p = reinterpret_cast<const char*>(J.data[t]) + e;
          _mm_prefetch(p + kPrefetchBytes, _MM_HINT_T0);
          __m512 x[4];
          for (int h = 0; h < 4; ++h)
            x[h] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * h))));
          fma_block<K>(acc, x, coef + t * K * kUnitBlocks + b, kUnitBlocks);
        }
      } else {
        const size_t es = dtype_size(run.kind);
        for (int64_t t = run.t0; t < run.t1; ++t) {
          const char* p = reinterpret_cast<const char*>(J.data[t]) + e * es;
          for (size_t l = 0; l < es; ++l) _mm_prefetch(p + kPrefetchBytes + 64 * l, _MM_HINT_T0);
          __m512 x[4];
          for (int h = 0; h < 4; ++h) x[h] = load16_dense(p + 16 * h * es, run.kind);
          fma_block<K>(acc, x, J.w + k0 * J.n_terms + t, J.n_terms);
        }
      }
    }
#pragma GCC unroll 4
    for (int k = 0; k < K; ++k) {
      const int dt = J.out_dt[k0 + k];
      char* dst = out_at(J, k0 + k, e);
      for (int h = 0; h < 4; ++h) store16_any(dst + 16 * h * dtype_size(dt), acc[k][h], dt, stream[k]);
    }
  }
}

// Jobs without paired terms only (pick_block sends the others to the AVX2 path): runs cover the terms
// before pair_t0.
DD_AVX512 void block_avx512(const Job& J, int64_t start, int64_t len, float* accs, float* xbuf) {
  static void (*const by_k[kMaxK])(const Job&, int64_t, int64_t, int64_t, float*) = {
      blocks_avx512<1>, blocks_avx512<2>, blocks_avx512<3>, blocks_avx512<4>};
  for (int64_t k0 = 0; k0 < J.n_out; k0 += kMaxK)  // more than 4 outputs: re-read the unit from cache
    by_k[std::min<int64_t>(kMaxK, J.n_out - k0) - 1](J, k0, start, len, accs);  // accs: room for the coefs
  const int64_t done = len / kQBlock * kQBlock;
  if (done < len) block_plain(J, start + done, len - done, accs, xbuf);  // the tensor's last few elements
}

// ---- AVX2 ---------------------------------------------------------------------------------------
// The AVX-512 path's arithmetic in 8-wide registers, one output per pass (8 accumulators of the 16
// ymm registers): every value of a scale block is decoded in registers, never through memory.
#define DD_AVX2 __attribute__((target("avx2,fma,f16c")))

// acc[j] = fma(c, x_j, acc[j]) for the 64 int4 values of one block, whose nibbles start at bit P0
// (0: the group's first half, 16: its second). The stored nibble is code + 8; xor 8 makes it the
// code in 4-bit two's complement, which a left shift to the top and an arithmetic right shift
// extract: element 16h + i is in lane i % 8 of register i / 8, bits P0 + 4h.
template <int P0>
DD_AVX2 inline void fma_q4_block(__m256 acc[8], const char* group, float c) {
  const __m256i flip = _mm256_set1_epi32(int(0x88888888u));
  const __m256i v[2] = {_mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(group)), flip),
                        _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(group + 32)), flip)};
  const __m256 cv = _mm256_set1_ps(c);
#pragma GCC unroll 8
  for (int j = 0; j < 8; ++j) {
    const int top = 28 - P0 - 4 * (j / 2);  // left shift that puts nibble j / 2 in bits 28..31
    const __m256i n = _mm256_srai_epi32(top ? _mm256_slli_epi32(v[j % 2], top) : v[j % 2], 28);
    acc[j] = _mm256_fmadd_ps(cv, _mm256_cvtepi32_ps(n), acc[j]);
  }
}

// The paired terms' tables for the nb blocks of a unit (coef: their c_t, as below): kp[p * kUnitBlocks
// + b] = k of pair p's first term | k of its second << 16, bias[b] = 8 * sum_t k_t, down[2 * b + i]
// = the PairScale's down factors. Eight blocks per step, the same operations as pair_scale and
// pair_coef; the last nb % 8 blocks through those.
DD_AVX2 void pair_tables_avx2(const Job& J, int64_t nb, const float* coef, int32_t* kp, int32_t* bias, float* down) {
  int64_t b = 0;
  const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff), lim = _mm256_set1_epi32(32767);
  for (; b + 8 <= nb; b += 8) {
    __m256i mx = _mm256_setzero_si256();
    for (int64_t t = J.pair_t0; t < J.n_terms; ++t)
      mx = _mm256_max_epu32(mx, _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(coef + t * kUnitBlocks + b)), abs_mask));
    const __m256i finite = _mm256_cmpgt_epi32(_mm256_set1_epi32(0x7f800000), mx);
    // e (pair_exponent): the exponent field, or for a subnormal that of its mantissa converted - 149
    const __m256i normal = _mm256_cmpgt_epi32(mx, _mm256_set1_epi32(0x007fffff));
    const __m256i e_sub = _mm256_sub_epi32(_mm256_srli_epi32(_mm256_castps_si256(_mm256_cvtepi32_ps(mx)), 23),
                                           _mm256_set1_epi32(149));
    const __m256i e_any = _mm256_blendv_epi8(e_sub, _mm256_srli_epi32(mx, 23), normal);
    const __m256i e = _mm256_blendv_epi8(e_any, _mm256_set1_epi32(1), _mm256_cmpeq_epi32(mx, _mm256_setzero_si256()));
    const __m256i sh = _mm256_sub_epi32(_mm256_set1_epi32(141), e);
    const __m256i a = _mm256_srai_epi32(sh, 1), bb = _mm256_sub_epi32(sh, a);
    const __m256i e127 = _mm256_set1_epi32(127);
    const __m256 up1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e127, a), 23));
    const __m256 up2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e127, bb), 23));
    const __m256 nan = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fc00000));
    const __m256 up1f = _mm256_blendv_ps(_mm256_set1_ps(1.0f), up1, _mm256_castsi256_ps(finite));
    const __m256 up2f = _mm256_blendv_ps(_mm256_set1_ps(1.0f), up2, _mm256_castsi256_ps(finite));
    const __m256 d1 = _mm256_blendv_ps(nan, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_sub_epi32(e127, a), 23)),
                                       _mm256_castsi256_ps(finite));
    const __m256 d2 = _mm256_blendv_ps(nan, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_sub_epi32(e127, bb), 23)),
                                       _mm256_castsi256_ps(finite));
    __m256i sum = _mm256_setzero_si256();
    for (int64_t p = 0; p < J.n_pairs; ++p) {
      __m256i kk[2];
      for (int i = 0; i < 2; ++i) {
        const __m256 c = _mm256_loadu_ps(coef + (J.pair_t0 + 2 * p + i) * kUnitBlocks + b);
        // cvtps rounds to nearest even (the MXCSR default), as nearbyint; a NaN or beyond-range
        // value (only where M is not finite, whose P is NaN anyway) converts to INT_MIN
        const __m256i r = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_mul_ps(c, up1f), up2f));
        kk[i] = _mm256_min_epi32(lim, _mm256_max_epi32(_mm256_sub_epi32(_mm256_setzero_si256(), lim), r));
        sum = _mm256_add_epi32(sum, kk[i]);
      }
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(kp + p * kUnitBlocks + b),
                          _mm256_or_si256(_mm256_and_si256(kk[0], _mm256_set1_epi32(0xffff)), _mm256_slli_epi32(kk[1], 16)));
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(bias + b), _mm256_slli_epi32(sum, 3));
    const __m256 lo = _mm256_unpacklo_ps(d1, d2), hi = _mm256_unpackhi_ps(d1, d2);  // down1, down2 of a block adjacent
    _mm256_storeu_ps(down + 2 * b, _mm256_permute2f128_ps(lo, hi, 0x20));
    _mm256_storeu_ps(down + 2 * b + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
  }
  for (; b < nb; ++b) {
    uint32_t max_bits = 0;
    for (int64_t t = J.pair_t0; t < J.n_terms; ++t)
      max_bits = std::max(max_bits, f32_to_bits(coef[t * kUnitBlocks + b]) & 0x7fffffffu);
    const PairScale ps = pair_scale(max_bits);
    int32_t sum = 0;
    for (int64_t p = 0; p < J.n_pairs; ++p) {
      const int32_t k0 = pair_coef(coef[(J.pair_t0 + 2 * p) * kUnitBlocks + b], ps);
      const int32_t k1 = pair_coef(coef[(J.pair_t0 + 2 * p + 1) * kUnitBlocks + b], ps);
      kp[p * kUnitBlocks + b] = int32_t((uint32_t(k0) & 0xffffu) | (uint32_t(k1) << 16));
      sum += k0 + k1;
    }
    bias[b] = 8 * sum;
    down[2 * b] = ps.down1;
    down[2 * b + 1] = ps.down2;
  }
}

// acc[j] += k0 * first + k1 * second (int32) for the 64 elements of a paired block.
DD_AVX2 inline void madd_q4p_block(__m256i acc[8], const char* p, __m256i k) {
  const __m256i m = _mm256_set1_epi32(0x000f000f);
  const __m256i v[2] = {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)),
                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32))};
#pragma GCC unroll 8
  for (int j = 0; j < 8; ++j) {
    const int h = j % 4;
    const __m256i x = _mm256_and_si256(h ? _mm256_srli_epi32(v[j / 4], 4 * h) : v[j / 4], m);
    acc[j] = _mm256_add_epi32(acc[j], _mm256_madd_epi16(x, k));
  }
}

// dst[64 b + j] = P of element j of block b, for the nb blocks of the unit at `start`. Its own loop
// nest, so the 8 int32 accumulators keep their registers (in the caller's, GCC kept its constants
// there and spilled 3 of them in every pair's step).
DD_AVX2 __attribute__((noinline)) void pairs_unit_avx2(const Job& J, int64_t start, int64_t nb, const int32_t* kp,
                                                       const int32_t* bias, const float* down, float* dst) {
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t e = start + b * kQBlock;
    __m256i ia[8];
    for (int j = 0; j < 8; ++j) ia[j] = _mm256_setzero_si256();
    int64_t p = 0;
    do {  // n_pairs >= 1: no zero-trip path, for which GCC kept a copy of ia in memory
      const char* q = reinterpret_cast<const char*>(J.data[J.pair_t0 + 2 * p]) + e;  // 64 bytes per block
      _mm_prefetch(q + kPrefetchBytes, _MM_HINT_T0);
      madd_q4p_block(ia, q, _mm256_set1_epi32(kp[p * kUnitBlocks + b]));
    } while (++p < J.n_pairs);
    const __m256i bi = _mm256_set1_epi32(bias[b]);
    const __m256 d1 = _mm256_set1_ps(down[2 * b]), d2 = _mm256_set1_ps(down[2 * b + 1]);
    for (int j = 0; j < 8; ++j)
      _mm256_storeu_ps(dst + b * kQBlock + 8 * j,
                       _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(ia[j], bi)), d1), d2));
  }
}

// The 64 accumulators of a block to dst in dtype dt, rounded once (to nearest even).
DD_AVX2 inline void store_block_avx2(char* dst, const __m256 acc[8], int dt, bool stream) {
  if (dt == BF16) {  // two registers per 32-byte store
    for (int j = 0; j < 8; j += 2) {
      const __m256i h = _mm256_permute4x64_epi64(_mm256_packus_epi32(bf16_round_bits_8(acc[j]), bf16_round_bits_8(acc[j + 1])), 0xD8);
      __m256i* d = reinterpret_cast<__m256i*>(dst + 16 * j);
      if (stream) _mm256_stream_si256(d, h);
      else _mm256_storeu_si256(d, h);
    }
  } else {
    for (int j = 0; j < 8; ++j) store8_any(dst + 8 * j * dtype_size(dt), acc[j], dt, stream);
  }
}

// Paired terms and dense ones only (a CPU pool's usual job: the base, checkpoints held exact, the
// int4 pairs): after pairs_unit_avx2, one lean pass per block adds the dense terms to P and stores,
// the same operations in the same order as the generic loop below, which pays ~45 cycles more per
// block for its dispatch (and keeps its accumulators in memory between runs).
DD_AVX2 __attribute__((noinline)) void dense_unit_avx2(const Job& J, int64_t k, int64_t start, int64_t nb,
                                                       const float* p_start, bool stream) {
  const float* wk = J.w + k * J.n_terms;
  const int dt = J.out_dt[k];
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t e = start + b * kQBlock;
    __m256 acc[8];
    for (int j = 0; j < 8; ++j) acc[j] = _mm256_loadu_ps(p_start + b * kQBlock + 8 * j);
    for (int64_t t = 0; t < J.pair_t0; ++t) {
      const int kind = J.kind[t];
      const size_t es = dtype_size(kind);
      const char* x = reinterpret_cast<const char*>(J.data[t]) + e * es;
      for (size_t l = 0; l < es; ++l) _mm_prefetch(x + kPrefetchBytes + 64 * l, _MM_HINT_T0);
      const __m256 cv = _mm256_set1_ps(wk[t]);
      if (kind == BF16) {
        for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(cv, load8_dense(x + 16 * j, BF16), acc[j]);
      } else if (kind == F16) {
        for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(cv, load8_dense(x + 16 * j, F16), acc[j]);
      } else {
        for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(cv, load8_dense(x + 32 * j, F32), acc[j]);
      }
    }
    store_block_avx2(out_at(J, k, e), acc, dt, stream);
  }
}

// Whole scale blocks of one unit for output k: as blocks_avx512 with K = 1.
DD_AVX2 void blocks_avx2(const Job& J, int64_t k, int64_t start, int64_t len, float* coef) {
  const int64_t nb = len / kQBlock;
  const float* wk = J.w + k * J.n_terms;
  for (int64_t t = 0; t < J.n_terms; ++t) {  // coef[t * kUnitBlocks + b] = float32(w * scale of block b)
    if (!quantized(J.kind[t]) && !paired(J.kind[t])) continue;
    const uint16_t* s = reinterpret_cast<const uint16_t*>(J.scales[t]) + start / kQBlock;
    const __m256 w = _mm256_set1_ps(wk[t]);
    int64_t b = 0;
    for (; b + 8 <= nb; b += 8) {
      const __m256i sv = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + b))), 16);
      _mm256_storeu_ps(coef + t * kUnitBlocks + b, _mm256_mul_ps(w, _mm256_castsi256_ps(sv)));
    }
    for (; b < nb; ++b) coef[t * kUnitBlocks + b] = wk[t] * bf16_to_f32(s[b]);
  }
  int32_t* kp = reinterpret_cast<int32_t*>(coef + J.n_terms * kUnitBlocks);  // the paired terms' tables
  int32_t* bias = kp + J.n_pairs * kUnitBlocks;
  float* down = reinterpret_cast<float*>(bias + kUnitBlocks);
  float* p_start = down + 2 * kUnitBlocks;  // P of every element of the unit (kBlock floats)
  const int dt = J.out_dt[k];
  const bool stream = J.stream && reinterpret_cast<uintptr_t>(out_at(J, k, start)) % 32 == 0;
  if (J.n_pairs > 0) {
    pair_tables_avx2(J, nb, coef, kp, bias, down);
    pairs_unit_avx2(J, start, nb, kp, bias, down, p_start);
    if (J.dense_runs_only) return dense_unit_avx2(J, k, start, nb, p_start, stream);
  }
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t e = start + b * kQBlock;
    const bool second = e % kGroup != 0;
    __m256 acc[8];
    if (J.n_pairs > 0) {
      for (int j = 0; j < 8; ++j) acc[j] = _mm256_loadu_ps(p_start + b * kQBlock + 8 * j);
    } else {
      for (int j = 0; j < 8; ++j) acc[j] = _mm256_set1_ps(-0.0f);
    }
    for (int64_t r = 0; r < J.n_runs; ++r) {
      const Run run = J.runs[r];
      if (run.kind == Q4) {
        for (int64_t t = run.t0; t < run.t1; ++t) {
          const char* p = reinterpret_cast<const char*>(J.data[t]) + e / kGroup * J.group_stride[t];
          const float c = coef[t * kUnitBlocks + b];
          if (second) {
            _mm_prefetch(p + kPrefetchGroups * J.group_stride[t], _MM_HINT_T0);
            fma_q4_block<16>(acc, p, c);
          } else {
            fma_q4_block<0>(acc, p, c);
          }
        }
      } else if (run.kind == Q8) {
        for (int64_t t = run.t0; t < run.t1; ++t) {
          const char* p = reinterpret_cast<const char*>(J.data[t]) + e;
          _mm_prefetch(p + kPrefetchBytes, _MM_HINT_T0);
          const __m256 cv = _mm256_set1_ps(coef[t * kUnitBlocks + b]);
          for (int j = 0; j < 8; ++j) {
            const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * j));
            acc[j] = _mm256_fmadd_ps(cv, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), acc[j]);
          }
        }
      } else {
        const size_t es = dtype_size(run.kind);
        for (int64_t t = run.t0; t < run.t1; ++t) {
          const char* p = reinterpret_cast<const char*>(J.data[t]) + e * es;
          for (size_t l = 0; l < es; ++l) _mm_prefetch(p + kPrefetchBytes + 64 * l, _MM_HINT_T0);
          const __m256 cv = _mm256_set1_ps(wk[t]);
          for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(cv, load8_dense(p + 8 * j * es, run.kind), acc[j]);
        }
      }
    }
    store_block_avx2(out_at(J, k, e), acc, dt, stream);
  }
}

DD_AVX2 void block_avx2_regs(const Job& J, int64_t start, int64_t len, float* accs, float* xbuf) {
  for (int64_t k = 0; k < J.n_out; ++k) blocks_avx2(J, k, start, len, accs);  // accs: room for the coefs
  const int64_t done = len / kQBlock * kQBlock;
  if (done < len) block_avx2(J, start + done, len - done, accs, xbuf);  // the tensor's last few elements
}

// ---- driver -------------------------------------------------------------------------------------
using BlockFn = void (*)(const Job&, int64_t, int64_t, float*, float*);

// Per call, so PYMERGE_SIMD can switch paths (the tests run all three). Paired int4 terms have no
// AVX-512 build: an AVX-512 CPU runs such a job on its AVX2 path.
BlockFn pick_block(bool paired_terms) {
  const std::string level = simd_level();
  if (level == "avx512") return paired_terms ? block_avx2_regs : block_avx512;
  return level == "avx2" ? block_avx2_regs : block_plain;
}

constexpr int64_t kMinPerThread = 1 << 18;  // elements: below this a second thread costs more than it gives
constexpr int64_t kStreamBytes = 8 << 20;   // outputs above this skip the cache
constexpr int64_t kBlocksPerChunk = 16;     // 64K elements claimed at a time by a thread

// One tensor's terms and outputs, checked once: per call by delta_accumulate, once per plan by a DeltaPlan.
struct Terms {
  std::vector<uintptr_t> data, scales, out;
  std::vector<int> kinds, out_dt;
  std::vector<int64_t> strides;
  std::vector<Run> runs;
  int64_t numel = 0, n_terms = 0, n_out = 0, pair_t0 = 0, n_pairs = 0;
  bool dense_only = false;
  size_t acc_floats = 0;  // what a thread's accs must hold for this tensor

  Job job(const float* w) const {
    return Job{data.data(), scales.data(), kinds.data(), n_terms, w, out.data(), out_dt.data(), n_out,
               numel * 2 >= kStreamBytes, runs.data(), int64_t(runs.size()), pair_t0, n_pairs, dense_only,
               strides.data()};
  }
};

Terms make_terms(const std::vector<uintptr_t>& data, const std::vector<uintptr_t>& scales, const std::vector<int>& kinds,
                 int64_t numel, const std::vector<uintptr_t>& out_ptrs, const std::vector<int>& out_dtypes,
                 std::vector<int64_t> group_strides, const std::string& who) {
  Terms T;
  T.n_terms = int64_t(data.size());
  T.n_out = int64_t(out_ptrs.size());
  if (T.n_terms == 0 || T.n_out == 0) throw std::invalid_argument(who + ": need at least one term and one output");
  if (int64_t(scales.size()) != T.n_terms || int64_t(kinds.size()) != T.n_terms || int64_t(out_dtypes.size()) != T.n_out)
    throw std::invalid_argument(who + ": inconsistent argument lengths");
  if (group_strides.empty()) group_strides.assign(size_t(T.n_terms), 64);
  if (int64_t(group_strides.size()) != T.n_terms) throw std::invalid_argument(who + ": one group stride per term");
  int64_t pair_t0 = T.n_terms;
  for (int64_t t = 0; t < T.n_terms; ++t) {
    const int k = kinds[t];
    if (!(k == F32 || k == F16 || k == BF16 || quantized(k) || paired(k)))
      throw std::invalid_argument(who + ": bad term kind");
    if (k == Q4 && (group_strides[t] < 64 || group_strides[t] % 64))
      throw std::invalid_argument(who + ": an int4 term's group stride is a multiple of 64 bytes");
    if ((quantized(k) || paired(k)) && scales[t] == 0)
      throw std::invalid_argument(who + ": quantized term without scales");
    if (paired(k) && pair_t0 == T.n_terms) pair_t0 = t;
    if (t >= pair_t0 && (k != ((t - pair_t0) % 2 ? Q4PB : Q4PA) || ((t - pair_t0) % 2 && data[t] != data[t - 1])))
      throw std::invalid_argument(who + ": paired int4 terms come last, each first/second pair on one buffer");
  }
  T.n_pairs = (T.n_terms - pair_t0) / 2;
  if ((T.n_terms - pair_t0) % 2 || T.n_pairs > kMaxPairs)
    throw std::invalid_argument(who + ": paired int4 terms come in whole pairs, at most 1024 of them");
  for (int dt : out_dtypes) if (dt < F32 || dt > BF16) throw std::invalid_argument(who + ": bad output dtype code");
  T.data = data;
  T.scales = scales;
  T.kinds = kinds;
  T.out = out_ptrs;
  T.out_dt = out_dtypes;
  T.strides = std::move(group_strides);
  T.numel = numel;
  T.pair_t0 = pair_t0;
  for (int64_t t = 0; t < pair_t0; ++t) {
    if (T.runs.empty() || T.runs.back().kind != kinds[t]) T.runs.push_back({kinds[t], t, t});
    T.runs.back().t1 = t + 1;
  }
  T.dense_only = std::all_of(kinds.begin(), kinds.begin() + pair_t0, dense);
  // accs also holds the SIMD paths' coefficients (n_terms * kMaxK per scale block of a unit) and the
  // paired terms' tables (n_pairs + 3 per scale block) and P (kBlock)
  T.acc_floats = size_t(std::max({T.n_out * kBlock, T.n_terms * kMaxK * kUnitBlocks,
                                  (T.n_terms + T.n_pairs + 3) * kUnitBlocks + kBlock}));
  return T;
}

// A compressed pool's whole linear merge into one set of targets, run in one call: per tensor its
// terms and outputs (checked once, when the pool plans those targets), then per call only the
// weights. Called per tensor, a model of many small tensors paid ~100 us of Python and a thread
// wake-up per tensor (300 tensors of 1024 elements, N = 5: 38 ms per candidate, 2.4 ms in one call,
// 1.7 ms for the bf16 pool's GroupedPlan). Work is cut into pieces of at most kBlocksPerChunk blocks of one tensor, packed in
// order into spans of about kSpanElems elements: a span is a piece of a big tensor or many small ones.
// delta_accumulate runs a plan of its one tensor.
class DeltaPlan {
 public:
  DeltaPlan(const std::vector<std::vector<uintptr_t>>& data, const std::vector<std::vector<uintptr_t>>& scales,
            const std::vector<std::vector<int>>& kinds, const std::vector<int64_t>& numels,
            const std::vector<std::vector<uintptr_t>>& outs, const std::vector<std::vector<int>>& out_dtypes,
            const std::vector<std::vector<int64_t>>& strides)
      : DeltaPlan(checked_terms(data, scales, kinds, numels, outs, out_dtypes, strides)) {}

  explicit DeltaPlan(std::vector<Terms> tensors) : tensors_(std::move(tensors)) {
    int64_t span_elems = 0, first = 0;
    for (size_t t = 0; t < tensors_.size(); ++t) {
      const Terms& T = tensors_[t];
      w_offset_.push_back(n_weights_);
      n_weights_ += T.n_terms * T.n_out;
      acc_floats_ = std::max(acc_floats_, T.acc_floats);
      total_elems_ += T.numel;
      const int64_t n_blocks = (T.numel + kBlock - 1) / kBlock;
      for (int64_t b = 0; b < n_blocks; b += kBlocksPerChunk) {
        const int64_t b1 = std::min(n_blocks, b + kBlocksPerChunk);
        pieces_.push_back({int64_t(t), b, b1});
        span_elems += std::min(T.numel, b1 * kBlock) - b * kBlock;
        if (span_elems >= kSpanElems) {
          spans_.push_back({first, int64_t(pieces_.size())});
          first = int64_t(pieces_.size());
          span_elems = 0;
        }
      }
    }
    if (first < int64_t(pieces_.size())) spans_.push_back({first, int64_t(pieces_.size())});
  }

  // weights: float32, tensor t's [n_out, n_terms] (C order) after the tensors before it
  void run_array(py::array_t<float, py::array::c_style | py::array::forcecast> weights, int num_threads) {
    if (weights.size() != n_weights_)
      throw std::invalid_argument("delta plan: weights must have " + std::to_string(n_weights_) + " entries, got " +
                                  std::to_string(weights.size()));
    const float* w = weights.data();
    py::gil_scoped_release nogil;
    run(w, num_threads);
  }

  // w: n_weights() floats (the GIL released, or never held: delta_accumulate's binding)
  void run(const float* w, int num_threads) const {
    const BlockFn blocks[2] = {pick_block(false), pick_block(true)};  // per call: PYMERGE_SIMD may change
    const int64_t wanted = num_threads > 0 ? num_threads : default_threads();
    const int threads = int(std::max<int64_t>(1, std::min(wanted, (total_elems_ + kMinPerThread - 1) / kMinPerThread)));
    parallel_for(int64_t(spans_.size()), 1, threads, [&](int64_t s0, int64_t s1) {
      thread_local std::vector<float> accs, xbuf;
      accs.resize(std::max(accs.size(), acc_floats_));
      xbuf.resize(kBlock);
      for (int64_t s = s0; s < s1; ++s) {
        for (int64_t p = spans_[size_t(s)].first; p < spans_[size_t(s)].last; ++p) {
          const Piece& pc = pieces_[size_t(p)];
          const Terms& T = tensors_[size_t(pc.tensor)];
          const Job J = T.job(w + w_offset_[size_t(pc.tensor)]);
          const BlockFn block = blocks[T.n_pairs > 0];
          for (int64_t b = pc.b0; b < pc.b1; ++b) {
            const int64_t start = b * kBlock;
            block(J, start, std::min(kBlock, T.numel - start), accs.data(), xbuf.data());
          }
        }
      }
      _mm_sfence();  // make this thread's streaming stores visible before the call returns
    });
  }

  int64_t num_tensors() const { return int64_t(tensors_.size()); }
  int64_t num_spans() const { return int64_t(spans_.size()); }
  int64_t num_weights() const { return n_weights_; }

 private:
  static constexpr int64_t kSpanElems = kBlocksPerChunk * kBlock;

  static std::vector<Terms> checked_terms(
      const std::vector<std::vector<uintptr_t>>& data, const std::vector<std::vector<uintptr_t>>& scales,
      const std::vector<std::vector<int>>& kinds, const std::vector<int64_t>& numels,
      const std::vector<std::vector<uintptr_t>>& outs, const std::vector<std::vector<int>>& out_dtypes,
      const std::vector<std::vector<int64_t>>& strides) {
    const size_t n = numels.size();
    if (data.size() != n || scales.size() != n || kinds.size() != n || outs.size() != n || out_dtypes.size() != n ||
        strides.size() != n)
      throw std::invalid_argument("delta plan: one entry per tensor in every table");
    std::vector<Terms> tensors;
    for (size_t t = 0; t < n; ++t) {
      if (numels[t] < 0) throw std::invalid_argument("delta plan: tensor " + std::to_string(t) + ": negative numel");
      tensors.push_back(make_terms(data[t], scales[t], kinds[t], numels[t], outs[t], out_dtypes[t], strides[t],
                                   "delta plan: tensor " + std::to_string(t)));
    }
    return tensors;
  }
  struct Piece { int64_t tensor, b0, b1; };  // blocks [b0, b1) of one tensor
  struct Span { int64_t first, last; };      // pieces [first, last)

  std::vector<Terms> tensors_;
  std::vector<int64_t> w_offset_;
  std::vector<Piece> pieces_;
  std::vector<Span> spans_;
  size_t acc_floats_ = 0;
  int64_t total_elems_ = 0, n_weights_ = 0;
};

void delta_accumulate(const std::vector<uintptr_t>& data, const std::vector<uintptr_t>& scales,
                      const std::vector<int>& kinds, int64_t numel, const std::vector<float>& weights,
                      const std::vector<uintptr_t>& out_ptrs, const std::vector<int>& out_dtypes, int num_threads,
                      std::vector<int64_t> group_strides) {
  Terms T = make_terms(data, scales, kinds, numel, out_ptrs, out_dtypes, std::move(group_strides),
                       "delta_accumulate");
  if (int64_t(weights.size()) != T.n_terms * T.n_out)
    throw std::invalid_argument("delta_accumulate: inconsistent argument lengths");
  if (numel <= 0) return;
  std::vector<Terms> one;
  one.push_back(std::move(T));
  DeltaPlan(std::move(one)).run(weights.data(), num_threads);  // one tensor: pieces of kBlocksPerChunk blocks
}

// ---- encoding (pool construction) ---------------------------------------------------------------
// delta = double(theta) - double(base); per block of 64: s = the smallest bfloat16 >= max|delta| / qmax,
// code = round-half-even(delta / s) (never beyond qmax, so never clamped). The same arithmetic as
// pymerge/pool/compressed.py's torch reference, bit for bit; the error sums are float64, summed per
// chunk in index order (the same result for any thread count).
inline double load_f64(uintptr_t p, int dt, int64_t i) {
  switch (dt) {
    case F32: return reinterpret_cast<const float*>(p)[i];
    case F16: return f16_to_f32(reinterpret_cast<const uint16_t*>(p)[i]);
    default: return bf16_to_f32(reinterpret_cast<const uint16_t*>(p)[i]);
  }
}

inline uint16_t bf16_ceil(double x) {  // x >= 0, finite
  float f = float(x);
  if (double(f) < x) f = std::nextafter(f, INFINITY);
  const uint32_t b = f32_to_bits(f);
  return uint16_t((b >> 16) + ((b & 0xffffu) != 0));
}

py::tuple delta_quantize(uintptr_t theta, int theta_dt, uintptr_t base, int base_dt, int64_t numel, int bits,
                         uintptr_t codes, uintptr_t scales, int num_threads) {
  if (bits != 8 && bits != 4) throw std::invalid_argument("delta_quantize: bits must be 8 or 4");
  for (int dt : {theta_dt, base_dt})
    if (dt != F32 && dt != F16 && dt != BF16) throw std::invalid_argument("delta_quantize: bad dtype code");
  const double qmax = bits == 8 ? 127 : 7;
  const int64_t n_blocks = (numel + kQBlock - 1) / kQBlock;
  constexpr int64_t kGrain = 1024;  // blocks per chunk
  const int64_t n_chunks = (n_blocks + kGrain - 1) / kGrain;
  std::vector<double> err(n_chunks, 0.0), norm(n_chunks, 0.0);
  std::vector<int64_t> bad(n_chunks, -1);
  {
    py::gil_scoped_release release;
    parallel_for(n_chunks, 1, num_threads > 0 ? num_threads : default_threads(), [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        double e2 = 0, n2 = 0;
        for (int64_t b = c * kGrain; b < std::min(n_blocks, (c + 1) * kGrain) && bad[c] < 0; ++b) {
          double d[kQBlock] = {0};
          double amax = 0;
          const int64_t e0 = b * kQBlock, len = std::min(kQBlock, numel - e0);
          for (int64_t j = 0; j < len; ++j) {
            d[j] = load_f64(theta, theta_dt, e0 + j) - load_f64(base, base_dt, e0 + j);
            if (!(std::fabs(d[j]) <= double(FLT_MAX))) { bad[c] = e0 + j; break; }
            amax = std::max(amax, std::fabs(d[j]));
          }
          if (bad[c] >= 0) break;
          const uint16_t sb = bf16_ceil(amax / qmax);
          reinterpret_cast<uint16_t*>(scales)[b] = sb;
          const double s = bf16_to_f32(sb), div = s > 0 ? s : 1.0;
          int8_t q[kQBlock];
          for (int64_t j = 0; j < kQBlock; ++j) {
            q[j] = int8_t(std::min(qmax, std::max(-qmax, std::nearbyint(d[j] / div))));
            const double r = q[j] * s - d[j];
            e2 += r * r;
            n2 += d[j] * d[j];
          }
          if (bits == 8) {
            std::memcpy(reinterpret_cast<int8_t*>(codes) + e0, q, kQBlock);
          } else {  // bytes 4i + 2 * half and 4i + 2 * half + 1 of the group: nibbles 4 * half .. + 3
            uint8_t* p = reinterpret_cast<uint8_t*>(codes) + e0 / kGroup * 64 + 2 * (e0 % kGroup != 0);
            for (int i = 0; i < 16; ++i) {
              p[4 * i] = uint8_t((q[i] + 8) | ((q[16 + i] + 8) << 4));
              p[4 * i + 1] = uint8_t((q[32 + i] + 8) | ((q[48 + i] + 8) << 4));
              if (b == n_blocks - 1 && b % 2 == 0) p[4 * i + 2] = p[4 * i + 3] = 0x88;  // padding: code 0
            }
          }
        }
        err[c] = e2;
        norm[c] = n2;
      }
    });
  }
  double e2 = 0, n2 = 0;
  for (int64_t c = 0; c < n_chunks; ++c) {
    if (bad[c] >= 0) return py::make_tuple(0.0, 0.0, bad[c]);
    e2 += err[c];
    n2 += norm[c];
  }
  return py::make_tuple(e2, n2, int64_t(-1));
}

void register_delta_decode(py::module_& m) {
  m.def("delta_quantize", &delta_quantize, py::arg("theta"), py::arg("theta_dtype"), py::arg("base"),
        py::arg("base_dtype"), py::arg("numel"), py::arg("bits"), py::arg("codes"), py::arg("scales"),
        py::arg("num_threads") = 0,
        "Quantizes theta - base into int8/int4 codes + bfloat16 scales per 64 elements (raw pointers; int4 "
        "codes padded to whole groups of 128, int8 codes and scales to whole blocks); returns (sum squared error, sum squared delta, first non-finite "
        "element or -1).");
  m.def("delta_accumulate", &delta_accumulate, py::arg("data_ptrs"), py::arg("scale_ptrs"), py::arg("kinds"),
        py::arg("numel"), py::arg("weights"), py::arg("out_ptrs"), py::arg("out_dtypes"), py::arg("num_threads") = 0,
        py::arg("group_strides") = std::vector<int64_t>{}, py::call_guard<py::gil_scoped_release>(),
        "out_k = sum_t weights[k*T+t] * decode(term_t): dense (dtype codes 0-2), int8 (16) or int4 (17) "
        "terms with bfloat16 scales per 64 elements, then paired int4 terms (18, 19: one buffer, two "
        "checkpoints, summed in int32) last (raw pointers). group_strides (per term, default 64): bytes "
        "from one int4 group of 128 codes to the next, so several checkpoints' codes can be held "
        "block-interleaved in one buffer (one memory stream instead of one per checkpoint).");
  py::class_<DeltaPlan>(m, "DeltaPlan", "A compressed pool's linear merge into one set of targets, run in one call.")
      .def(py::init<const std::vector<std::vector<uintptr_t>>&, const std::vector<std::vector<uintptr_t>>&,
                    const std::vector<std::vector<int>>&, const std::vector<int64_t>&,
                    const std::vector<std::vector<uintptr_t>>&, const std::vector<std::vector<int>>&,
                    const std::vector<std::vector<int64_t>>&>(),
           py::arg("data_ptrs"), py::arg("scale_ptrs"), py::arg("kinds"), py::arg("numels"), py::arg("out_ptrs"),
           py::arg("out_dtypes"), py::arg("group_strides"))
      .def("run", &DeltaPlan::run_array, py::arg("weights"), py::arg("num_threads") = 0,
           "delta_accumulate for every tensor t, its weights [n_out, n_terms] at t's offset of one float32 array.")
      .def_property_readonly("num_tensors", &DeltaPlan::num_tensors)
      .def_property_readonly("num_spans", &DeltaPlan::num_spans)
      .def_property_readonly("num_weights", &DeltaPlan::num_weights);
  m.attr("DELTA_Q8") = int(Q8);
  m.attr("DELTA_Q4") = int(Q4);
  m.attr("DELTA_Q4_PAIR") = py::make_tuple(int(Q4PA), int(Q4PB));
  m.attr("DELTA_MAX_PAIRS") = kMaxPairs;
  m.attr("DELTA_BLOCK") = kQBlock;
}

PYMERGE_REGISTER(register_delta_decode);

}  // namespace
}  // namespace pymerge
