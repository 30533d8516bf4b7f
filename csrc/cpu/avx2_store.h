// AVX2 loads of 8 elements of any input dtype as float32, and stores of 8 float32 accumulators as
// float32, float16 or bfloat16 (one rounding to nearest even): the 8-wide twins of avx512_store.h,
// shared by weighted_sum.cpp and delta_decode.cpp.
#pragma once
#include <immintrin.h>
#include "cpu/common.h"

namespace pymerge {

#define PM_AVX2_STORE __attribute__((target("avx2,fma,f16c")))

// 8 elements at p (dtype code dt: float32, float16 or bfloat16) as float32. Loops that never see
// float8 call this one: load8_any's gather branch costs registers, and GCC then keeps accumulators
// in memory (the delta decode's 8).
PM_AVX2_STORE inline __m256 load8_dense(const char* p, int dt) {
  if (dt == F32) return _mm256_loadu_ps(reinterpret_cast<const float*>(p));
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if (dt == F16) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// 8 elements at p (dtype code dt: float32, float16, bfloat16 or a float8 through its table) as float32.
PM_AVX2_STORE inline __m256 load8_any(const char* p, int dt) {
  if (dt <= BF16) return load8_dense(p, dt);
  const __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  return _mm256_i32gather_ps(fp8_table(dt), idx, 4);
}

// bfloat16 bits of x in the low half of each 32-bit lane: round to nearest even on integers, so
// denormals are kept; NaNs stay quiet NaNs (as f32_to_bf16_16).
PM_AVX2_STORE inline __m256i bf16_round_bits_8(__m256 x) {
  const __m256i b = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(0x40)), nan);
}

PM_AVX2_STORE inline __m128i f32_to_bf16_8(__m256 x) {
  // every lane is < 2^16, so the saturating pack is exact; it packs within 128-bit halves
  const __m256i r = bf16_round_bits_8(x);
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08));
}

// 8 values to p in dtype dt (F32, F16 or BF16); stream: non-temporal stores (p 32/16-byte aligned).
PM_AVX2_STORE inline void store8_any(char* p, __m256 x, int dt, bool stream) {
  if (dt == F32) {
    if (stream) _mm256_stream_ps(reinterpret_cast<float*>(p), x);
    else _mm256_storeu_ps(reinterpret_cast<float*>(p), x);
    return;
  }
  const __m128i h = dt == F16 ? _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC) : f32_to_bf16_8(x);
  if (stream) _mm_stream_si128(reinterpret_cast<__m128i*>(p), h);
  else _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
}

}  // namespace pymerge
