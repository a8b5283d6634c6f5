// quant.h: GGML block formats used by the DS4 files and the kernels over them (CPU here; CUDA twins below).
//
// Matrices are row-major as stored in GGUF: row r (output feature r) is ne0 = n_cols contiguous values,
// row_bytes(type, n_cols) bytes. All functions throw ds4::Error(DS4_E_ARG, ...) on an unsupported type or a
// column count that is not a multiple of the block size.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace ds4 {

// Values per block (1 for F32/F16/BF16/I32); 0 if the type is unknown.
int64_t block_size(int type);
// Bytes per block; 0 if the type is unknown.
size_t type_size(int type);
// Bytes of one row of n_cols values; 0 if the type is unknown or n_cols is not a multiple of block_size.
size_t row_bytes(int type, int64_t n_cols);
// "Q8_0", "IQ2_XXS", ... ("?" if unknown).
const char *type_name(int type);
// True for the types the quant kernels (dequant / matvec) handle: F32 F16 BF16 Q8_0 Q2_K Q4_K IQ2_XXS.
bool kernel_type_supported(int type);

// ---- scalar conversions ----
float fp16_to_fp32(uint16_t h);
uint16_t fp32_to_fp16(float f);  // round to nearest even, inf/nan preserved
inline float bf16_to_fp32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
uint16_t fp32_to_bf16(float f);  // round to nearest even, nan kept quiet

// ---- CPU kernels ----
// Dequantize rows [r0, r1) of the matrix starting at `data` (row 0) into out[(r1-r0) * n_cols].
void cpu_dequant_rows(int type, const void *data, int64_t n_cols, int64_t r0, int64_t r1, float *out);
// y[r] = sum_c W[r, c] * x[c], f32 accumulation. Deterministic for a given n_threads (fixed per-row order);
// n_threads <= 0 means the default (hardware threads, capped at 8). Results do not depend on n_threads.
void cpu_matvec(int type, const void *W, int64_t n_rows, int64_t n_cols, const float *x, float *y,
                int n_threads = 0);
// Y[t][r] = sum_c W[r, c] * X[t][c] for t < n_tok (X is [n_tok x n_cols], Y is [n_tok x n_rows]).
// Each row is dequantized once; every Y[t] equals cpu_matvec(W, X[t]) bit for bit.
void cpu_matmul(int type, const void *W, int64_t n_rows, int64_t n_cols, const float *X, int64_t n_tok, float *Y,
                int n_threads = 0);

}  // namespace ds4

#ifdef DS4_WITH_CUDA
// Same typedef as cuda_runtime_api.h, so host .cpp files need not include CUDA headers.
struct CUstream_st;
typedef struct CUstream_st *cudaStream_t;

