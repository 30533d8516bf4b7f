// The codes shared by the native kernels and Python, defined once: dtype codes and sparsifier
// modes. Both extensions export them (DTYPE_CODES, SPARSIFIER_MODES) and pymerge/_native.py
// checks at import that its own names map to the same numbers. Plain C++ (also read by nvcc).
#pragma once

namespace pymerge_codes {

// Element types the kernels read; outputs are F32, F16 or BF16 (kMaxOutputDType).
enum DType : int { F32 = 0, F16 = 1, BF16 = 2, F8E4M3FN = 3, F8E5M2 = 4 };
constexpr int kMaxOutputDType = BF16;
constexpr int kMaxInputDType = F8E5M2;

// Per-model sparsifier of the task-vector pass (see csrc/cpu/task_vectors.cpp).
enum Mode : int { NONE = 0, TOPK = 1, RANGE = 2, RANDOM = 3, BITS = 4, ZERO = 5 };

struct Named { const char* name; int code; };
constexpr Named kDTypeNames[] = {{"float32", F32}, {"float16", F16}, {"bfloat16", BF16},
                                 {"float8_e4m3fn", F8E4M3FN}, {"float8_e5m2", F8E5M2}};
constexpr Named kModeNames[] = {{"none", NONE}, {"topk", TOPK}, {"range", RANGE},
                                {"random", RANDOM}, {"bits", BITS}, {"zero", ZERO}};

}  // namespace pymerge_codes
