#pragma once
#include <cstdint>
#include <vector>

namespace pymerge_cuda {
constexpr int kMaxInputs = 64;   // inputs per launch (kernel parameters); more go through scratch
constexpr int kMaxOutputs = 8;   // outputs per launch; callers split larger populations

void weighted_sum_many(const std::vector<uintptr_t>& in_ptrs, const std::vector<int>& in_dtypes, int64_t numel,
                       const std::vector<float>& weights, const std::vector<uintptr_t>& out_ptrs,
                       const std::vector<int>& out_dtypes, uintptr_t scratch, uintptr_t stream,
                       uintptr_t weights_dev = 0);
}  // namespace pymerge_cuda
