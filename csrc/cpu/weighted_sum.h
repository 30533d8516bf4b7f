// The weighted-sum kernel as a building block: weighted_sum.cpp runs it over one tensor,
// grouped.cpp over every tensor of a model in one call.
#pragma once
#include <cstdint>
#include <vector>
#include "cpu/common.h"

namespace pymerge {
namespace ws {

constexpr int64_t kBlock = 4096;                // floats per accumulator block: 16 KiB, stays in L1
constexpr int64_t kMinPerThread = int64_t(1) << 18;  // elements: below this a second thread costs more than it gives
constexpr int64_t kStreamBytes = 8 << 20;       // outputs above this skip the cache

// N inputs, K outputs, weights w[k * N + i]. With delta, input 0 is a base B that every later input is
// taken relative to: out_k = w[k,0] * B + sum_{i>=1} w[k,i] * (x_i - B), each x_i - B formed in float32
// (task_arithmetic as mergekit computes it: from bfloat16 checkpoints the differences are exact, and a
// result on a bfloat16 halfway point rounds as the exact one does).
struct Job {
  const uintptr_t* in;
  const int* in_dt;
  int64_t n_in;
  const float* w;
  const uintptr_t* out;
  const int* out_dt;
  int64_t n_out;
  bool stream;  // non-temporal stores: outputs too big to stay in cache anyway
  // Distinct input addresses (0: n_in): memory streams, which decide a sweep in passes (a caller may list one
  // tensor twice, the second read coming from cache: 9 inputs, 8 streams).
  int64_t streams = 0;
  bool delta = false;
};

// How many of in[0, n) differ (n where n is small enough that it cannot matter).
int64_t distinct_inputs(const uintptr_t* in, int64_t n);

// Elements [start, end) of every output of J, on the calling thread. With fence (the default), this
// thread's streaming stores are made visible before it returns; a caller running many short ranges
// (grouped.cpp) passes false and calls fence() once after the last.
void run_range(const Job& J, int64_t start, int64_t end, bool fence = true);
void fence();

// Throws std::invalid_argument for a code no kernel reads (or, for outputs, writes).
void check_codes(const std::vector<int>& in_dtypes, const std::vector<int>& out_dtypes);

}  // namespace ws
}  // namespace pymerge
