// The pymerge._cpu module: collects every op registered with PYMERGE_REGISTER.
#include <cmath>
#include <cstdlib>
#include <cstring>
#include "cpu/common.h"
#include "export_codes.h"

namespace pymerge {

std::vector<Registrar>& registrars() {
  static std::vector<Registrar> r;
  return r;
}

static float decode_e4m3fn(uint8_t v) {
  int s = v >> 7, e = (v >> 3) & 0xf, m = v & 7;
  if (e == 0xf && m == 7) return std::nanf("");
  float x = e == 0 ? std::ldexp(float(m), -9) : std::ldexp(1.0f + m / 8.0f, e - 7);
  return s ? -x : x;
}

static float decode_e5m2(uint8_t v) {
  int s = v >> 7, e = (v >> 2) & 0x1f, m = v & 3;
  float x;
  if (e == 0x1f) x = m ? std::nanf("") : INFINITY;
  else x = e == 0 ? std::ldexp(float(m), -16) : std::ldexp(1.0f + m / 4.0f, e - 15);
  return s ? -x : x;
}

float g_fp8_e4m3fn[256], g_fp8_e5m2[256];
static const bool g_fp8_filled = [] {  // at load time, before Python can call any kernel
  for (int i = 0; i < 256; ++i) {
    g_fp8_e4m3fn[i] = decode_e4m3fn(uint8_t(i));
    g_fp8_e5m2[i] = decode_e5m2(uint8_t(i));
  }
  return true;
}();

const char* simd_level() {
  const char* force = std::getenv("PYMERGE_SIMD");
  __builtin_cpu_init();
  // Every feature the builds are compiled for (PM_AVX512 / PM_AVX2 in tv_common.h): a VM may hide
  // one (BMI2, say) while showing the rest, and the compiler uses it freely inside those builds.
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (force) {
    if (!std::strcmp(force, "scalar")) return "scalar";
    if (!std::strcmp(force, "avx2") && avx2) return "avx2";
  }
  return avx512 ? "avx512" : avx2 ? "avx2" : "scalar";
}

}  // namespace pymerge

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "pymerge CPU kernels (C++17, own thread pool, AVX-512/AVX2 chosen at run time)";
  pymerge_codes::export_codes(m);
  m.def("simd_level", [] { return std::string(pymerge::simd_level()); });
  m.def("max_threads", &pymerge::default_threads, "threads a kernel uses by default (OMP_NUM_THREADS, else the cores this process may use)");
  for (auto r : pymerge::registrars()) r(m);
}
