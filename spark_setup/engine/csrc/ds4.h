/* ds4.h: the C ABI of the bundled DeepSeek-V4-Flash engine (libds4engine.so).
 *
 * Loaded from Python with ctypes (spark_setup/engine/runtime.py). Rules for every function:
 *  - returns DS4_OK (0) or a negative DS4_E* code; on failure ds4_last_error() holds a one-line message
 *    (thread-local, valid until the next failing call on the same thread);
 *  - never aborts the process, never prints, never throws across the boundary;
 *  - pointers named *_out are written only on success.
 */
#ifndef DS4_H
#define DS4_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define DS4_ABI_VERSION 1

enum ds4_status {
    DS4_OK = 0,
    DS4_E_ARG = -1,        /* bad argument (null pointer, out of range, unknown type) */
    DS4_E_IO = -2,         /* open/stat/mmap failed */
    DS4_E_FORMAT = -3,     /* malformed or truncated GGUF, out-of-bounds offset, unknown type */
    DS4_E_MODEL = -4,      /* file is valid GGUF but not a loadable DS4 model (missing key/tensor, shape, type) */
    DS4_E_NOMEM = -5,      /* allocation failed */
    DS4_E_BACKEND = -6,    /* backend unavailable (e.g. CUDA not compiled in / no device) or a CUDA error */
    DS4_E_STATE = -7,      /* call not valid in this state (context full, bad truncate length) */
};

enum ds4_backend { DS4_BACKEND_CPU = 0, DS4_BACKEND_CUDA = 1 };

/* GGML tensor type ids used by the DS4 files (gguf constants). */
enum ds4_type {
    DS4_TYPE_F32 = 0, DS4_TYPE_F16 = 1, DS4_TYPE_Q8_0 = 8, DS4_TYPE_Q2_K = 10, DS4_TYPE_Q4_K = 12,
    DS4_TYPE_IQ2_XXS = 16, DS4_TYPE_I32 = 26, DS4_TYPE_BF16 = 30,
};

/* ---- library ---------------------------------------------------------------------------------- */
int ds4_abi_version(void);
const char *ds4_version_string(void);     /* e.g. "0.1.0 (cpu+cuda sm_90)" */
int ds4_has_cuda(void);                   /* 1 if the CUDA backend was compiled in */
const char *ds4_last_error(void);         /* "" when none */

/* ---- GGUF ------------------------------------------------------------------------------------- */
typedef struct ds4_gguf ds4_gguf;

typedef struct ds4_tensor_info {
    const char *name;      /* owned by the ds4_gguf */
    int32_t type;          /* ds4_type */
    int32_t n_dims;
    int64_t ne[4];         /* innermost first; unused dims = 1 */
    uint64_t offset;       /* absolute offset in the file */
    uint64_t nbytes;
} ds4_tensor_info;

int ds4_gguf_open(const char *path, ds4_gguf **out);     /* mmap + full validation of header/kv/tensor table */
void ds4_gguf_close(ds4_gguf *g);
int64_t ds4_gguf_n_tensors(const ds4_gguf *g);
int64_t ds4_gguf_n_kv(const ds4_gguf *g);
uint32_t ds4_gguf_alignment(const ds4_gguf *g);
uint64_t ds4_gguf_data_offset(const ds4_gguf *g);
int ds4_gguf_tensor_at(const ds4_gguf *g, int64_t index, ds4_tensor_info *out);
int ds4_gguf_find_tensor(const ds4_gguf *g, const char *name, ds4_tensor_info *out);  /* DS4_E_ARG if absent */
const void *ds4_gguf_tensor_data(const ds4_gguf *g, const ds4_tensor_info *t);         /* into the mmap */

/* ---- quant kernels (tests, benchmarks) -------------------------------------------------------- */
/* Bytes of one row of n_cols values of `type` (n_cols must be a multiple of the block size). 0 if invalid. */
size_t ds4_row_bytes(int type, int64_t n_cols);
/* Dequantize rows [row_begin, row_end) of a row-major [n_rows x n_cols] matrix into out (f32, row-major). */
int ds4_dequantize(int type, const void *data, int64_t n_rows, int64_t n_cols,
                   int64_t row_begin, int64_t row_end, float *out);
/* Same on a backend: DS4_BACKEND_CPU is ds4_dequantize; DS4_BACKEND_CUDA copies the rows to the device, runs the
 * CUDA dequantizer and copies the result back (both agree with the gguf reference to the bit). */