namespace ds4 {
// ---- CUDA kernels (device pointers; asynchronous on `stream`; throw ds4::Error(DS4_E_BACKEND) on launch error) --
void cuda_dequant_rows(int type, const void *d_data, int64_t n_cols, int64_t r0, int64_t r1, float *d_out,
                       cudaStream_t stream);
void cuda_matvec(int type, const void *d_W, int64_t n_rows, int64_t n_cols, const float *d_x, float *d_y,
                 cudaStream_t stream);
// Routed-expert matvec in one launch (the MoE decode step): for m < n_mats (1 or 2, e.g. gate and up), e < n_ids,
// r < n_rows: d_y[m][e * n_rows + r] = W_m[d_ids[e]] row r . (d_x + e * x_stride), where expert k of W_m starts at
// d_W[m] + k * expert_stride bytes. x_stride = 0 shares one input (gate/up); x_stride = n_cols gives each expert
// its own input (down). d_ids lives on the device (the router writes it); nullptr stands for the identity, d_ids[e] = e
// (grouped and paired matvecs of plain matrices: no ids to read before the weights).
struct ExpertMatvec {
    const void *W[2] = {nullptr, nullptr};
    float *y[2] = {nullptr, nullptr};
    int n_mats = 1;
    int64_t expert_stride = 0;  // bytes
    int64_t n_rows = 0, n_cols = 0;
    const int32_t *ids = nullptr;  // nullptr: the identity
    int n_ids = 0;
    const float *x = nullptr;
    int64_t x_stride = 0;  // floats
    // The caller's promise that d_ids was complete before the previous launch on the stream began (written by an
    // earlier kernel with a plain, fully ordered launch in between, or by the host): the launch may then read the
    // ids and start streaming the weights before waiting for that previous kernel (v6; x is still read after the
    // wait). The forward pass sets it for the down projections (the router ran before gate+up, and the SwiGLU
    // kernel between gate+up and down is a plain launch) and for its grouped and paired matvecs (ids == nullptr).
    bool ids_settled = false;
};
void cuda_matvec_experts(int type, const ExpertMatvec &p, cudaStream_t stream);
// Batched product of a prefill step on the integer tensor cores ("mm6", cuda/mm6.cuh; v6's weight decode with
// up to 16 tokens per decoded weight tile): Y[m][j * y_ld + r] = W_m(j)[r] . X[xrow(j)][xoff(r) ...] for the token
// slots j < n_tok, rows r < n_rows, m < n_mats. xrow(j) = x_idx ? x_idx[j] : j, a row of X (n_x rows of x_ld
// floats); xoff(r) = (r / rpg) * xgs (grouped products; rpg = n_rows otherwise). Expert mode (off != nullptr):
// slots off[e] .. off[e + 1] - 1 use expert e, which starts at W[m] + e * expert_stride bytes. X is first converted
// into digit planes in `scratch` (cuda_mm6_scratch bytes). Q8_0, Q2_K and IQ2_XXS only; returns false, having
// launched nothing, for a type or a shape or alignment it does not take (the caller then runs its f32 kernel).
struct Mm6Args {
    int type = 0;
    const void *W[2] = {nullptr, nullptr};
    float *Y[2] = {nullptr, nullptr};
    int n_mats = 1;
    int64_t n_rows = 0, n_cols = 0;
    int64_t expert_stride = 0;          // bytes (expert mode)
    const int *off = nullptr;           // expert mode: n_experts + 1 slot offsets (device)
    int n_experts = 0;
    const float *X = nullptr;
    int64_t x_ld = 0, n_x = 0;          // X: n_x rows of x_ld floats
    const int *x_idx = nullptr;         // device; nullptr: slot j reads X row j
    int64_t rpg = 0, xgs = 0;           // grouped rows (rpg = 0: not grouped)
    int n_tok = 0;                      // token slots
    int64_t y_ld = 0;
    void *scratch = nullptr;
    size_t scratch_bytes = 0;
};
size_t cuda_mm6_scratch(int64_t n_x, int64_t x_cols);
bool cuda_mm6(const Mm6Args &a, cudaStream_t stream);
// Kernel version used by cuda_matvec / cuda_matvec_experts for quant types: 0 = per type (v6, the tensor-core
// decode, for Q8_0 / Q2_K / IQ2_XXS, in the first configuration that fits: plain Q8_0 matrices 16 warps per CTA,
// then 4 (v9, where no column split is needed), then 8; expert-row Q8_0 8, then 16; Q2_K and IQ2_XXS 12, 16, then
// 8 (8 is what fits where a CTA's shared memory is ~100 KB); v2 for Q4_K), 1..7 or 9 forces one (1 = warp per row,
// the benchmark's baseline; 6 = v6's 16-warp configuration, 8 warps where it does not fit; 7 = its 8-warp one; 9 =
// its 4-warp one; shapes or types a version does not take fall back to v2). Not thread-safe.
void cuda_set_matvec_version(int v);
// Benchmark diagnosis of v6 only (results are wrong on purpose), bits: 1 = skip the decode, 2 = skip the weight
// loads, 4 = expert ids 0, 1, 2, ... instead of reading them, 8 = skip the x conversion; 0 = normal. bench_matvec
// sets it from DS4_V6_DIAG. Not thread-safe. (The environment variable DS4_V6_KS = 1, 2, 4, 8 or 16, read once,
// forces v6's column split instead of its own choice: diagnosis too; DS4_V6_XF=0 turns off the 2-bit expert launches'
// early x loads, for A/B runs.)
void cuda_set_matvec_diag(int d);
// Host-memory convenience (ds4_matvec with DS4_BACKEND_CUDA): copies W and x to the device, runs cuda_matvec,
// copies y back, synchronizes. Throws ds4::Error(DS4_E_BACKEND) on a CUDA error or when no device is present.
void cuda_matvec_host(int type, const void *W, int64_t n_rows, int64_t n_cols, const float *x, float *y);
// Host-memory convenience for cuda_mm6 (ds4_matmul with DS4_BACKEND_CUDA): the arguments of ds4_matmul.
void cuda_mm6_host(int type, const void *W, int64_t n_experts, int64_t n_rows, int64_t n_cols, const float *X,
                   int64_t n_x, const int32_t *x_idx, const int32_t *off, int64_t n_tok, float *Y);
// Host-memory convenience for cuda_dequant_rows: `data` points at row 0; rows [r0, r1) go to out.
void cuda_dequant_host(int type, const void *data, int64_t n_cols, int64_t r0, int64_t r1, float *out);
}  // namespace ds4
#endif
