#pragma once
#include <cstdint>
#include <vector>

namespace pymerge_cuda {
constexpr int kMaxInputs = 64;   // inputs per launch (kernel parameters); more go through scratch
constexpr int kMaxOutputs = 4;   // outputs per launch (more would spill past 128 registers); callers split larger populations

// Floats per row of the scratch buffer (more than kMaxInputs inputs): numel rounded up to a
// multiple of 8 so every row starts 16-byte aligned. Callers allocate K * scratch_stride(numel).
inline int64_t scratch_stride(int64_t numel) { return (numel + 7) / 8 * 8; }

void weighted_sum_many(const std::vector<uintptr_t>& in_ptrs, const std::vector<int>& in_dtypes, int64_t numel,
                       const std::vector<float>& weights, const std::vector<uintptr_t>& out_ptrs,
                       const std::vector<int>& out_dtypes, uintptr_t scratch, uintptr_t stream,
                       uintptr_t weights_dev = 0, bool delta = false);
}  // namespace pymerge_cuda