int ds4_dequantize_backend(int backend, int type, const void *data, int64_t n_rows, int64_t n_cols,
                           int64_t row_begin, int64_t row_end, float *out);
/* y[r] = sum_c W[r,c] * x[c] with f32 accumulation. Host pointers; with DS4_BACKEND_CUDA the library copies
 * to the device, runs the CUDA kernel and copies back (timing-free correctness entry point). */
int ds4_matvec(int backend, int type, const void *W, int64_t n_rows, int64_t n_cols, const float *x, float *y);
/* The batched product of a prefill step (tests): Y[j * n_rows + r] = W_e[r] . X[x_idx[j]] for slots j < n_tok,
 * where W holds n_experts [n_rows x n_cols] matrices back to back and slot j uses expert e with
 * off[e] <= j < off[e + 1] (off NULL: n_experts must be 1); x_idx NULL reads X row j (X has n_x rows). Host
 * pointers. DS4_BACKEND_CPU: one ds4_matvec per slot; DS4_BACKEND_CUDA: the tensor-core kernel of the prefill step
 * (Q8_0, Q2_K, IQ2_XXS with 16-byte rows; DS4_E_ARG for other types and shapes). */
int ds4_matmul(int backend, int type, const void *W, int64_t n_experts, int64_t n_rows, int64_t n_cols,
               const float *X, int64_t n_x, const int32_t *x_idx, const int32_t *off, int64_t n_tok, float *Y);

/* ---- model and sessions ----------------------------------------------------------------------- */
typedef struct ds4_model ds4_model;
typedef struct ds4_session ds4_session;

typedef struct ds4_model_desc {
    int32_t n_layer, n_embd, n_vocab, n_head, head_dim, n_rot, q_lora_rank, o_groups, o_lora_rank;
    int32_t n_expert, n_expert_used, n_expert_shared, n_ff_exp, n_hash_layers, sliding_window;
    int32_t idx_heads, idx_dim, idx_topk, hc_mult, hc_iters;
    int32_t is_full_size;  /* 1 if the file claims the real DS4 dimensions (and passed the strict checks) */
    uint64_t weight_bytes;
} ds4_model_desc;

int ds4_model_open(const char *path, int backend, ds4_model **out);
void ds4_model_free(ds4_model *m);
int ds4_model_describe(const ds4_model *m, ds4_model_desc *out);

enum ds4_session_flags {
    DS4_SESSION_DEFAULT = 0,          /* official numeric round-trips ON (FP8 KV, Hadamard+FP4 indexer, F16 KV) */
    DS4_SESSION_NO_ROUNDTRIP = 1,     /* f32 throughout: reference mode for comparison with transformers */
};

int ds4_session_new(ds4_model *m, int32_t max_ctx, uint32_t flags, ds4_session **out);
void ds4_session_free(ds4_session *s);
uint64_t ds4_session_bytes(const ds4_session *s);     /* memory allocated for the session's state */
int32_t ds4_session_pos(const ds4_session *s);        /* number of tokens evaluated so far */
/* Evaluate n tokens at positions pos..pos+n-1. logits_out: NULL, or n_vocab floats (last position),
 * or n*n_vocab floats when all_logits != 0. DS4_E_STATE if pos+n > max_ctx. */
int ds4_session_eval(ds4_session *s, const int32_t *tokens, int32_t n, int32_t all_logits, float *logits_out);
/* Forget every position >= n (0 <= n <= pos); the next eval continues at position n. */
int ds4_session_truncate(ds4_session *s, int32_t n);

/* ---- bandwidth probe (roofline) --------------------------------------------------------------- */
/* Streams `bytes` through a read-only kernel and a copy kernel `iters` times on `backend`; reports the
 * median GB/s (1e9 B/s): read counts bytes read, copy counts bytes read + written. */
int ds4_bandwidth_probe(int backend, uint64_t bytes, int32_t iters, double *read_gbs, double *copy_gbs);

/* ---- test entry points (stable enough for the test suite, not for clients) ----------------------- */
/* The official model's numeric round-trips, exposed so tests can check them against an independent numpy
 * implementation. kind: 0 nearest E4M3, 1 nearest E2M1, 2 nearest F16 (elementwise over n values);
 * 3 KV row round-trip (the first n_aux values in FP8 blocks, then F16); 4 indexer round-trip (Hadamard + FP4 +
 * F16; n a power of two >= 32). */
int ds4_test_roundtrip(int kind, const float *x, int64_t n, int64_t n_aux, float *out);

#ifdef __cplusplus
}
#endif
#endif /* DS4_H */
