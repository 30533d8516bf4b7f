// Grouped weighted sums: every tensor of a model, for every candidate, in one native call.
//
// A model of many small tensors merged one call per tensor pays a call, a thread wake-up and a
// short single-threaded loop per tensor, and reaches a fraction of copy bandwidth. A GroupedPlan
// holds the task table of a whole merge (per tensor: N input pointers and dtype codes, numel,
// K output pointers and dtype codes, its weight group), built once; run() splits it into spans
// of about equal bytes and hands them to the thread pool. Weights are a float32 [G, K, N] array.
#include <pybind11/numpy.h>
#include <pybind11/stl.h>
#include <algorithm>
#include <stdexcept>
#include <string>
#include "cpu/weighted_sum.h"

namespace py = pybind11;

namespace pymerge {
namespace {

constexpr int64_t kSpanBytes = 1 << 20;     // bytes read + written per span claimed by a thread
constexpr int64_t kMaxSpanElems = 1 << 16;  // elements: a big tensor is cut into spans of at most this

class GroupedPlan {
 public:
  GroupedPlan(const std::vector<std::vector<uintptr_t>>& in_ptrs, const std::vector<std::vector<int>>& in_dtypes,
              const std::vector<int64_t>& numels, const std::vector<std::vector<uintptr_t>>& out_ptrs,
              const std::vector<std::vector<int>>& out_dtypes, const std::vector<int>& groups, int64_t n_groups,
              bool delta)
      : n_groups_(n_groups), delta_(delta) {
    const size_t t_count = numels.size();
    if (in_ptrs.size() != t_count || in_dtypes.size() != t_count || out_ptrs.size() != t_count ||
        out_dtypes.size() != t_count || groups.size() != t_count)
      throw std::invalid_argument("grouped plan: one entry per tensor in every table");
    if (t_count == 0) throw std::invalid_argument("grouped plan: no tensors");
    n_in_ = int64_t(in_ptrs[0].size());
    n_out_ = int64_t(out_ptrs[0].size());
    if (n_in_ == 0 || n_out_ == 0) throw std::invalid_argument("grouped plan: need at least one input and one output");
    if (n_groups < 1) throw std::invalid_argument("grouped plan: need at least one weight group");
    int64_t out_bytes = 0;
    for (size_t t = 0; t < t_count; ++t) {
      const std::string where = "grouped plan: tensor " + std::to_string(t);
      if (int64_t(in_ptrs[t].size()) != n_in_ || int64_t(in_dtypes[t].size()) != n_in_ ||
          int64_t(out_ptrs[t].size()) != n_out_ || int64_t(out_dtypes[t].size()) != n_out_)
        throw std::invalid_argument(where + ": every tensor needs the same number of inputs and outputs");
      if (groups[t] < 0 || groups[t] >= n_groups) throw std::invalid_argument(where + ": weight group out of range");
      if (numels[t] < 0) throw std::invalid_argument(where + ": negative numel");
      ws::check_codes(in_dtypes[t], out_dtypes[t]);
      in_.insert(in_.end(), in_ptrs[t].begin(), in_ptrs[t].end());
      streams_.push_back(ws::distinct_inputs(in_ptrs[t].data(), n_in_));
      in_dt_.insert(in_dt_.end(), in_dtypes[t].begin(), in_dtypes[t].end());
      out_.insert(out_.end(), out_ptrs[t].begin(), out_ptrs[t].end());
      out_dt_.insert(out_dt_.end(), out_dtypes[t].begin(), out_dtypes[t].end());
      for (int dt : out_dtypes[t]) out_bytes += numels[t] * int64_t(dtype_size(dt));
    }
    numel_ = numels;
    group_ = groups;
    stream_ = out_bytes >= ws::kStreamBytes;  // the outputs of one call evict each other from cache anyway
    make_spans();
  }

