#pragma once
#include <cstdint>
#include <vector>

namespace pymerge_cuda {
// out_k = sum_t w[k, t] * decode(term_t) for delta-compressed pools (csrc/cuda/delta_decode.cu).
void delta_accumulate(uintptr_t data_table, uintptr_t scale_table, uintptr_t kind_table, uintptr_t weights,
                      int64_t n_terms, int64_t numel, const std::vector<uintptr_t>& out_ptrs,
                      const std::vector<int>& out_dtypes, bool aligned, uintptr_t stream);
}  // namespace pymerge_cuda
