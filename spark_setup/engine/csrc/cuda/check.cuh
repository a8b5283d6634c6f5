// cuda/check.cuh: the one CUDA error check of the engine's .cu files: a failed call becomes ds4::Error
// (DS4_E_BACKEND) naming the call and CUDA's message, which the C ABI turns into an error code + last-error string.
#pragma once
#include <cuda_runtime.h>

#include "common.h"

#define DS4_CUDA_CHECK(expr)                                                                                       \
    do {                                                                                                           \
        cudaError_t err_ = (expr);                                                                                 \
        if (err_ != cudaSuccess) ::ds4::fail(DS4_E_BACKEND, "CUDA error in %s: %s", #expr, cudaGetErrorString(err_)); \
    } while (0)