  // Runs the whole merge; weights: float32 [G, K, N], C order.
  void run(py::array_t<float, py::array::c_style | py::array::forcecast> weights, int num_threads) {
    if (weights.size() != n_groups_ * n_out_ * n_in_)
      throw std::invalid_argument("grouped plan: weights must have " + std::to_string(n_groups_) + " x " +
                                  std::to_string(n_out_) + " x " + std::to_string(n_in_) + " entries, got " +
                                  std::to_string(weights.size()));
    const float* w = weights.data();
    py::gil_scoped_release nogil;
    const int64_t wanted = num_threads > 0 ? num_threads : default_threads();
    const int threads = int(std::max<int64_t>(1, std::min(wanted, (total_elems_ + ws::kMinPerThread - 1) / ws::kMinPerThread)));
    parallel_for(int64_t(spans_.size()), 1, threads, [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s) {
        const Span& sp = spans_[size_t(s)];
        for (int64_t p = sp.first; p < sp.last; ++p) run_piece(pieces_[size_t(p)], w);
        if (stream_) ws::fence();  // once per span, not per piece: a fence waits for every pending store
      }
    });
  }

  int64_t num_tensors() const { return int64_t(numel_.size()); }
  int64_t num_spans() const { return int64_t(spans_.size()); }

 private:
  struct Piece { int64_t tensor, start, end; };
  struct Span { int64_t first, last; };  // pieces [first, last)

  void run_piece(const Piece& pc, const float* w) const {
    const size_t t = size_t(pc.tensor);
    const ws::Job J{in_.data() + t * n_in_, in_dt_.data() + t * n_in_, n_in_, w + group_[t] * n_out_ * n_in_,
                    out_.data() + t * n_out_, out_dt_.data() + t * n_out_, n_out_, stream_, streams_[t], delta_};
    ws::run_range(J, pc.start, pc.end, false);
  }

  // Tensors cut into pieces of at most kMaxSpanElems (block-aligned), pieces packed in order into
  // spans of about kSpanBytes: a span is a few big pieces or many small tensors.
  void make_spans() {
    int64_t span_bytes = 0, first = 0;
    total_elems_ = 0;
    for (size_t t = 0; t < numel_.size(); ++t) {
      int64_t bytes_per_elem = 0;
      for (int64_t i = 0; i < n_in_; ++i) bytes_per_elem += int64_t(dtype_size(in_dt_[t * n_in_ + i]));
      for (int64_t k = 0; k < n_out_; ++k) bytes_per_elem += int64_t(dtype_size(out_dt_[t * n_out_ + k]));
      total_elems_ += numel_[t];
      for (int64_t s = 0; s < numel_[t]; s += kMaxSpanElems) {
        const int64_t e = std::min(numel_[t], s + kMaxSpanElems);
        pieces_.push_back({int64_t(t), s, e});
        span_bytes += (e - s) * bytes_per_elem;
        if (span_bytes >= kSpanBytes) {
          spans_.push_back({first, int64_t(pieces_.size())});
          first = int64_t(pieces_.size());
          span_bytes = 0;
        }
      }
    }
    if (first < int64_t(pieces_.size())) spans_.push_back({first, int64_t(pieces_.size())});
  }

  int64_t n_in_ = 0, n_out_ = 0, n_groups_ = 1, total_elems_ = 0;
  bool stream_ = false, delta_ = false;  // delta: ws::Job::delta for every tensor (input 0 its base)
  std::vector<uintptr_t> in_, out_;
  std::vector<int> in_dt_, out_dt_, group_;
  std::vector<int64_t> numel_, streams_;  // streams_: distinct inputs of each tensor (ws::Job::streams)
  std::vector<Piece> pieces_;
  std::vector<Span> spans_;
};

void register_grouped(py::module_& m) {
  py::class_<GroupedPlan>(m, "GroupedPlan", "Task table of a whole weighted-sum merge, run in one call.")
      .def(py::init<const std::vector<std::vector<uintptr_t>>&, const std::vector<std::vector<int>>&,
                    const std::vector<int64_t>&, const std::vector<std::vector<uintptr_t>>&,
                    const std::vector<std::vector<int>>&, const std::vector<int>&, int64_t, bool>(),
           py::arg("in_ptrs"), py::arg("in_dtypes"), py::arg("numels"), py::arg("out_ptrs"), py::arg("out_dtypes"),
           py::arg("groups"), py::arg("n_groups"), py::arg("delta") = false)
      .def("run", &GroupedPlan::run, py::arg("weights"), py::arg("num_threads") = 0,
           "out[t][k] = sum_i weights[group[t], k, i] * in[t][i] for every tensor t (float32 [G, K, N] weights).")
      .def_property_readonly("num_tensors", &GroupedPlan::num_tensors)
      .def_property_readonly("num_spans", &GroupedPlan::num_spans);
}

PYMERGE_REGISTER(register_grouped);

}  // namespace
}  // namespace pymerge
