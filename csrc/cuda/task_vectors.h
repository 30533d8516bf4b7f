#pragma once
#include <cstdint>
#include <tuple>
#include <vector>

namespace pymerge_cuda {
constexpr int kMaxTvModels = 16;  // models per fused task-vector launch (kernel parameter space)

// One model's sparsifier, the tuple pymerge/ops/task_vector_ops.py::_spec builds:
// (ptr, dtype, mode, t_lo, i_lo, t_hi, i_hi, thr, bits_ptr, scale, weight, model_index)
using TvModelSpec = std::tuple<uintptr_t, int, int, int64_t, int64_t, int64_t, int64_t, uint64_t, uintptr_t, float,
                               float, uint32_t>;

void tv_merge(const std::vector<TvModelSpec>& models, uintptr_t base, int base_dtype, uintptr_t out, int out_dtype,
              int64_t numel, int64_t offset, bool consensus, bool normalize, float lam, float divisor, uint64_t seed,
              uint32_t h0, uint32_t h1, uintptr_t stream);
}  // namespace pymerge_cuda
