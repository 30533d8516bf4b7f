// The pymerge._cuda module: host wrappers for the CUDA kernels (static CUDA runtime, no libtorch).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <cuda_runtime.h>
#include "export_codes.h"
#include "cuda/delta_decode.h"
#include "cuda/task_vectors.h"
#include "cuda/weighted_sum.h"

namespace py = pybind11;

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "pymerge CUDA kernels";
  pymerge_codes::export_codes(m);
  m.attr("MAX_INPUTS") = pymerge_cuda::kMaxInputs;
  m.attr("MAX_OUTPUTS") = pymerge_cuda::kMaxOutputs;
  m.def("scratch_stride", &pymerge_cuda::scratch_stride, "floats per scratch row for numel elements");
  m.def("device_count", [] { int n = 0; return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0; });
  m.def("weighted_sum_many", &pymerge_cuda::weighted_sum_many, py::arg("in_ptrs"), py::arg("in_dtypes"),
        py::arg("numel"), py::arg("weights"), py::arg("out_ptrs"), py::arg("out_dtypes"), py::arg("scratch"),
        py::arg("stream"), py::arg("weights_dev") = 0, py::arg("delta") = false,
        py::call_guard<py::gil_scoped_release>());
  m.def("delta_accumulate", &pymerge_cuda::delta_accumulate, py::arg("data_table"), py::arg("scale_table"),
        py::arg("kind_table"), py::arg("weights"), py::arg("n_terms"), py::arg("numel"), py::arg("out_ptrs"),
        py::arg("out_dtypes"), py::arg("aligned"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "out_k = sum_t weights[k, t] * decode(term_t) for compressed pools: device tables of term addresses "
        "(int64), scale addresses (int64), kinds (int32) and float32 weights [K, T]; the C++ kernel's bits.");
  m.attr("MAX_TV_MODELS") = pymerge_cuda::kMaxTvModels;
  m.def("tv_merge", &pymerge_cuda::tv_merge, py::arg("models"), py::arg("base"), py::arg("base_dtype"), py::arg("out"),
        py::arg("out_dtype"), py::arg("numel"), py::arg("offset"), py::arg("consensus"), py::arg("normalize"),
        py::arg("lam"), py::arg("divisor"), py::arg("seed"), py::arg("h0"), py::arg("h1"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>());
}
