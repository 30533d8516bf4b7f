// Element loads shared by the CUDA kernels; the dtype codes come from csrc/codes.h.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cstdint>
#include "codes.h"

namespace pymerge_cuda {

using namespace pymerge_codes;  // dtype codes and sparsifier modes

// Element i of a tensor of dtype code dt, as float32.
__device__ __forceinline__ float load_f32(const void* p, int64_t i, int dt) {
  switch (dt) {
    case F32: return static_cast<const float*>(p)[i];
    case F16: return __half2float(static_cast<const __half*>(p)[i]);
    case BF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    case F8E4M3FN: return float(__half(__nv_cvt_fp8_to_halfraw(static_cast<const __nv_fp8_storage_t*>(p)[i], __NV_E4M3)));
    default: return float(__half(__nv_cvt_fp8_to_halfraw(static_cast<const __nv_fp8_storage_t*>(p)[i], __NV_E5M2)));
  }
}

}  // namespace pymerge_cuda
