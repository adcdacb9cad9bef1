// Checked CUDA runtime calls: CUDA_CHECK(call) throws braid::Error("file:line: call: message").
#pragma once

#include <cuda_runtime.h>

#include "runtime/check.h"

#define CUDA_CHECK(call)                                             \
  do {                                                               \
    const cudaError_t braid_cuda_status_ = (call);                   \
    if (braid_cuda_status_ != cudaSuccess)                           \
      ::braid::detail::fail(__FILE__, __LINE__, #call, ": ",         \
                            cudaGetErrorString(braid_cuda_status_)); \
  } while (0)
