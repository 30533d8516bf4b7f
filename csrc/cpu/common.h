// Shared pieces of pymerge's CPU extension: scalar conversions, the thread pool, the op registry.
#pragma once
#include <pybind11/pybind11.h>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>
#include "codes.h"

namespace pymerge {

using namespace pymerge_codes;  // dtype codes and sparsifier modes (csrc/codes.h)

inline float bits_to_f32(uint32_t b) { float f; std::memcpy(&f, &b, 4); return f; }
inline uint32_t f32_to_bits(float f) { uint32_t b; std::memcpy(&b, &f, 4); return b; }

inline float bf16_to_f32(uint16_t h) { return bits_to_f32(uint32_t(h) << 16); }

// Round to nearest even; NaN stays NaN (quieted), inf stays inf.
inline uint16_t f32_to_bf16(float f) {
  uint32_t b = f32_to_bits(f);
  if ((b & 0x7fffffffu) > 0x7f800000u) return uint16_t((b >> 16) | 0x40u);
  return uint16_t((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

inline float f16_to_f32(uint16_t h) { _Float16 v; std::memcpy(&v, &h, 2); return float(v); }
inline uint16_t f32_to_f16(float f) { _Float16 v = (_Float16)f; uint16_t h; std::memcpy(&h, &v, 2); return h; }

// float8 decoding tables, filled when the module loads (module.cpp). Inline, not a call: a call inside
// a kernel's loop makes GCC keep its vector accumulators in memory (no ymm/zmm register survives a call).
extern float g_fp8_e4m3fn[256], g_fp8_e5m2[256];
inline const float* fp8_table(int dtype) { return dtype == F8E4M3FN ? g_fp8_e4m3fn : g_fp8_e5m2; }

inline size_t dtype_size(int dt) { return dt == F32 ? 4 : (dt == F16 || dt == BF16) ? 2 : 1; }

// Ops register themselves: each .cpp holds one op and a PYMERGE_REGISTER line, module.cpp calls them all.
using Registrar = void (*)(pybind11::module_&);
std::vector<Registrar>& registrars();
struct AutoRegister {
  explicit AutoRegister(Registrar r) { registrars().push_back(r); }
};

// Runs fn(begin, end) over [0, n) in chunks of `grain` on up to `threads` threads (0: all
// cores), the caller included; returns when every chunk is done. See parallel.cpp for why this
// is not OpenMP.
using ChunkFn = std::function<void(int64_t, int64_t)>;
void parallel_for(int64_t n, int64_t grain, int threads, const ChunkFn& fn);
int default_threads();

// Which SIMD path this CPU takes ("avx512", "avx2" or "scalar"); PYMERGE_SIMD overrides it.
const char* simd_level();

}  // namespace pymerge

#define PYMERGE_REGISTER(fn) static ::pymerge::AutoRegister pymerge_autoreg_##fn(fn)
