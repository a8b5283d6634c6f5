// model_cuda.h: the CUDA backend of the DS4 forward pass (csrc/cuda/forward.cu), as called by api_model.cpp.
//
// A CudaModel is a device copy of the GGUF data section (weights stay in their GGUF quant formats and are read
// in place by the kernels of cuda/quant.cu) bound to the host-side ds4::Model (hyper-parameters, tensor table).
// A CudaSession holds the per-session state of ds4-model-facts.md D ("KV state per layer") in device memory and
// runs one token per step: a fixed sequence of kernel launches whose variable lengths come from a device-side
// step record (token, position), captured once per step shape into a CUDA graph and replayed.
// Everything here throws ds4::Error (DS4_E_BACKEND for CUDA failures, DS4_E_NOMEM when the GPU is too small).
#pragma once

#ifdef DS4_WITH_CUDA

#include <cstdint>
#include <memory>

namespace ds4 {

struct Model;
class CudaModel;
class CudaSession;

struct CudaModelDeleter {
    void operator()(CudaModel *m) const;
};
struct CudaSessionDeleter {
    void operator()(CudaSession *s) const;
};
using CudaModelPtr = std::unique_ptr<CudaModel, CudaModelDeleter>;
using CudaSessionPtr = std::unique_ptr<CudaSession, CudaSessionDeleter>;

// Upload the weights of `m` (which must outlive the result) to the current CUDA device. Checks free device memory
// first and fails with "needs X GiB, Y GiB free".
CudaModelPtr cuda_model_load(const Model &m);
// Seconds and bytes of the weight upload (for benchmarks).
double cuda_model_load_seconds(const CudaModel &m);
uint64_t cuda_model_device_bytes(const CudaModel &m);

CudaSessionPtr cuda_session_new(CudaModel &m, int max_ctx, bool roundtrip);
// Same contract as ds4::Session::eval / truncate (model.h).
void cuda_session_eval(CudaSession &s, const int32_t *toks, int n, bool all_logits, float *logits);
void cuda_session_truncate(CudaSession &s, int n);
int cuda_session_pos(const CudaSession &s);
uint64_t cuda_session_bytes(const CudaSession &s);

}  // namespace ds4

#endif  // DS4_WITH_CUDA
