// AVX-512 stores of 16 float32 accumulators as float32, float16 or bfloat16 (one rounding to nearest
// even), shared by the kernels that write outputs: weighted_sum.cpp, delta_decode.cpp.
#pragma once
#include <immintrin.h>
#include "cpu/common.h"

namespace pymerge {

#define PM_AVX512_STORE __attribute__((target("avx512f,avx512bw,avx512vl,fma,f16c")))

// float32 -> bfloat16, round to nearest even, done on integers so denormals are kept
// (VCVTNEPS2BF16 would flush them to zero); NaNs stay quiet NaNs.
PM_AVX512_STORE inline __m256i f32_to_bf16_16(__m512 x) {
  __m512i b = _mm512_castps_si512(x);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(b, 16), _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(r);
}

// 16 values to p in dtype dt (F32, F16 or BF16); stream: non-temporal stores (p 64/32-byte aligned).
PM_AVX512_STORE inline void store16_any(char* p, __m512 x, int dt, bool stream) {
  if (dt == F32) {
    if (stream) _mm512_stream_ps(reinterpret_cast<float*>(p), x);
    else _mm512_storeu_ps(reinterpret_cast<float*>(p), x);
    return;
  }
  __m256i h = dt == F16 ? _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC) : f32_to_bf16_16(x);
  if (stream) _mm256_stream_si256(reinterpret_cast<__m256i*>(p), h);
  else _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
}

}  // namespace pymerge
