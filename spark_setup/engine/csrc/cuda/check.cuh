// cuda/check.cuh: the one CUDA error check of the engine's .cu files (and its benchmark): a failed call becomes
// ds4::Error (DS4_E_BACKEND) naming the call and CUDA's message, which the C ABI turns into an error code +
// last-error string; and the one launch with programmatic dependent launch.
#pragma once
#include <cuda_runtime.h>

#include "common.h"

#define DS4_CUDA_CHECK(expr)                                                                                       \
    do {                                                                                                           \
        cudaError_t err_ = (expr);                                                                                 \
        if (err_ != cudaSuccess) ::ds4::fail(DS4_E_BACKEND, "CUDA error in %s: %s", #expr, cudaGetErrorString(err_)); \
    } while (0)

namespace ds4 {
// Launch with programmatic dependent launch allowed (PDL): the kernel may start while the previous kernel of the
// stream drains; it must call pdl_wait() before touching anything that kernel writes.
template <class... P, class... A>
void launch_pdl(void (*kernel)(P...), int grid, int block, size_t smem, cudaStream_t s, A... args) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3((unsigned)grid);
    cfg.blockDim = dim3((unsigned)block);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = s;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    DS4_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, args...));
}
}  // namespace ds4
