// cuda/forward.cu: the DS4 forward pass on the GPU, one token per step (ds4-model-facts.md section D; the step
// numbers in the comments are the facts' numbers, as in model.cpp, which is the reference this file mirrors).
//
// Design:
//  - weights: the whole GGUF data section is copied once into one cudaMalloc'd buffer through pinned staging
//    buffers (several host threads fill them; the page cache of each chunk is dropped after its copy, which keeps
//    unified-memory machines from holding the file twice). Tensors keep their GGUF formats and offsets; the
//    matvec kernels of cuda/quant.cu read them in place.
//  - state: the session's overwritten state (raw windows, compressor buffers) lives in one device arena, so a
//    truncate checkpoint is one device-to-device copy; compressed and indexer rows are append-only arrays.
//  - a step is a fixed sequence of launches; the token id and position are read by the kernels from a device
//    step record, so the sequence is captured once into a CUDA graph per step shape (with/without the output
//    head; indexer idle/active, which is a function of the position) and replayed for every later token.
//    DS4_CUDA_GRAPHS=0 in the environment runs the launches directly (same kernels, same numbers).
//  - prefill: DS4_CUDA_PREFILL_BATCH=N (1..1024; default 1024; 1 = token by token through the decode step) evaluates N
//    tokens per step: the projections as one batched product (each weight read once for N tokens), the stateful
//    parts (raw window, compressors, indexer, attention) per token in position order, so it computes what the
//    token-by-token path computes. The raw-window ring has window + N - 1 slots so all N rows fit before reading.
//    v1 (DS4_CUDA_PREFILL_GEMM=0): mm_kernel (F32/F16/Q8_0, 16 tokens a launch), routed experts token by token.
//    v2 (default since the H200 run of 2026-11-29 12:49: 2.8x v1's prefill, same logits on the tiny models within
//    2.5e-6 of the CPU engine): mmq_kernel for every weight type, routed experts grouped by expert (each used
//    expert's weights read once per step), attention 4 heads per block; bench/prefill_notes.md.
//  - arithmetic is f32 with the reference's order of operations where it is cheap (sums of squares in double
//    like cpu::rms_norm, routed experts summed in ascending expert id), so CUDA logits follow the CPU engine.
#include <cuda_runtime.h>
#include <cub/block/block_scan.cuh>
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

#include "check.cuh"
#include "common.h"
#include "iq2xxs_grid.h"
#include "model.h"
#include "model_cuda.h"
#include "quant.h"

namespace ds4 {

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int kMaxHc = 8;           // hyper-connection streams supported by the small HC kernels
constexpr int kMaxLaneVals = 16;    // attention: head_dim / 32 values per lane (head_dim <= 512)
constexpr int kAttnWarps = 8;
constexpr int kAttnRows = 4;        // attention: rows a warp has in flight
constexpr int kIdxThreads = 256;    // indexer scores: threads per block (its shared memory holds a key row per warp)
constexpr int kHcwLd = 2 * kMaxHc + kMaxHc * kMaxHc;  // floats of one token's HC weights [pre | post | comb]
// Tokens per batched prefill step (DS4_CUDA_PREFILL_BATCH): at most kMaxBatch, by default kDefaultBatch. A token's
// arithmetic does not depend on its step, so the logits are the same for every batch size (run 89: bit for bit);
// larger steps give each routed expert more tokens per decoded weight tile: 2048 tokens 975 t/s in steps of 256,
// 1067 in 512, 1110 in 1024 (8192 tokens: 848 / 917 / 950), for ~0.7 GB more session memory than 256 (the
// per-token buffers below: ~0.9 MB a token at 32k context, counted from the allocations, not measured).
constexpr int kMaxBatch = 1024, kDefaultBatch = 1024;
constexpr int kMmBatch = 16;    // tokens per mm_kernel launch (the version-1 batched product)

double gib(uint64_t b) { return (double)b / (1024.0 * 1024.0 * 1024.0); }

// The device step record: what varies between tokens.
struct Step {
    int tok;
    int pos;
};

// ---- block reductions ----------------------------------------------------------------------------------------

template <class T>
__device__ __forceinline__ T warp_sum_t(T v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block (any blockDim multiple of 32, <= 1024); every thread gets the result.
template <class T>
__device__ T block_sum(T v) {
    __shared__ T red[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum_t(v);
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    T r = 0;
    for (int i = 0; i < nw; i++) r += red[i];  // fixed order: same result in every thread
    return r;
}

__device__ float block_max(float v) {
    __shared__ float red[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float r = -INFINITY;
    for (int i = 0; i < nw; i++) r = fmaxf(r, red[i]);
    return r;
}

// In-block RMS norm of s[0..n) (shared or global), in place: s = s / sqrt(mean(s^2) + eps) (* w).
__device__ void block_rms(float *s, int n, const float *w, float eps) {
    double ss = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) ss += (double)s[i] * (double)s[i];
    ss = block_sum(ss);
    const float r = (float)(1.0 / sqrt(ss / (double)n + (double)eps));
    for (int i = threadIdx.x; i < n; i += blockDim.x) s[i] = w ? (s[i] * r) * w[i] : s[i] * r;
    __syncthreads();
}

// Rotate the trailing n_rot dims of s[0..dim) by pos * inv_freq[i] (inverse: -pos).
__device__ void block_rope(float *s, int dim, int n_rot, const float *inv_freq, int64_t pos, bool inverse) {
    float *r = s + dim - n_rot;
    for (int i = threadIdx.x; i < n_rot / 2; i += blockDim.x) {
        const float ang = (float)pos * inv_freq[i];
        const float c = cosf(ang), sn = inverse ? -sinf(ang) : sinf(ang);
        const float a = r[2 * i], b = r[2 * i + 1];
        r[2 * i] = a * c - b * sn;
        r[2 * i + 1] = b * c + a * sn;
    }
    __syncthreads();
}

// ---- the official round-trips (cpu/ops.cpp twins) ------------------------------------------------------------

__device__ __forceinline__ float pow2_ceil_d(float v) {
    int e;
    const float f = frexpf(v, &e);
    return f == 0.5f ? ldexpf(1.0f, e - 1) : ldexpf(1.0f, e);
}

__device__ __forceinline__ float e4m3_round_d(float x) {
    if (isnan(x)) return x;
    const float a = fminf(fabsf(x), 448.0f);
    float q;
    if (a < 0.015625f) {
        q = rintf(a * 512.0f) / 512.0f;
    } else {
        int e;
        frexpf(a, &e);
        const float step = ldexpf(1.0f, e - 1 - 3);
        q = fminf(rintf(a / step) * step, 448.0f);
    }
    return copysignf(q, x);
}

__device__ __forceinline__ float e2m1_round_d(float x) {
    const float grid[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
    if (isnan(x)) return x;
    const float a = fabsf(x);
    int best = 7;
#pragma unroll
    for (int i = 0; i < 7; i++) {
        const float mid = 0.5f * (grid[i] + grid[i + 1]);
        if (best == 7) {
            if (a < mid) best = i;
            else if (a == mid) best = (i % 2 == 0) ? i : i + 1;
        }
    }
    float g = grid[0];
#pragma unroll
    for (int i = 1; i < 8; i++)
        if (best == i) g = grid[i];
    return copysignf(g, x);
}

__device__ __forceinline__ float f16_round_d(float x) { return __half2float(__float2half_rn(x)); }

// KV row: FP8 E4M3 per 64-value block over [0, n_nope) with a power-of-two scale, then F16 everywhere.
__device__ void block_kv_roundtrip(float *s, int n, int n_nope) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int b0 = warp * 64; b0 < n_nope; b0 += nw * 64) {
        const int b1 = min(n_nope, b0 + 64);
        float amax = 0.0f;
        for (int i = b0 + lane; i < b1; i += 32) amax = fmaxf(amax, fabsf(s[i]));
        amax = warp_max(amax);
        const float scale = pow2_ceil_d(fmaxf(amax, 1e-4f) / 448.0f);
        for (int i = b0 + lane; i < b1; i += 32) s[i] = e4m3_round_d(s[i] / scale) * scale;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += blockDim.x) s[i] = f16_round_d(s[i]);
    __syncthreads();
}

// Indexer: Walsh-Hadamard (natural order) / sqrt(n), FP4 E2M1 per 32 values (power-of-two scale), F16.
__device__ void block_indexer_roundtrip(float *s, int n) {
    for (int len = 1; len < n; len <<= 1) {
        for (int k = threadIdx.x; k < n / 2; k += blockDim.x) {
            const int j = (k / len) * 2 * len + (k % len);
            const float a = s[j], b = s[j + len];
            s[j] = a + b;
            s[j + len] = a - b;
        }
        __syncthreads();
    }
    const float norm = 1.0f / sqrtf((float)n);
    for (int i = threadIdx.x; i < n; i += blockDim.x) s[i] *= norm;
    __syncthreads();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int b0 = warp * 32; b0 < n; b0 += nw * 32) {
        const float v = s[b0 + lane];
        const float amax = warp_max(fabsf(v));
        const float scale = pow2_ceil_d(fmaxf(amax, 7.052966e-38f) / 6.0f);
        s[b0 + lane] = e2m1_round_d(v / scale) * scale;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += blockDim.x) s[i] = f16_round_d(s[i]);
    __syncthreads();
}

__device__ __forceinline__ float sigmoid_d(float x) { return 1.0f / (1.0f + expf(-x)); }
__device__ __forceinline__ float silu_d(float x) { return x / (1.0f + expf(-x)); }
__device__ __forceinline__ float softplus_d(float x) { return x > 20.0f ? x : log1pf(expf(x)); }

// ---- kernels ---------------------------------------------------------------------------------------------------

// Batched kernels: token t of a step is blockIdx.y (or blockIdx.x for one-block-per-token kernels); its step
// record is st[t] and its buffers are at t * (per-token size).

// 0. x = token_embd[tok] into every HC stream.
__global__ void embed_kernel(const uint8_t *W, int type, int E, int hc, const Step *st, float *H) {
    const int t = blockIdx.y;
    H += (size_t)t * hc * E;
    const int64_t tok = st[t].tok;
    for (int d = blockIdx.x * blockDim.x + threadIdx.x; d < E; d += gridDim.x * blockDim.x) {
        float v;
        if (type == DS4_TYPE_F32) {
            v = reinterpret_cast<const float *>(W)[tok * E + d];
        } else {
            const unsigned short h = reinterpret_cast<const unsigned short *>(W)[tok * E + d];
            v = type == DS4_TYPE_F16 ? __half2float(__ushort_as_half(h)) : __uint_as_float((uint32_t)h << 16);
        }
        for (int s = 0; s < hc; s++) H[(size_t)s * E + d] = v;
    }
}

// 1/14/19 (first half). The HC mix m = fn . RMS(flatten(H)) = r * (fn . H) with r = 1/sqrt(mean(H^2) + eps),
// split over column chunks: block b writes, for its kHcChunk columns, the partial dot of every fn row with H
// (part[b * rows + i]) and the partial sum of squares of H (ss[b]). The consumer sums the chunks in order, so the
// result does not depend on timing. fn is F16 or F32 (the DS4 files: F16).
constexpr int kHcChunk = 256;
constexpr int kHcThreads = 256;  // one column per thread
template <int T>
__global__ void __launch_bounds__(kHcThreads) hc_mix_partial_kernel(const void *fn, const float *H, int n, int rows,
                                                                     float *part, double *ss) {
    __shared__ float red[kHcThreads / 32][32];
    __shared__ double red_ss[kHcThreads / 32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    H += (size_t)blockIdx.y * n;
    part += (size_t)blockIdx.y * gridDim.x * rows;
    ss += (size_t)blockIdx.y * gridDim.x;
    const int c = blockIdx.x * kHcChunk + threadIdx.x;
    const float hv = c < n ? H[c] : 0.0f;
    double sq = (double)hv * (double)hv;
    sq = warp_sum_t(sq);
    if (lane == 0) red_ss[warp] = sq;
    for (int i0 = 0; i0 < rows; i0 += 32) {  // 32 rows at a time, all loads in flight before the sums
        float acc[32];
#pragma unroll
        for (int u = 0; u < 32; u++) {
            acc[u] = 0.0f;
            if (c < n && i0 + u < rows) {
                const size_t at = (size_t)(i0 + u) * n + c;
                const float wv = T == DS4_TYPE_F16 ? __half2float(reinterpret_cast<const __half *>(fn)[at])
                                                   : reinterpret_cast<const float *>(fn)[at];
                acc[u] = wv * hv;
            }
        }
#pragma unroll
        for (int u = 0; u < 32; u++) {
            if (i0 + u < rows) {  // uniform over the block
                const float v = warp_sum_t(acc[u]);
                if (lane == 0) red[warp][u] = v;
            }
        }
        __syncthreads();
        for (int i = i0 + threadIdx.x; i < min(rows, i0 + 32); i += blockDim.x) {
            float v = 0.0f;
            for (int w = 0; w < kHcThreads / 32; w++) v += red[w][i - i0];
            part[(size_t)blockIdx.x * rows + i] = v;
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        double t = 0.0;
        for (int w = 0; w < kHcThreads / 32; w++) t += red_ss[w];
        ss[blockIdx.x] = t;
    }
}

// Finish the mix: m[i] = r * sum_b part[b][i], r from the summed squares (warp per row; fixed order, so the
// result does not depend on timing). Called by every thread of the block.
__device__ void hc_mix_finish(const float *part, const double *ss, int n_chunks, int rows, int n, float eps, float *m) {
    __shared__ float r_s;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int i = warp; i < rows; i += nw) {
        float v = 0.0f;
        for (int b = lane; b < n_chunks; b += 32) v += part[(size_t)b * rows + i];
        v = warp_sum_t(v);
        if (lane == 0) m[i] = v;
    }
    if (warp == 0) {
        double t = 0.0;
        for (int b = lane; b < n_chunks; b += 32) t += ss[b];
        t = warp_sum_t(t);
        if (lane == 0) r_s = (float)(1.0 / sqrt(t / (double)n + (double)eps));
    }
    __syncthreads();
    for (int i = threadIdx.x; i < rows; i += blockDim.x) m[i] *= r_s;
    __syncthreads();
}

// 1/14. HC pre: mix (see above) -> pre/post/comb with Sinkhorn into hcw = [pre | post | comb]; x_in = sum_s
// pre_s H_s; out = RMS(x_in) * norm_w. One block; dynamic shared memory: E floats. The 4x4 Sinkhorn runs on warp
// 0, one lane per element, with the reference's summation order.
__global__ void hc_pre_kernel(const float *part, const double *ss, int n_chunks, const float *sc, const float *bs,
                              const float *H, const float *norm_w, int E, int hc, int iters, float hc_eps,
                              float rms_eps, float *hcw, float *out) {
    extern __shared__ float xs[];
    __shared__ float m[(2 + kMaxHc) * kMaxHc];
    __shared__ float C[kMaxHc * kMaxHc];
    __shared__ float pre[kMaxHc];
    const int mixn = (2 + hc) * hc;
    const int t = blockIdx.x;
    part += (size_t)t * n_chunks * mixn;
    ss += (size_t)t * n_chunks;
    H += (size_t)t * hc * E;
    hcw += (size_t)t * kHcwLd;
    out += (size_t)t * E;
    hc_mix_finish(part, ss, n_chunks, mixn, hc * E, rms_eps, m);
    if (threadIdx.x < 32) {
        const int lane = threadIdx.x, nn = hc * hc;
        if (lane < hc) {
            pre[lane] = sigmoid_d(m[lane] * sc[0] + bs[lane]) + hc_eps;
            hcw[lane] = pre[lane];
            hcw[hc + lane] = 2.0f * sigmoid_d(m[hc + lane] * sc[1] + bs[hc + lane]);
        }
        for (int e = lane; e < nn; e += 32) C[e] = m[2 * hc + e] * sc[2] + bs[2 * hc + e];
        __syncwarp();
        // softmax over b for each row a, then + eps (the row's values are read in order by each of its lanes)
        float v[2];
        for (int k = 0; k < 2; k++) {
            const int e = lane + 32 * k;
            v[k] = 0.0f;
            if (e < nn) {
                const int a = e / hc;
                float mx = -INFINITY;
                for (int b = 0; b < hc; b++) mx = fmaxf(mx, C[a * hc + b]);
                double sum = 0.0;
                for (int b = 0; b < hc; b++) sum += (double)expf(C[a * hc + b] - mx);
                const float inv = (float)(1.0 / sum);
                v[k] = __fadd_rn(__fmul_rn(expf(C[e] - mx), inv), hc_eps);
            }
        }
        __syncwarp();
        for (int k = 0; k < 2; k++)
            if (lane + 32 * k < nn) C[lane + 32 * k] = v[k];
        __syncwarp();
        for (int it = 0; it < iters; it++) {
            for (int pass = (it == 0 ? 1 : 0); pass < 2; pass++) {  // it 0: columns only; then rows, columns
                for (int k = 0; k < 2; k++) {
                    const int e = lane + 32 * k;
                    if (e < nn) {
                        const int a = e / hc, b = e % hc;
                        float sum = 0.0f;
                        if (pass == 0)
                            for (int j = 0; j < hc; j++) sum += C[a * hc + j];
                        else
                            for (int j = 0; j < hc; j++) sum += C[j * hc + b];
                        v[k] = C[e] / (sum + hc_eps);
                    }
                }
                __syncwarp();
                for (int k = 0; k < 2; k++)
                    if (lane + 32 * k < nn) C[lane + 32 * k] = v[k];
                __syncwarp();
            }
        }
        for (int e = lane; e < nn; e += 32) hcw[2 * hc + e] = C[e];
    }
    __syncthreads();
    for (int d = threadIdx.x; d < E; d += blockDim.x) {
        float acc = 0.0f;
        for (int s = 0; s < hc; s++) acc += pre[s] * H[(size_t)s * E + d];
        xs[d] = acc;
    }
    __syncthreads();
    block_rms(xs, E, norm_w, rms_eps);
    for (int d = threadIdx.x; d < E; d += blockDim.x) out[d] = xs[d];
}

// 13/18. HC post: H'_k = post_k y + sum_j comb[j][k] H_j.
__global__ void hc_post_kernel(const float *hcw, const float *y, float *H, int E, int hc) {
    hcw += (size_t)blockIdx.y * kHcwLd;
    y += (size_t)blockIdx.y * E;
    H += (size_t)blockIdx.y * hc * E;
    const float *post = hcw + hc, *comb = hcw + 2 * hc;
    for (int d = blockIdx.x * blockDim.x + threadIdx.x; d < E; d += gridDim.x * blockDim.x) {
        float h[kMaxHc];
        for (int j = 0; j < hc; j++) h[j] = H[(size_t)j * E + d];
        const float yd = y[d];
        for (int k = 0; k < hc; k++) {
            float acc = 0.0f;
            for (int j = 0; j < hc; j++) acc += comb[j * hc + k] * h[j];
            H[(size_t)k * E + d] = post[k] * yd + acc;
        }
    }
}

// Per-row RMS with an optional weight and an optional RoPE at the position of the row's token (block per row,
// rows_per_tok consecutive rows per token, in place).
__global__ void rows_rms_rope_kernel(float *x, int dim, const float *w, float eps, int n_rot, const float *inv_freq,
                                     const Step *st, int rows_per_tok) {
    st += blockIdx.x / rows_per_tok;
    extern __shared__ float s[];
    float *row = x + (size_t)blockIdx.x * dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) s[i] = row[i];
    __syncthreads();
    block_rms(s, dim, w, eps);
    if (inv_freq) block_rope(s, dim, n_rot, inv_freq, st->pos, false);
    for (int i = threadIdx.x; i < dim; i += blockDim.x) row[i] = s[i];
}

// 4-6. kv = RMS(kv) * kv_norm, RoPE at pos, round-trip, append to the raw window slot pos % window.
// The raw rows live in a ring of ring_rows >= window slots (position p at slot p % ring_rows), so a batched step
// can append all its tokens before their attention reads the last `window` positions of each.
__global__ void kv_kernel(const float *kv, int hd, const float *w, float eps, int n_rot, const float *inv_freq,
                          const Step *st, int roundtrip, int ring_rows, float *ring) {
    extern __shared__ float s[];
    kv += (size_t)blockIdx.x * hd;
    st += blockIdx.x;
    for (int i = threadIdx.x; i < hd; i += blockDim.x) s[i] = kv[i];
    __syncthreads();
    block_rms(s, hd, w, eps);
    block_rope(s, hd, n_rot, inv_freq, st->pos, false);
    if (roundtrip) block_kv_roundtrip(s, hd, hd - n_rot);
    float *dst = ring + (size_t)(st->pos % ring_rows) * hd;
    for (int i = threadIdx.x; i < hd; i += blockDim.x) dst[i] = s[i];
}

// 7/8. Compressor steps of n_tok consecutive tokens, in position order (one block): store (c, z + ape[slot]) in
// the state; when a window closes pool it (softmax of the scores per column), RMS * norm, RoPE (compress settings)
// at pos + 1 - r, round-trip (1: KV FP8, 2: indexer Hadamard+FP4), and write compressed row pos / r. csa: rows
// [0,r) previous window, [r,2r) current; width 2*head. Token t's inputs are c + t * c_ld, z + t * c_ld.
__global__ void compressor_kernel(const float *c, const float *z, int c_ld, int n_tok, const float *ape, int ratio,
                                  int csa, int head, const Step *st, float *kv_state, float *sc_state,
                                  const float *norm_w, float eps, int n_rot, const float *inv_freq, int roundtrip,
                                  float *rows_out) {
    extern __shared__ float s[];
    const int width = (csa ? 2 : 1) * head;
    const int n_slots = csa ? 2 * ratio : ratio;
    for (int t = 0; t < n_tok; t++) {
        const int64_t p = st[t].pos;
        const float *ct = c + (size_t)t * c_ld, *zt = z + (size_t)t * c_ld;
        const int slot = (int)(p % ratio);
        const int row = csa ? ratio + slot : slot;
        for (int j = threadIdx.x; j < width; j += blockDim.x) {
            kv_state[(size_t)row * width + j] = ct[j];
            sc_state[(size_t)row * width + j] = zt[j] + ape[(size_t)slot * width + j];
        }
        if ((p + 1) % ratio != 0) continue;  // uniform over the block
        __syncthreads();
        for (int j = threadIdx.x; j < head; j += blockDim.x) {
            float mx = -INFINITY;
            for (int q = 0; q < n_slots; q++) {
                const int col = (csa && q >= ratio) ? head + j : j;
                mx = fmaxf(mx, sc_state[(size_t)q * width + col]);
            }
            float acc = 0.0f;
            if (isfinite(mx)) {
                double sum = 0.0;
                for (int q = 0; q < n_slots; q++) {
                    const int col = (csa && q >= ratio) ? head + j : j;
                    sum += expf(sc_state[(size_t)q * width + col] - mx);
                }
                const float inv = (float)(1.0 / sum);
                for (int q = 0; q < n_slots; q++) {
                    const int col = (csa && q >= ratio) ? head + j : j;
                    const float wt = expf(sc_state[(size_t)q * width + col] - mx) * inv;
                    if (wt != 0.0f) acc += wt * kv_state[(size_t)q * width + col];
                }
            }
            s[j] = acc;
        }
        __syncthreads();
        block_rms(s, head, norm_w, eps);
        block_rope(s, head, n_rot, inv_freq, p + 1 - ratio, false);
        if (roundtrip == 1) block_kv_roundtrip(s, head, head - n_rot);
        if (roundtrip == 2) block_indexer_roundtrip(s, head);
        float *dst = rows_out + (size_t)(p / ratio) * head;
        for (int j = threadIdx.x; j < head; j += blockDim.x) dst[j] = s[j];
        if (csa) {  // the current window becomes the previous one
            for (int i = threadIdx.x; i < ratio * width; i += blockDim.x) {
                kv_state[i] = kv_state[(size_t)ratio * width + i];
                sc_state[i] = sc_state[(size_t)ratio * width + i];
            }
        }
        __syncthreads();  // before the next token's store
    }
}

// The same for a batched step, in parallel (the sequential kernel above walked the step's tokens in one block;
// run 84: 10% of a 256-token step's kernel time): compressor_rows_kernel computes each row a window completed in
// the step, one block per window, reading each slot from the step's token (the value the sequential kernel would
// have stored: c, and z + ape of the slot) or, for positions before the step, from the state as the step found it;
// compressor_state_kernel then leaves the state as the sequential kernel would (launched after it: it overwrites
// what the rows kernel reads). Same arithmetic in the same order: bit for bit the sequential kernel's rows.
// Positions of a step are consecutive (st[t].pos = st[0].pos + t).
__global__ void compressor_rows_kernel(const float *c, const float *z, int c_ld, int n_tok, const float *ape,
                                       int ratio, int csa, int head, const Step *st, const float *kv_state,
                                       const float *sc_state, const float *norm_w, float eps, int n_rot,
                                       const float *inv_freq, int roundtrip, float *rows_out) {
    extern __shared__ float s[];
    const int width = (csa ? 2 : 1) * head;
    const int n_slots = csa ? 2 * ratio : ratio;
    const int64_t p0 = st[0].pos, pl = p0 + n_tok - 1, k0 = p0 / ratio;
    const int64_t p = (k0 + 1) * ratio - 1 + (int64_t)blockIdx.x * ratio;  // the position completing this window
    if (p > pl) return;  // uniform over the block
    // slot q's kv and score in column j (csa: q < ratio the previous window's first half, else the current
    // window's second half, as the sequential kernel's rows)
    auto val = [&](int q, int j, float &kv, float &sc) {
        const int64_t pos = p + 1 - n_slots + q;
        const int slot = q % ratio, col = (csa && q >= ratio) ? head + j : j;
        if (pos >= p0) {
            const int64_t t = pos - p0;
            kv = c[(size_t)t * c_ld + col];
            sc = z[(size_t)t * c_ld + col] + ape[(size_t)slot * width + col];
        } else {  // before the step: the current window's rows if pos is in the window the step began in
            const int row = (csa && pos >= k0 * ratio) ? ratio + slot : slot;
            kv = kv_state[(size_t)row * width + col];
            sc = sc_state[(size_t)row * width + col];
        }
    };
    for (int j = threadIdx.x; j < head; j += blockDim.x) {
        float mx = -INFINITY, kv, sc;
        for (int q = 0; q < n_slots; q++) {
            val(q, j, kv, sc);
            mx = fmaxf(mx, sc);
        }
        float acc = 0.0f;
        if (isfinite(mx)) {
            double sum = 0.0;
            for (int q = 0; q < n_slots; q++) {
                val(q, j, kv, sc);
                sum += expf(sc - mx);
            }
            const float inv = (float)(1.0 / sum);
            for (int q = 0; q < n_slots; q++) {
                val(q, j, kv, sc);
                const float wt = expf(sc - mx) * inv;
                if (wt != 0.0f) acc += wt * kv;
            }
        }
        s[j] = acc;
    }
    __syncthreads();
    block_rms(s, head, norm_w, eps);
    block_rope(s, head, n_rot, inv_freq, p + 1 - ratio, false);
    if (roundtrip == 1) block_kv_roundtrip(s, head, head - n_rot);
    if (roundtrip == 2) block_indexer_roundtrip(s, head);
    float *dst = rows_out + (size_t)(p / ratio) * head;
    for (int j = threadIdx.x; j < head; j += blockDim.x) dst[j] = s[j];
}

__global__ void compressor_state_kernel(const float *c, const float *z, int c_ld, int n_tok, const float *ape,
                                        int ratio, int csa, int head, const Step *st, float *kv_state,
                                        float *sc_state) {
    const int width = (csa ? 2 : 1) * head;
    const int64_t p0 = st[0].pos, pl = p0 + n_tok - 1;
    const int64_t kc = (pl + 1) / ratio - 1;               // the last window completed by pl
    const bool done = kc >= 0 && (kc + 1) * ratio - 1 >= p0;  // ... and by this step
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < ratio * width; i += gridDim.x * blockDim.x) {
        const int slot = i / width, col = i - slot * width;
        const size_t cur = (size_t)((csa ? ratio : 0) + slot) * width + col;
        float kv = kv_state[cur], sc = sc_state[cur];  // the step's last write to this slot, else the old row
        const int64_t last = pl - (((pl - slot) % ratio) + ratio) % ratio;
        if (last >= p0) {
            kv = c[(size_t)(last - p0) * c_ld + col];
            sc = z[(size_t)(last - p0) * c_ld + col] + ape[(size_t)slot * width + col];
        }
        if (csa && done) {  // the current window becomes the previous one at every completion: the last one's
            const int64_t pos = kc * ratio + slot;
            float pkv = kv_state[cur], psc = sc_state[cur];
            if (pos >= p0) {
                pkv = c[(size_t)(pos - p0) * c_ld + col];
                psc = z[(size_t)(pos - p0) * c_ld + col] + ape[(size_t)slot * width + col];
            }
            kv_state[(size_t)slot * width + col] = pkv;
            sc_state[(size_t)slot * width + col] = psc;
        }
        kv_state[cur] = kv;
        sc_state[cur] = sc;
    }
}

// 9a. indexer queries: RoPE (compress settings) at pos, round-trip; block per head, in place.
__global__ void idx_q_kernel(float *qi, int dim, int n_rot, const float *inv_freq, const Step *st, int roundtrip,
                             int rows_per_tok) {
    extern __shared__ float s[];
    st += blockIdx.x / rows_per_tok;
    float *row = qi + (size_t)blockIdx.x * dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) s[i] = row[i];
    __syncthreads();
    block_rope(s, dim, n_rot, inv_freq, st->pos, false);
    if (roundtrip) block_indexer_roundtrip(s, dim);
    for (int i = threadIdx.x; i < dim; i += blockDim.x) row[i] = s[i];
}

// 9b. score_c = sum_h (relu(qI_h . kI_c) * s_scale) * (w_h * w_scale) for c < (pos+1)/r; warp per row.
__global__ void idx_score_kernel(const float *qi, const float *wi, const float *krows, int IH, int ID, int ratio,
                                 float s_scale, float w_scale, const Step *st, float *scores, int scores_ld) {
    extern __shared__ float qs[];  // IH x (ID + 1), then a key row per warp (ID floats each)
    qi += (size_t)blockIdx.y * IH * ID;
    wi += (size_t)blockIdx.y * IH;
    st += blockIdx.y;
    scores += (size_t)blockIdx.y * scores_ld;
    for (int i = threadIdx.x; i < IH * ID; i += blockDim.x) qs[(i / ID) * (ID + 1) + i % ID] = qi[i];
    __syncthreads();
    const int n_comp = (st->pos + 1) / ratio;
    const int lane = threadIdx.x & 31;
    const int warps = blockDim.x >> 5;
    // The warp's key row goes to shared memory first, all of it at once (each lane reading it value by value from
    // global memory waited on one latency after another: 25 us a launch at 2k context, run 43); same arithmetic.
    float *k = qs + IH * (ID + 1) + (threadIdx.x >> 5) * ID;
    for (int c = blockIdx.x * warps + (threadIdx.x >> 5); c < n_comp; c += gridDim.x * warps) {
        __syncwarp();
        for (int d = lane; d < ID; d += 32) k[d] = __ldg(krows + (size_t)c * ID + d);
        __syncwarp();
        float acc = 0.0f;
        for (int h = lane; h < IH; h += 32) {
            const float *q = qs + h * (ID + 1);
            float dot = 0.0f;
            for (int d = 0; d < ID; d++) dot += q[d] * k[d];
            acc += (fmaxf(dot, 0.0f) * s_scale) * (wi[h] * w_scale);
        }
        acc = warp_sum_t(acc);
        if (lane == 0) scores[c] = acc;
    }
}

// Unsigned key with the order of the floats; -0 and +0 map to one key (the reference's comparison calls them
// equal, and relu-summed indexer scores are often exactly zero).
__device__ __forceinline__ uint32_t order_key(float f) {
    const uint32_t u = __float_as_uint(f == 0.0f ? 0.0f : f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// 9c. top-k of scores[0 .. (pos+1)/r) (ties: lower index first), output in ascending index order; one block of
// kTopkThreads. n <= k: every row. Radix select of the k-th largest key (8 bits a pass, warp-aggregated histogram
// atomics), then each thread takes a contiguous segment: counts, two block scans, an ordered write.
constexpr int kTopkThreads = 1024;
__global__ void __launch_bounds__(kTopkThreads) topk_kernel(const float *scores, int scores_ld, int ratio, int k,
                                                            const Step *st, int *sel, int *n_sel) {
    scores += (size_t)blockIdx.x * scores_ld;
    st += blockIdx.x;
    sel += (size_t)blockIdx.x * k;
    n_sel += blockIdx.x;
    using Scan = cub::BlockScan<int, kTopkThreads>;
    __shared__ typename Scan::TempStorage scan_tmp;
    __shared__ int hist[256];
    __shared__ uint32_t prefix_s;
    __shared__ int remaining_s;
    const int n = (st->pos + 1) / ratio;
    const int lane = threadIdx.x & 31;
    if (n <= k) {
        for (int i = threadIdx.x; i < n; i += blockDim.x) sel[i] = i;
        if (threadIdx.x == 0) *n_sel = n;
        return;
    }
    uint32_t prefix = 0, mask = 0;
    int remaining = k;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
        __syncthreads();
        for (int i0 = 0; i0 < n; i0 += blockDim.x) {  // uniform bound: every lane takes part in the match
            const int i = i0 + threadIdx.x;
            int bin = -1;
            if (i < n) {
                const uint32_t key = order_key(scores[i]);
                if ((key & mask) == prefix) bin = (int)((key >> shift) & 255u);
            }
            const unsigned peers = __match_any_sync(0xffffffffu, bin);
            if (bin >= 0 && lane == __ffs(peers) - 1) atomicAdd(&hist[bin], __popc(peers));
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            int cum = 0, d = 255;
            for (; d > 0; d--) {
                if (cum + hist[d] >= remaining) break;
                cum += hist[d];
            }
            remaining_s = remaining - cum;
            prefix_s = prefix | ((uint32_t)d << shift);
        }
        __syncthreads();
        prefix = prefix_s;
        remaining = remaining_s;
        mask |= 255u << shift;
        __syncthreads();
    }
    // threshold key T: take every key > T and the first `remaining` keys == T, in index order
    const uint32_t T = prefix;
    const int per = (n + blockDim.x - 1) / blockDim.x;
    const int b = min(n, (int)threadIdx.x * per), e = min(n, b + per);
    int n_gt = 0, n_eq = 0;
    for (int i = b; i < e; i++) {
        const uint32_t key = order_key(scores[i]);
        n_gt += key > T;
        n_eq += key == T;
    }
    int eq_before, eq_total;
    Scan(scan_tmp).ExclusiveSum(n_eq, eq_before, eq_total);
    __syncthreads();
    const int take_eq = max(0, min(n_eq, remaining - eq_before));
    int out_before, out_total;
    Scan(scan_tmp).ExclusiveSum(n_gt + take_eq, out_before, out_total);
    int o = out_before, eqs = 0;
    for (int i = b; i < e; i++) {
        const uint32_t key = order_key(scores[i]);
        if (key > T || (key == T && eqs++ < take_eq)) sel[o++] = i;
    }
    if (threadIdx.x == 0) *n_sel = out_total;
}

// The attention kernels' row walk: f(i, this lane's values of row i) for every row i = warp, warp + kAttnWarps, ...
// below n_all, ROWS rows loaded before any is used (a row at a time left each warp waiting on one memory latency
// per row: 85 us a layer at 2k context, run 43); the arithmetic and its order per row do not depend on ROWS.
template <int ROWS, class RowPtr, class F>
__device__ __forceinline__ void each_row(int n_all, int nj, const RowPtr &row_ptr, F &&f) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int i0 = warp; i0 < n_all; i0 += kAttnWarps * ROWS) {
        float rv[ROWS][kMaxLaneVals];
#pragma unroll
        for (int u = 0; u < ROWS; u++) {
            const int i = i0 + u * kAttnWarps;
            const float *r = i < n_all ? row_ptr(i) : nullptr;
#pragma unroll
            for (int j = 0; j < kMaxLaneVals; j++) rv[u][j] = r && j < nj ? r[lane + 32 * j] : 0.0f;
        }
#pragma unroll
        for (int u = 0; u < ROWS; u++) {
            const int i = i0 + u * kAttnWarps;
            if (i >= n_all) break;
            f(i, rv[u]);
        }
    }
}

// 10-11. Attention of head blockIdx.x over the raw window rows and the visible compressed rows (all of
// [0, (pos+1)/r), or sel[0..*n_sel) when use_sel), softmax with the sink, inverse RoPE on the output.
// Warps take rows round-robin; lane l holds dims l, l+32, ... of the query and of its partial output.
__global__ void __launch_bounds__(32 * kAttnWarps)
    attention_kernel(const float *q, const float *ring, const float *comp, const int *sel, const int *n_sel,
                     int use_sel, int sel_ld, int ratio, int window, int ring_rows, int hd, int n_rot,
                     const float *sinks, const float *inv_freq, float scale, const Step *st, float *o) {
    extern __shared__ float sm[];  // probs[max_rows] | out partials [kAttnWarps][hd] | out [hd]
    const int h = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    {
        const int t = blockIdx.y;
        q += (size_t)t * gridDim.x * hd;
        o += (size_t)t * gridDim.x * hd;
        st += t;
        sel += (size_t)t * sel_ld;
        n_sel += t;
    }
    const int64_t p = st->pos;
    const int64_t w0 = p - window + 1 > 0 ? p - window + 1 : 0;
    const int n_raw = (int)(p - w0 + 1);
    const int n_comp = ratio ? (int)((p + 1) / ratio) : 0;
    const int n_vis = use_sel ? *n_sel : n_comp;
    const int n_all = n_raw + n_vis;
    float *probs = sm;
    float *part = sm + ((n_all + 3) & ~3);
    float *out = part + kAttnWarps * hd;
    const int nj = hd / 32;
    float qv[kMaxLaneVals];
    const float *qh = q + (size_t)h * hd;
#pragma unroll
    for (int j = 0; j < kMaxLaneVals; j++) qv[j] = j < nj ? qh[lane + 32 * j] : 0.0f;
    auto row_ptr = [&](int i) -> const float * {
        if (i < n_raw) return ring + (size_t)((w0 + i) % ring_rows) * hd;
        const int c = use_sel ? sel[i - n_raw] : i - n_raw;
        return comp + (size_t)c * hd;
    };
    each_row<kAttnRows>(n_all, nj, row_ptr, [&](int i, const float (&r)[kMaxLaneVals]) {
        float dot = 0.0f;
#pragma unroll
        for (int j = 0; j < kMaxLaneVals; j++)
            if (j < nj) dot += qv[j] * r[j];
        dot = warp_sum_t(dot);
        if (lane == 0) probs[i] = dot * scale;
    });
    __syncthreads();
    const float sink = sinks[h];
    float mx = sink;
    for (int i = threadIdx.x; i < n_all; i += blockDim.x) mx = fmaxf(mx, probs[i]);
    mx = block_max(mx);
    double sum = 0.0;
    for (int i = threadIdx.x; i < n_all; i += blockDim.x) {
        const float e = expf(probs[i] - mx);
        probs[i] = e;
        sum += e;
    }
    sum = block_sum(sum) + (double)expf(sink - mx);
    const float inv = (float)(1.0 / sum);
    float acc[kMaxLaneVals];
#pragma unroll
    for (int j = 0; j < kMaxLaneVals; j++) acc[j] = 0.0f;
    each_row<kAttnRows>(n_all, nj, row_ptr, [&](int i, const float (&r)[kMaxLaneVals]) {
        const float pr = probs[i] * inv;
#pragma unroll
        for (int j = 0; j < kMaxLaneVals; j++)
            if (j < nj) acc[j] += pr * r[j];
    });
#pragma unroll
    for (int j = 0; j < kMaxLaneVals; j++)
        if (j < nj) part[warp * hd + lane + 32 * j] = acc[j];
    __syncthreads();
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float v = 0.0f;
        for (int w = 0; w < kAttnWarps; w++) v += part[w * hd + d];
        out[d] = v;
    }
    __syncthreads();
    block_rope(out, hd, n_rot, inv_freq, p, true);
    for (int d = threadIdx.x; d < hd; d += blockDim.x) o[(size_t)h * hd + d] = out[d];
}

// attention_kernel for kAttnHeads heads per block (batched prefill steps with DS4_CUDA_PREFILL_GEMM=1): every
// head reads the same rows (one shared KV head), so a block loads each row once for kAttnHeads heads instead of
// once per head (a quarter of the L2 traffic). Per head the arithmetic and its order are attention_kernel's.
// kMhRows: rows a warp loads before using any. 2 (attention_kernel's batching, 239 registers, one CTA per SM) lost
// to 1 (118, two CTAs) in run 87: prefill 907 against 972 t/s; written this way (each_row), 1 row beat the old loop
// (ncu: 83.0 -> 58.7 ms of attention in a 256-token step, run 86 -> 87).
constexpr int kAttnHeads = 4, kMhRows = 1;
__global__ void __launch_bounds__(32 * kAttnWarps)
    attention_mh_kernel(const float *q, const float *ring, const float *comp, const int *sel, const int *n_sel,
                        int use_sel, int sel_ld, int ratio, int window, int ring_rows, int hd, int n_rot,
                        const float *sinks, const float *inv_freq, float scale, const Step *st, float *o) {
    extern __shared__ float sm[];  // probs[kAttnHeads][n_pad] | out partials [kAttnWarps][hd] | out [hd]
    const int h0 = blockIdx.x * kAttnHeads, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int n_heads = gridDim.x * kAttnHeads;
    {
        const int t = blockIdx.y;
        q += (size_t)t * n_heads * hd;
        o += (size_t)t * n_heads * hd;
        st += t;
        sel += (size_t)t * sel_ld;
        n_sel += t;
    }
    const int64_t p = st->pos;
    const int64_t w0 = p - window + 1 > 0 ? p - window + 1 : 0;
    const int n_raw = (int)(p - w0 + 1);
    const int n_comp = ratio ? (int)((p + 1) / ratio) : 0;
    const int n_vis = use_sel ? *n_sel : n_comp;
    const int n_all = n_raw + n_vis;
    const int n_pad = (n_all + 3) & ~3;
    float *probs = sm;
    float *part = sm + kAttnHeads * n_pad;
    float *out = part + kAttnWarps * hd;
    const int nj = hd / 32;
    auto row_ptr = [&](int i) -> const float * {
        if (i < n_raw) return ring + (size_t)((w0 + i) % ring_rows) * hd;
        const int c = use_sel ? sel[i - n_raw] : i - n_raw;
        return comp + (size_t)c * hd;
    };
    {
        float qv[kAttnHeads][kMaxLaneVals];
#pragma unroll
        for (int hh = 0; hh < kAttnHeads; hh++)
#pragma unroll
            for (int j = 0; j < kMaxLaneVals; j++) qv[hh][j] = j < nj ? q[(size_t)(h0 + hh) * hd + lane + 32 * j] : 0.0f;
        each_row<kMhRows>(n_all, nj, row_ptr, [&](int i, const float (&rv)[kMaxLaneVals]) {
#pragma unroll
            for (int hh = 0; hh < kAttnHeads; hh++) {
                float dot = 0.0f;
#pragma unroll
                for (int j = 0; j < kMaxLaneVals; j++)
                    if (j < nj) dot += qv[hh][j] * rv[j];
                dot = warp_sum_t(dot);
                if (lane == 0) probs[hh * n_pad + i] = dot * scale;
            }
        });
    }
    __syncthreads();
    float inv[kAttnHeads];
#pragma unroll
    for (int hh = 0; hh < kAttnHeads; hh++) {
        float *ph = probs + hh * n_pad;
        const float sink = sinks[h0 + hh];
        float mx = sink;
        for (int i = threadIdx.x; i < n_all; i += blockDim.x) mx = fmaxf(mx, ph[i]);
        mx = block_max(mx);
        double sum = 0.0;
        for (int i = threadIdx.x; i < n_all; i += blockDim.x) {
            const float e = expf(ph[i] - mx);
            ph[i] = e;
            sum += e;
        }
        sum = block_sum(sum) + (double)expf(sink - mx);
        inv[hh] = (float)(1.0 / sum);
    }
    __syncthreads();
    float acc[kAttnHeads][kMaxLaneVals];
#pragma unroll
    for (int hh = 0; hh < kAttnHeads; hh++)
#pragma unroll
        for (int j = 0; j < kMaxLaneVals; j++) acc[hh][j] = 0.0f;
    each_row<kMhRows>(n_all, nj, row_ptr, [&](int i, const float (&rv)[kMaxLaneVals]) {
#pragma unroll
        for (int hh = 0; hh < kAttnHeads; hh++) {
            const float pr = probs[hh * n_pad + i] * inv[hh];
#pragma unroll
            for (int j = 0; j < kMaxLaneVals; j++)
                if (j < nj) acc[hh][j] += pr * rv[j];
        }
    });
#pragma unroll
    for (int hh = 0; hh < kAttnHeads; hh++) {
#pragma unroll
        for (int j = 0; j < kMaxLaneVals; j++)
            if (j < nj) part[warp * hd + lane + 32 * j] = acc[hh][j];
        __syncthreads();
        for (int d = threadIdx.x; d < hd; d += blockDim.x) {
            float v = 0.0f;
            for (int w = 0; w < kAttnWarps; w++) v += part[w * hd + d];
            out[d] = v;
        }
        __syncthreads();
        block_rope(out, hd, n_rot, inv_freq, p, true);
        for (int d = threadIdx.x; d < hd; d += blockDim.x) o[(size_t)(h0 + hh) * hd + d] = out[d];
        __syncthreads();
    }
}

// 15. router: s = sqrt(softplus(g)); hash layers take tid2eid[tok], others the top-k of s + bias (ties: lower
// index); weights s_sel / max(sum, floor) * scale (or sum + 1e-20 without round-trips). Output sorted by expert id
// (the reference sums the experts in ascending id order). One block of >= n_expert threads... any size.
__global__ void router_kernel(const float *g, int NE, int K, const float *bias, const int32_t *tid2eid,
                              const Step *st, float scale, int floor_sum, int *eids, float *ewt) {
    extern __shared__ float sr[];  // s[NE] | biased[NE]
    g += (size_t)blockIdx.x * NE;
    st += blockIdx.x;
    eids += (size_t)blockIdx.x * K;
    ewt += (size_t)blockIdx.x * K;
    float *s = sr, *bsd = sr + NE;
    for (int e = threadIdx.x; e < NE; e += blockDim.x) {
        s[e] = sqrtf(softplus_d(g[e]));
        bsd[e] = s[e] + (bias ? bias[e] : 0.0f);
    }
    __syncthreads();
    if (threadIdx.x >= 32) return;
    const int lane = threadIdx.x;
    int sel[16];
    if (tid2eid) {
        for (int k = 0; k < K; k++) sel[k] = tid2eid[(size_t)st->tok * K + k];
    } else {
        // a chosen expert's biased score becomes -inf (the scores are finite), instead of each lane checking every
        // candidate against the experts chosen so far (a local-memory array: 17 us a launch, run 43)
        for (int k = 0; k < K; k++) {
            float bv = -INFINITY;
            int bi = 0x7fffffff;
            for (int e = lane; e < NE; e += 32) {
                if (bsd[e] > bv || (bsd[e] == bv && e < bi)) {
                    bv = bsd[e];
                    bi = e;
                }
            }
            for (int o = 16; o > 0; o >>= 1) {
                const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
                const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
                if (ov > bv || (ov == bv && oi < bi)) {
                    bv = ov;
                    bi = oi;
                }
            }
            sel[k] = bi;
            __syncwarp();
            if (lane == 0) bsd[bi] = -INFINITY;
            __syncwarp();
        }
    }
    if (lane != 0) return;
    float sum = 0.0f;
    for (int k = 0; k < K; k++) sum += s[sel[k]];
    const float denom = floor_sum ? fmaxf(sum, 6.103515625e-5f) : sum + 1e-20f;
    float w[16];
    for (int k = 0; k < K; k++) w[k] = s[sel[k]] / denom * scale;
    for (int a = 1; a < K; a++) {  // stable insertion sort by expert id
        const int id = sel[a];
        const float wa = w[a];
        int b = a - 1;
        while (b >= 0 && sel[b] > id) {
            sel[b + 1] = sel[b];
            w[b + 1] = w[b];
            b--;
        }
        sel[b + 1] = id;
        w[b + 1] = wa;
    }
    for (int k = 0; k < K; k++) {
        eids[k] = sel[k];
        ewt[k] = w[k];
    }
}

// 16/17. SwiGLU with the clamp: out = silu(min(g, lim)) * clamp(u, -lim, lim).
__global__ void swiglu_kernel(const float *gt, const float *up, int n, float lim, float *out) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        const float gv = fminf(gt[i], lim);
        const float uv = fminf(fmaxf(up[i], -lim), lim);
        out[i] = silu_d(gv) * uv;
    }
}

// 16-18. y = sum_k dn[k] * w[k] (k in ascending expert id) + shared, then the HC post with y (as hc_post_kernel).
__global__ void moe_sum_post_kernel(const float *dn, const float *ewt, int K, int E, const float *shared,
                                    const float *hcw, float *H, int hc) {
    const float *post = hcw + hc, *comb = hcw + 2 * hc;
    for (int d = blockIdx.x * blockDim.x + threadIdx.x; d < E; d += gridDim.x * blockDim.x) {
        float acc = 0.0f;
        for (int k = 0; k < K; k++) acc += dn[(size_t)k * E + d] * ewt[k];
        const float yd = acc + shared[d];
        float h[kMaxHc];
        for (int j = 0; j < hc; j++) h[j] = H[(size_t)j * E + d];
        for (int k = 0; k < hc; k++) {
            float a = 0.0f;
            for (int j = 0; j < hc; j++) a += comb[j * hc + k] * h[j];
            H[(size_t)k * E + d] = post[k] * yd + a;
        }
    }
}

// 19. head collapse: w_s = sigmoid(m_s * scale + base_s) + eps; z = sum_s w_s H_s; z = RMS(z) * norm. One block.
__global__ void head_kernel(const float *part, const double *ss, int n_chunks, const float *scale,
                            const float *base, const float *H, const float *norm_w, int E, int hc, float hc_eps,
                            float rms_eps, float *z) {
    extern __shared__ float zs[];
    __shared__ float m[kMaxHc];
    hc_mix_finish(part, ss, n_chunks, hc, hc * E, rms_eps, m);
    for (int d = threadIdx.x; d < E; d += blockDim.x) {
        float acc = 0.0f;
        for (int s = 0; s < hc; s++) acc += (sigmoid_d(m[s] * scale[0] + base[s]) + hc_eps) * H[(size_t)s * E + d];
        zs[d] = acc;
    }
    __syncthreads();
    block_rms(zs, E, norm_w, rms_eps);
    for (int d = threadIdx.x; d < E; d += blockDim.x) z[d] = zs[d];
}

// Batched matvec for prefill steps: Y[b * y_ld + r] = W[r] . X[b * x_ld + xoff(r) ...] for b < nb, r < n_rows,
// where xoff(r) = (r / rpg) * xgs (the grouped output projection; rpg = n_rows, xgs = 0 otherwise). Each weight is
// read once per step and used for nb tokens: a block covers kMmRows rows (kMmRowsPerWarp per warp), the nb input
// vectors are staged in shared memory kMmTile columns at a time, lane l handles columns 8l..8l+7 of the tile.
// F32, F16 and Q8_0 (the always-on DS4 weights); other types go through the per-token matvec.
constexpr int kMmWarps = 4, kMmRowsPerWarp = 4, kMmRows = kMmWarps * kMmRowsPerWarp, kMmTile = 256;

template <int T>
__device__ __forceinline__ void load8(const uint8_t *row, int c, float (&w)[8]) {
    if (T == DS4_TYPE_F32) {
        const float4 a = *reinterpret_cast<const float4 *>(row + 4 * (size_t)c);
        const float4 b = *reinterpret_cast<const float4 *>(row + 4 * (size_t)c + 16);
        w[0] = a.x; w[1] = a.y; w[2] = a.z; w[3] = a.w;
        w[4] = b.x; w[5] = b.y; w[6] = b.z; w[7] = b.w;
    } else if (T == DS4_TYPE_F16) {
        const uint4 u = *reinterpret_cast<const uint4 *>(row + 2 * (size_t)c);
        const uint32_t ws[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            w[2 * i] = __half2float(__ushort_as_half((unsigned short)(ws[i] & 0xffff)));
            w[2 * i + 1] = __half2float(__ushort_as_half((unsigned short)(ws[i] >> 16)));
        }
    } else {  // Q8_0: 34-byte blocks (f16 scale + 32 int8)
        const uint8_t *bp = row + 34 * (size_t)(c / 32);
        const float d = __half2float(__ushort_as_half(*reinterpret_cast<const unsigned short *>(bp)));
        const unsigned short *q = reinterpret_cast<const unsigned short *>(bp + 2 + (c % 32));
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const unsigned short v = q[i];
            w[2 * i] = d * (float)(int8_t)(v & 0xff);
            w[2 * i + 1] = d * (float)(int8_t)(v >> 8);
        }
    }
}

template <int T>
__global__ void __launch_bounds__(32 * kMmWarps)
    mm_kernel(const uint8_t *W, size_t rb, int n_rows, int n_cols, const float *X, int64_t x_ld, float *Y,
              int64_t y_ld, int nb, int rpg, int64_t xgs) {
    __shared__ __align__(16) float xs[kMmBatch][kMmTile];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int r0 = blockIdx.x * kMmRows; r0 < n_rows; r0 += gridDim.x * kMmRows) {
        const int64_t xoff = (int64_t)(r0 / rpg) * xgs;
        float acc[kMmRowsPerWarp][kMmBatch];
#pragma unroll
        for (int r = 0; r < kMmRowsPerWarp; r++)
#pragma unroll
            for (int b = 0; b < kMmBatch; b++) acc[r][b] = 0.0f;
        for (int c0 = 0; c0 < n_cols; c0 += kMmTile) {
            const int tc = min(kMmTile, n_cols - c0);
            __syncthreads();
            for (int i = threadIdx.x; i < kMmBatch * kMmTile; i += blockDim.x) {
                const int b = i / kMmTile, j = i % kMmTile;
                xs[b][j] = (b < nb && j < tc) ? X[b * x_ld + xoff + c0 + j] : 0.0f;
            }
            __syncthreads();
            const int j0 = 8 * lane;
            if (j0 < tc) {
#pragma unroll
                for (int r = 0; r < kMmRowsPerWarp; r++) {
                    const int row = r0 + warp * kMmRowsPerWarp + r;
                    if (row >= n_rows) continue;
                    float w[8];
                    load8<T>(W + (size_t)row * rb, c0 + j0, w);
#pragma unroll
                    for (int b = 0; b < kMmBatch; b++) {
                        if (b < nb) {
                            const float4 x0 = *reinterpret_cast<const float4 *>(&xs[b][j0]);
                            const float4 x1 = *reinterpret_cast<const float4 *>(&xs[b][j0 + 4]);
                            float a = acc[r][b];
                            a = fmaf(w[0], x0.x, a);
                            a = fmaf(w[1], x0.y, a);
                            a = fmaf(w[2], x0.z, a);
                            a = fmaf(w[3], x0.w, a);
                            a = fmaf(w[4], x1.x, a);
                            a = fmaf(w[5], x1.y, a);
                            a = fmaf(w[6], x1.z, a);
                            a = fmaf(w[7], x1.w, a);
                            acc[r][b] = a;
                        }
                    }
                }
            }
        }
#pragma unroll
        for (int r = 0; r < kMmRowsPerWarp; r++) {
            const int row = r0 + warp * kMmRowsPerWarp + r;
#pragma unroll
            for (int b = 0; b < kMmBatch; b++) {
                if (b < nb) {  // uniform: every lane reduces
                    const float v = warp_sum_t(acc[r][b]);
                    if (lane == 0 && row < n_rows) Y[b * y_ld + row] = v;
                }
            }
        }
    }
}

// ---- batched prefill, version 2 (DS4_CUDA_PREFILL_GEMM=1): one kernel for every weight type and for the routed
// experts grouped by expert. A block owns kQRows x kQWarps weight rows; each lane dequantizes 8 consecutive
// weights of each of its warp's rows into registers once and multiplies them with up to kQNB tokens staged in
// shared memory (the weight bytes are read once per kQNB tokens, not once per token). Tokens come in groups of
// kQNB; a longer token range loops over the weight rows again (L2 usually still holds them). Expert mode:
// blockIdx.y = expert e, its tokens are the sorted pair slots [off[e], off[e+1]) (an unused expert's blocks return
// at once, so its weights are never read); X row of slot j = x_idx[j] (the token), Y row = j.
constexpr int kQWarps = 8, kQRows = 4, kQBlockRows = kQWarps * kQRows, kQTile = 512, kQNB = 8;

__device__ const uint64_t pf_iq2_grid[256] = {DS4_IQ2XXS_GRID_VALUES};

__device__ __forceinline__ uint32_t ld_u32_2(const uint8_t *p) {  // 2-byte aligned
    const unsigned short *h = reinterpret_cast<const unsigned short *>(p);
    return (uint32_t)h[0] | ((uint32_t)h[1] << 16);
}

// Weights c .. c+7 of a row (c % 8 == 0) in two phases, so a tile's loads are all in flight before the first
// use: raw8 loads the bytes (<= 8 words), dec8 turns them into floats with the CPU dequantizers' arithmetic
// (cpu/quant.cpp; products and differences rounded separately, as there, no contraction).
__device__ __forceinline__ uint32_t ld_u16(const uint8_t *p) { return *reinterpret_cast<const unsigned short *>(p); }
__device__ __forceinline__ float f16_bits(uint32_t h) { return __half2float(__ushort_as_half((unsigned short)h)); }

template <int T>
__device__ __forceinline__ void raw8(const uint8_t *row, int c, uint32_t (&r)[8]) {
    if (T == DS4_TYPE_F32) {
        const uint32_t *p = reinterpret_cast<const uint32_t *>(row) + c;
#pragma unroll
        for (int e = 0; e < 8; e++) r[e] = p[e];
    } else if (T == DS4_TYPE_F16) {
        const uint8_t *p = row + 2 * (size_t)c;
#pragma unroll
        for (int e = 0; e < 4; e++) r[e] = ld_u32_2(p + 4 * e);
    } else if (T == DS4_TYPE_Q8_0) {
        const uint8_t *b = row + 34 * (size_t)(c / 32);
        r[0] = ld_u16(b);
        r[1] = ld_u32_2(b + 2 + (c % 32));
        r[2] = ld_u32_2(b + 2 + (c % 32) + 4);
    } else if (T == DS4_TYPE_Q2_K) {
        const uint8_t *b = row + 84 * (size_t)(c / 256);
        const int i = c % 256, half = i / 128, j = (i % 128) / 32, l0 = i % 32;
        r[0] = b[8 * half + 2 * j + l0 / 16];
        r[1] = ld_u32_2(b + 80);  // d | dmin << 16
        r[2] = ld_u32_2(b + 16 + 32 * half + l0);
        r[3] = ld_u32_2(b + 16 + 32 * half + l0 + 4);
    } else if (T == DS4_TYPE_Q4_K) {
        const uint8_t *b = row + 144 * (size_t)(c / 256);
        const int i = c % 256, sb = i / 32, l0 = i % 32;
        const uint8_t *s = b + 4;
        r[0] = ld_u32_2(b);  // d | dmin << 16
        r[1] = (uint32_t)s[sb] | ((uint32_t)s[sb + 4] << 8) | ((uint32_t)s[sb < 4 ? sb : sb - 4] << 16);
        r[2] = ld_u32_2(b + 16 + 32 * (sb / 2) + l0);
        r[3] = ld_u32_2(b + 16 + 32 * (sb / 2) + l0 + 4);
    } else {  // IQ2_XXS
        const uint8_t *b = row + 66 * (size_t)(c / 256);
        const int i = c % 256, g = i / 32, k = (i % 32) / 8;
        const uint8_t *grp = b + 2 + 8 * g;
        r[0] = ld_u16(b);
        r[1] = ld_u32_2(grp + 4);
        r[2] = grp[k];
    }
}

template <int T>
__device__ __forceinline__ void dec8(const uint32_t (&r)[8], int c, float (&w)[8]) {
    if (T == DS4_TYPE_F32) {
#pragma unroll
        for (int e = 0; e < 8; e++) w[e] = __uint_as_float(r[e]);
    } else if (T == DS4_TYPE_F16) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
            w[2 * e] = f16_bits(r[e] & 0xffffu);
            w[2 * e + 1] = f16_bits(r[e] >> 16);
        }
    } else if (T == DS4_TYPE_Q8_0) {
        const float d = f16_bits(r[0]);
#pragma unroll
        for (int e = 0; e < 8; e++) w[e] = __fmul_rn((float)(int8_t)((r[1 + e / 4] >> (8 * (e & 3))) & 0xff), d);
    } else if (T == DS4_TYPE_Q2_K) {
        const int j = ((c % 256) % 128) / 32;
        const uint32_t sc = r[0];
        const float dl = __fmul_rn(f16_bits(r[1] & 0xffffu), (float)(sc & 0xf));
        const float ml = __fmul_rn(f16_bits(r[1] >> 16), (float)(sc >> 4));
#pragma unroll
        for (int e = 0; e < 8; e++) {
            const float q = (float)((r[2 + e / 4] >> (8 * (e & 3) + 2 * j)) & 3u);
            w[e] = __fsub_rn(__fmul_rn(dl, q), ml);
        }
    } else if (T == DS4_TYPE_Q4_K) {
        const int sb = (c % 256) / 32;
        const uint32_t s0 = r[1] & 0xff, s4 = (r[1] >> 8) & 0xff, sm4 = (r[1] >> 16) & 0xff;
        uint32_t sc, mn;
        if (sb < 4) {
            sc = s0 & 63u;
            mn = s4 & 63u;
        } else {  // s[sb + 4] = s4, s[sb - 4] = sm4, s[sb] = s0
            sc = (s4 & 15u) | ((sm4 >> 6) << 4);
            mn = (s4 >> 4) | ((s0 >> 6) << 4);
        }
        const float ds = __fmul_rn(f16_bits(r[0] & 0xffffu), (float)sc);
        const float dm = __fmul_rn(f16_bits(r[0] >> 16), (float)mn);
        const int shift = (sb & 1) * 4;
#pragma unroll
        for (int e = 0; e < 8; e++) {
            const float q = (float)((r[2 + e / 4] >> (8 * (e & 3) + shift)) & 15u);
            w[e] = __fsub_rn(__fmul_rn(ds, q), dm);
        }
    } else {  // IQ2_XXS
        const int k = ((c % 256) % 32) / 8;
        const uint32_t w1 = r[1];
        const float db = __fmul_rn(__fmul_rn(f16_bits(r[0]), 0.5f + (float)(w1 >> 28)), 0.25f);
        const uint64_t gv = pf_iq2_grid[r[2]];
        const uint32_t signs = iq2xxs_sign_byte((w1 >> (7 * k)) & 127u);
#pragma unroll
        for (int e = 0; e < 8; e++) {
            const float v = __fmul_rn(db, (float)((gv >> (8 * e)) & 0xff));
            w[e] = (signs >> e) & 1u ? -v : v;
        }
    }
}

struct MmqArgs {
    const uint8_t *W[2];
    float *Y[2];
    size_t rb;
    int64_t expert_stride;  // bytes (expert mode)
    int n_rows, n_cols;
    const float *X;
    int64_t x_ld;
    int rpg;       // rows per input group (grouped output projection); n_rows otherwise
    int64_t xgs;   // X offset per group
    const int *x_idx;  // X row of token slot j (null: j)
    const int *off;    // expert mode: slots of expert e are [off[e], off[e+1]); null: dense [0, n_tok)
    int n_tok;
    int64_t y_ld;
    int x_vec;  // X, x_ld and xgs allow 16-byte loads
};

template <int T>
__global__ void __launch_bounds__(32 * kQWarps) mmq_kernel(MmqArgs a) {
    __shared__ __align__(16) float xs[kQNB][kQTile];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const uint8_t *W = blockIdx.z ? a.W[1] : a.W[0];  // no run-time index into the parameters (local copy)
    float *Y = blockIdx.z ? a.Y[1] : a.Y[0];
    int begin, end, r0;
    if (a.off) {  // grid (row tiles, experts, matrices)
        begin = a.off[blockIdx.y];
        end = a.off[blockIdx.y + 1];
        W += (size_t)blockIdx.y * a.expert_stride;
        r0 = blockIdx.x * kQBlockRows;
    } else {  // grid (token groups, row tiles, matrices): consecutive blocks share weight rows (L2)
        begin = blockIdx.x * kQNB;
        end = min(a.n_tok, begin + kQNB);
        r0 = blockIdx.y * kQBlockRows;
    }
    if (begin >= end) return;  // uniform over the block
    const int64_t xoff = (int64_t)(r0 / a.rpg) * a.xgs;
    const int rw = r0 + warp * kQRows;
    constexpr int kCh = kQTile / 256;  // 8-weight chunks per lane and row in a tile
    for (int tb = begin; tb < end; tb += kQNB) {
        const int nt = min(kQNB, end - tb);
        float acc[kQRows][kQNB];
#pragma unroll
        for (int r = 0; r < kQRows; r++)
#pragma unroll
            for (int b = 0; b < kQNB; b++) acc[r][b] = 0.0f;
        for (int c0 = 0; c0 < a.n_cols; c0 += kQTile) {
            const int tc = min(kQTile, a.n_cols - c0);
            // this tile's weight bytes first (in flight while x is staged)
            uint32_t raw[kQRows][kCh][8];
#pragma unroll
            for (int r = 0; r < kQRows; r++)
#pragma unroll
                for (int h = 0; h < kCh; h++) {
                    const int j = 256 * h + 8 * lane;
#pragma unroll
                    for (int e = 0; e < 8; e++) raw[r][h][e] = 0u;
                    if (rw + r < a.n_rows && j < tc) raw8<T>(W + (size_t)(rw + r) * a.rb, c0 + j, raw[r][h]);
                }
            __syncthreads();  // the previous tile's reads of xs are done
            for (int i = threadIdx.x; i < kQNB * kQTile / 4; i += blockDim.x) {  // 16-byte pieces (tc % 8 == 0)
                const int b = i / (kQTile / 4), j = 4 * (i % (kQTile / 4));
                float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
                if (b < nt && j < tc) {
                    const int slot = tb + b;
                    const int64_t xr = a.x_idx ? a.x_idx[slot] : slot;
                    const float *xp = a.X + xr * a.x_ld + xoff + c0 + j;
                    if (a.x_vec) {
                        v = *reinterpret_cast<const float4 *>(xp);
                    } else {
                        v.x = xp[0];
                        v.y = xp[1];
                        v.z = xp[2];
                        v.w = xp[3];
                    }
                }
                *reinterpret_cast<float4 *>(&xs[b][j]) = v;
            }
            __syncthreads();
#pragma unroll
            for (int h = 0; h < kCh; h++) {
                const int j0 = 256 * h + 8 * lane;
                if (j0 < tc) {
                    float w[kQRows][8];
#pragma unroll
                    for (int r = 0; r < kQRows; r++) {
                        if (rw + r < a.n_rows) {
                            dec8<T>(raw[r][h], c0 + j0, w[r]);
                        } else {
#pragma unroll
                            for (int e = 0; e < 8; e++) w[r][e] = 0.0f;
                        }
                    }
#pragma unroll
                    for (int b = 0; b < kQNB; b++) {
                        if (b < nt) {
                            const float4 x0 = *reinterpret_cast<const float4 *>(&xs[b][j0]);
                            const float4 x1 = *reinterpret_cast<const float4 *>(&xs[b][j0 + 4]);
#pragma unroll
                            for (int r = 0; r < kQRows; r++) {
                                float s = acc[r][b];
                                s = fmaf(w[r][0], x0.x, s);
                                s = fmaf(w[r][1], x0.y, s);
                                s = fmaf(w[r][2], x0.z, s);
                                s = fmaf(w[r][3], x0.w, s);
                                s = fmaf(w[r][4], x1.x, s);
                                s = fmaf(w[r][5], x1.y, s);
                                s = fmaf(w[r][6], x1.z, s);
                                s = fmaf(w[r][7], x1.w, s);
                                acc[r][b] = s;
                            }
                        }
                    }
                }
            }
        }
#pragma unroll
        for (int r = 0; r < kQRows; r++) {
            const int row = rw + r;
#pragma unroll
            for (int b = 0; b < kQNB; b++) {
                if (b < nt) {  // uniform: every lane reduces
                    const float v = warp_sum_t(acc[r][b]);
                    if (lane == 0 && row < a.n_rows) Y[(int64_t)(tb + b) * a.y_ld + row] = v;
                }
            }
        }
    }
}

// Group the step's (token, expert) pairs by expert: off[e] .. off[e+1] are expert e's pair slots, in token order;
// pair_tok[slot] = token, slot_of[t * K + k] = the slot of token t's k-th expert. One block; thread e fills
// expert e's slots by scanning every pair in order (deterministic).
__global__ void route_sort_kernel(const int *eids, int nb, int K, int NE, int *off, int *pair_tok, int *slot_of) {
    extern __shared__ int cnt[];  // NE + 1 counts, then the n = nb * K expert ids
    const int n = nb * K;
    int *ids = cnt + NE + 1;
    for (int e = threadIdx.x; e < NE; e += blockDim.x) cnt[e] = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) ids[i] = eids[i];
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += blockDim.x) atomicAdd(&cnt[ids[i]], 1);
    __syncthreads();
    if (threadIdx.x == 0) {
        int s = 0;
        for (int e = 0; e < NE; e++) {
            const int c = cnt[e];
            cnt[e] = s;
            s += c;
        }
        cnt[NE] = s;
    }
    __syncthreads();
    for (int e = threadIdx.x; e <= NE; e += blockDim.x) off[e] = cnt[e];
    for (int e = threadIdx.x; e < NE; e += blockDim.x) {
        int o = cnt[e];
        const int o_end = cnt[e + 1];
        for (int i = 0; i < n && o < o_end; i++) {
            if (ids[i] == e) {
                pair_tok[o] = i / K;
                slot_of[i] = o;
                o++;
            }
        }
    }
}

// 16-18 for the nb tokens of a step, from the grouped expert outputs: y = sum_k dn[slot_of[t, k]] * w[t, k]
// (k in ascending expert id, as moe_sum_post_kernel) + shared, then the HC post. grid (E blocks, nb).
__global__ void moe_sum_post_sorted_kernel(const float *dn, const int *slot_of, const float *ewt, int K, int E,
                                           const float *shared, const float *hcw, float *H, int hc) {
    const int t = blockIdx.y;
    slot_of += (size_t)t * K;
    ewt += (size_t)t * K;
    shared += (size_t)t * E;
    hcw += (size_t)t * kHcwLd;
    H += (size_t)t * hc * E;
    const float *post = hcw + hc, *comb = hcw + 2 * hc;
    for (int d = blockIdx.x * blockDim.x + threadIdx.x; d < E; d += gridDim.x * blockDim.x) {
        float acc = 0.0f;
        for (int k = 0; k < K; k++) acc += dn[(size_t)slot_of[k] * E + d] * ewt[k];
        const float yd = acc + shared[d];
        float h[kMaxHc];
        for (int j = 0; j < hc; j++) h[j] = H[(size_t)j * E + d];
        for (int k = 0; k < hc; k++) {
            float s = 0.0f;
            for (int j = 0; j < hc; j++) s += comb[j * hc + k] * h[j];
            H[(size_t)k * E + d] = post[k] * yd + s;
        }
    }
}

// MemAvailable of /proc/meminfo in bytes (0 if unreadable).
uint64_t mem_available_bytes() {
    FILE *f = std::fopen("/proc/meminfo", "r");
    if (!f) return 0;
    char line[256];
    unsigned long long kb = 0;
    while (std::fgets(line, sizeof line, f))
        if (std::sscanf(line, "MemAvailable: %llu kB", &kb) == 1) break;
    std::fclose(f);
    return (uint64_t)kb * 1024;
}

int env_int(const char *name, int dflt) {
    const char *v = std::getenv(name);
    return (v && *v) ? std::atoi(v) : dflt;
}

}  // namespace

// =============================================================================================================
// Model

class CudaModel {
public:
    const Model *host = nullptr;
    uint8_t *d_data = nullptr;  // the GGUF data section
    uint64_t data_bytes = 0;
    const uint8_t *h_data = nullptr;
    float *d_rope_main = nullptr, *d_rope_comp = nullptr;
    std::vector<float *> d_cmp_ape, d_idx_ape;  // per layer, dequantized to f32
    double load_s = 0.0;

    ~CudaModel() {
        cudaFree(d_data);
        cudaFree(d_rope_main);
        cudaFree(d_rope_comp);
        for (float *p : d_cmp_ape) cudaFree(p);
        for (float *p : d_idx_ape) cudaFree(p);
    }
    const uint8_t *dev(const Tensor &t) const {
        if (!t.present()) return nullptr;
        return d_data + (t.data - h_data);
    }
    const float *devf(const Tensor &t) const { return reinterpret_cast<const float *>(dev(t)); }
};

void CudaModelDeleter::operator()(CudaModel *m) const { delete m; }

namespace {

template <class T>
T *upload(const T *src, size_t n) {
    T *d = nullptr;
    DS4_CUDA_CHECK(cudaMalloc(&d, std::max<size_t>(n, 1) * sizeof(T)));
    if (n) DS4_CUDA_CHECK(cudaMemcpy(d, src, n * sizeof(T), cudaMemcpyHostToDevice));
    return d;
}

// Copy [src, src + n) host -> device through two pinned staging buffers filled by several host threads (pread
// from the file when fd >= 0, which skips the page faults of the mapping, else memcpy from the mapping); drop each
// chunk's page cache after its copy.
void staged_upload(uint8_t *dst, const uint8_t *src, uint64_t n, int fd, uint64_t file_off) {
    const size_t chunk = 256ull << 20;
    uint8_t *stage[2] = {nullptr, nullptr};
    cudaStream_t stream = nullptr;
    cudaEvent_t done[2] = {nullptr, nullptr};
    auto cleanup = [&] {
        for (int i = 0; i < 2; i++) {
            if (done[i]) cudaEventDestroy(done[i]);
            if (stage[i]) cudaFreeHost(stage[i]);
        }
        if (stream) cudaStreamDestroy(stream);
    };
    try {
        for (int i = 0; i < 2; i++) {
            DS4_CUDA_CHECK(cudaMallocHost(reinterpret_cast<void **>(&stage[i]), chunk));
            DS4_CUDA_CHECK(cudaEventCreateWithFlags(&done[i], cudaEventDisableTiming));
        }
        DS4_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
        const int n_thr = std::max(1, std::min(8, (int)std::thread::hardware_concurrency()));
        const long page = sysconf(_SC_PAGESIZE);
        int k = 0;
        for (uint64_t off = 0; off < n; off += chunk, k ^= 1) {
            const size_t len = (size_t)std::min<uint64_t>(chunk, n - off);
            DS4_CUDA_CHECK(cudaEventSynchronize(done[k]));  // the buffer's previous copy has finished
            std::vector<std::thread> thr;
            const size_t part = (len + n_thr - 1) / n_thr;
            for (int t = 0; t < n_thr; t++) {
                const size_t a = (size_t)t * part, b = std::min(len, a + part);
                if (a < b)
                    thr.emplace_back([&, a, b] {
                        size_t done = 0;
                        while (fd >= 0 && done < b - a) {
                            const ssize_t got = pread(fd, stage[k] + a + done, b - a - done,
                                                      (off_t)(file_off + off + a + done));
                            if (got <= 0) break;
                            done += (size_t)got;
                        }
                        if (done < b - a) std::memcpy(stage[k] + a + done, src + off + a + done, b - a - done);
                    });
            }
            for (auto &t : thr) t.join();
            DS4_CUDA_CHECK(cudaMemcpyAsync(dst + off, stage[k], len, cudaMemcpyHostToDevice, stream));
            DS4_CUDA_CHECK(cudaEventRecord(done[k], stream));
            // the bytes are in the staging buffer: let the kernel drop the file's pages (unified memory would
            // otherwise hold the model twice)
            const uintptr_t lo = ((uintptr_t)(src + off)) & ~(uintptr_t)(page - 1);
            madvise(reinterpret_cast<void *>(lo), (uintptr_t)(src + off + len) - lo, MADV_DONTNEED);
            if (fd >= 0) posix_fadvise(fd, (off_t)(file_off + off), (off_t)len, POSIX_FADV_DONTNEED);
        }
        DS4_CUDA_CHECK(cudaStreamSynchronize(stream));
    } catch (...) {
        cleanup();
        throw;
    }
    cleanup();
}

}  // namespace

CudaModelPtr cuda_model_load(const Model &m) {
    int n_dev = 0;
    if (cudaGetDeviceCount(&n_dev) != cudaSuccess || n_dev == 0) {
        cudaGetLastError();
        fail(DS4_E_BACKEND, "CUDA backend: no CUDA device available (use the cpu backend)");
    }
    const Hparams &hp = m.hp;
    // what the kernels support (the real model and the tiny test models are well inside)
    if (hp.hc_mult > kMaxHc) fail(DS4_E_MODEL, "CUDA backend: %d hyper-connection streams (max %d)", hp.hc_mult, kMaxHc);
    if (hp.head_dim % 32 || hp.head_dim > 32 * kMaxLaneVals)
        fail(DS4_E_MODEL, "CUDA backend: head_dim %d must be a multiple of 32 and <= %d", hp.head_dim, 32 * kMaxLaneVals);
    if (hp.n_expert_used > 16) fail(DS4_E_MODEL, "CUDA backend: %d experts per token (max 16)", hp.n_expert_used);
    auto plain = [](const Tensor &t) { return t.type == DS4_TYPE_F16 || t.type == DS4_TYPE_F32; };
    bool hc_ok = plain(m.out_hc_fn);
    for (const LayerWeights &w : m.layers) hc_ok = hc_ok && plain(w.hc_attn_fn) && plain(w.hc_ffn_fn);
    if (!hc_ok) fail(DS4_E_MODEL, "CUDA backend: hyper-connection fn tensors must be F16 or F32");
    const int et = m.tok_embd.type;
    if (et != DS4_TYPE_F16 && et != DS4_TYPE_F32 && et != DS4_TYPE_BF16)
        fail(DS4_E_MODEL, "CUDA backend: token_embd type %s is not supported (F16/F32/BF16)", type_name(et));

    auto cm = CudaModelPtr(new CudaModel);
    cm->host = &m;
    const GGUF &g = *m.gguf;
    cm->h_data = g.base() + g.data_offset();
    cm->data_bytes = g.file_size() - g.data_offset();

    size_t free_b = 0, total_b = 0;
    int dev = 0, integrated = 0;
    DS4_CUDA_CHECK(cudaGetDevice(&dev));
    DS4_CUDA_CHECK(cudaDeviceGetAttribute(&integrated, cudaDevAttrIntegrated, dev));
    if (integrated) {
        // unified memory (GB10): cudaMemGetInfo counts the page cache as used; drop this file's cached pages
        // (reclaimable anyway) and count MemAvailable
        const int fd0 = ::open(g.path().c_str(), O_RDONLY);
        if (fd0 >= 0) {
            posix_fadvise(fd0, 0, 0, POSIX_FADV_DONTNEED);
            ::close(fd0);
        }
    }
    DS4_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
    if (integrated) free_b = std::max<uint64_t>(free_b, mem_available_bytes());
    const uint64_t margin = std::min<uint64_t>(1ull << 30, cm->data_bytes / 4 + (64ull << 20));
    const uint64_t need = cm->data_bytes + margin;
    if (free_b < need)
        fail(DS4_E_NOMEM, "CUDA backend: the model needs %.2f GiB of GPU memory (weights %.2f GiB + %.2f GiB "
             "working room), the GPU has %.2f GiB free of %.2f GiB",
             gib(need), gib(cm->data_bytes), gib(margin), gib(free_b), gib(total_b));
    const auto t0 = std::chrono::steady_clock::now();
    DS4_CUDA_CHECK(cudaMalloc(&cm->d_data, cm->data_bytes));
    const int fd = env_int("DS4_KEEP_PAGECACHE", 0) ? -1 : ::open(g.path().c_str(), O_RDONLY);
    try {
        staged_upload(cm->d_data, cm->h_data, cm->data_bytes, fd, g.data_offset());
    } catch (...) {
        if (fd >= 0) ::close(fd);
        throw;
    }
    if (fd >= 0) ::close(fd);
    cm->load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

    cm->d_rope_main = upload(m.rope_main.inv_freq.data(), m.rope_main.inv_freq.size());
    cm->d_rope_comp = upload(m.rope_compress.inv_freq.data(), m.rope_compress.inv_freq.size());
    cm->d_cmp_ape.assign(hp.n_layer, nullptr);
    cm->d_idx_ape.assign(hp.n_layer, nullptr);
    for (int L = 0; L < hp.n_layer; L++) {
        const LayerWeights &w = m.layers[L];
        auto deq = [&](const Tensor &t) {
            // madvise above dropped our mapping's pages; reading them again faults them back in (small tensors)
            std::vector<float> v((size_t)(t.ne[0] * t.ne[1]));
            cpu_dequant_rows(t.type, t.data, t.ne[0], 0, t.ne[1], v.data());
            return upload(v.data(), v.size());
        };
        if (w.ratio) cm->d_cmp_ape[L] = deq(w.cmp_ape);
        if (w.csa) cm->d_idx_ape[L] = deq(w.idx_ape);
    }
    return cm;
}

double cuda_model_load_seconds(const CudaModel &m) { return m.load_s; }
uint64_t cuda_model_device_bytes(const CudaModel &m) { return m.data_bytes; }

// =============================================================================================================
// Session

class CudaSession {
public:
    CudaModel *cm = nullptr;
    const Model *M = nullptr;
    int max_ctx = 0;
    bool roundtrip = true;
    int pos = 0;
    std::vector<int32_t> tokens;
    cudaStream_t stream = nullptr;
    bool use_graphs = true;
    int bmax = 1;          // tokens per prefill step (DS4_CUDA_PREFILL_BATCH, 1 = token by token)
    bool gemm = false;     // DS4_CUDA_PREFILL_GEMM=1: batched steps use mmq_kernel and experts grouped by expert
    bool mm6 = false;      // DS4_CUDA_MM6=1 (default): of those, Q8_0 / Q2_K / IQ2_XXS on the tensor cores (cuda_mm6)
    void *x6 = nullptr;    // cuda_mm6's digit planes of x
    size_t x6_bytes = 0;
    int ring_rows = 0;     // raw-window ring slots: window + bmax - 1
    bool comp_seq = false; // DS4_CUDA_COMPRESS_SEQ=1: batched steps' compressors walk their tokens in one block
    int sm_count = 0;
    // graph keys: 0..3 = one token (head?, indexer?), 4..5 = a full prefill batch without head (indexer?)
    cudaGraphExec_t graphs[6] = {};
    bool seen[6] = {};

    // device memory
    std::vector<void *> allocs;
    float *state = nullptr, *state_init = nullptr;  // overwritten state (rings + compressor buffers)
    size_t state_floats = 0;
    std::vector<float *> ckpts;
    int ckpt_every = 0;
    uint64_t bytes = 0;

    struct LayerDev {
        float *ring = nullptr, *comp = nullptr, *idx = nullptr;
        float *ckv = nullptr, *csc = nullptr, *ikv = nullptr, *isc = nullptr;
    };
    std::vector<LayerDev> L;

    // scratch: every per-token buffer has bmax rows (a step of nb tokens uses rows 0..nb-1)
    Step *d_steps = nullptr;
    float *hc_part = nullptr;
    double *hc_ss = nullptr;
    int hc_chunks = 0, scores_ld = 0;
    float *H = nullptr, *hcw = nullptr, *a = nullptr, *qr = nullptr, *q = nullptr;
    float *kv = nullptr, *o = nullptr, *low = nullptr, *y = nullptr, *cc = nullptr, *cz = nullptr, *ic = nullptr;
    float *iz = nullptr, *qi = nullptr, *wi = nullptr, *scores = nullptr, *glog = nullptr, *ewt = nullptr;
    float *gt = nullptr, *up = nullptr, *mb = nullptr, *dn = nullptr;  // one token at a time
    float *ysh = nullptr, *z = nullptr, *logits = nullptr;
    float *shg = nullptr, *shu = nullptr, *shm = nullptr;  // shared expert of a batched step: [bmax][n_ff]
    // routed experts of a batched step grouped by expert (gemm): pair slots [bmax * K]
    int *e_off = nullptr, *pair_tok = nullptr, *slot_of = nullptr;
    float *gts = nullptr, *ups = nullptr, *mbs = nullptr, *dns = nullptr;
    int *sel = nullptr, *n_sel = nullptr, *eids = nullptr;
    size_t idx_smem = 0;

    ~CudaSession() {
        for (auto &g : graphs)
            if (g) cudaGraphExecDestroy(g);
        if (stream) cudaStreamDestroy(stream);
        for (void *p : allocs) cudaFree(p);
    }

    template <class T>
    T *alloc(size_t n) {
        void *p = nullptr;
        DS4_CUDA_CHECK(cudaMalloc(&p, std::max<size_t>(n, 4) * sizeof(T)));
        allocs.push_back(p);
        bytes += std::max<size_t>(n, 4) * sizeof(T);
        return static_cast<T *>(p);
    }

    void init();
    void enqueue_step(int nb, bool idx_active);
    void enqueue_head(int t);
    void mm(const Tensor &w, const float *X, int64_t x_ld, float *Y, int64_t y_ld, int nb, int64_t rpg = 0,
            int64_t xgs = 0);
    void run_step(const int32_t *toks, int nb, bool head, float *logits_out);
    void reset_state();
    void routed_grouped(const LayerWeights &w, int nb, float lim);
};

void CudaSessionDeleter::operator()(CudaSession *s) const { delete s; }

void CudaSession::init() {
    const Hparams &hp = M->hp;
    const int E = hp.n_embd, hc = hp.hc_mult, D = hp.n_head, hd = hp.head_dim;
    DS4_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    use_graphs = env_int("DS4_CUDA_GRAPHS", 1) != 0;
    bmax = std::max(1, std::min(kMaxBatch, env_int("DS4_CUDA_PREFILL_BATCH", kDefaultBatch)));
    gemm = env_int("DS4_CUDA_PREFILL_GEMM", 1) != 0;
    mm6 = gemm && env_int("DS4_CUDA_MM6", 1) != 0;
    comp_seq = env_int("DS4_CUDA_COMPRESS_SEQ", 0) != 0;
    ring_rows = hp.window + bmax - 1;
    int dev = 0;
    DS4_CUDA_CHECK(cudaGetDevice(&dev));
    DS4_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, dev));

    // ---- overwritten state: one arena, with its initial image (rings 0, compressor values 0, scores -inf) ----
    std::vector<float> init_img;
    struct Off {
        size_t ring, ckv, csc, ikv, isc;
    };
    std::vector<Off> offs(hp.n_layer);
    auto take = [&](size_t n, float v) {
        const size_t at = init_img.size();
        init_img.resize(at + ((n + 63) & ~(size_t)63), v);  // 256-byte aligned pieces
        return at;
    };
    for (int l = 0; l < hp.n_layer; l++) {
        const LayerWeights &w = M->layers[l];
        Off &of = offs[l];
        of = {0, SIZE_MAX, SIZE_MAX, SIZE_MAX, SIZE_MAX};
        of.ring = take((size_t)ring_rows * hd, 0.0f);
        if (w.ratio) {
            const int slots = w.csa ? 2 * w.ratio : w.ratio;
            const int width = (w.csa ? 2 : 1) * hd;
            of.ckv = take((size_t)slots * width, 0.0f);
            of.csc = take((size_t)slots * width, kNegInf);
            if (w.csa) {
                of.ikv = take((size_t)slots * 2 * hp.idx_dim, 0.0f);
                of.isc = take((size_t)slots * 2 * hp.idx_dim, kNegInf);
            }
        }
    }
    state_floats = init_img.size();
    // checkpoints (as the CPU session: at most 16, at least every 32 positions)
    ckpt_every = std::max(32, (max_ctx + 15) / 16);
    // v2 prefill: checkpoints on multiples of the batch, so steps are never cut short (a 1-token remainder step
    // would run the whole decode path); any spacing gives the same truncate semantics
    if (gemm && bmax > 1) ckpt_every = (ckpt_every + bmax - 1) / bmax * bmax;
    const int n_ckpt = (max_ctx - 1) / ckpt_every;

    // ---- rows and scratch sizes, then the free-memory check before allocating ----
    uint64_t rows_floats = 0;
    for (int l = 0; l < hp.n_layer; l++) {
        const LayerWeights &w = M->layers[l];
        if (!w.ratio) continue;
        const size_t n_rows = (size_t)(max_ctx / w.ratio) + 1;
        rows_floats += n_rows * hd + (w.csa ? n_rows * hp.idx_dim : 0);
    }
    scores_ld = (int)(((size_t)max_ctx / std::max(1, hp.csa_ratio) + 4) & ~(size_t)3);
    const uint64_t need = (rows_floats + state_floats * (2 + (uint64_t)n_ckpt) + (uint64_t)bmax * scores_ld) * 4 +
                          (64ull << 20);
    size_t free_b = 0, total_b = 0;
    DS4_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
    if (free_b < need)
        fail(DS4_E_NOMEM, "CUDA session of %d positions needs %.2f GiB of GPU memory, %.2f GiB free", max_ctx,
             gib(need), gib(free_b));

    state = alloc<float>(state_floats);
    state_init = alloc<float>(state_floats);
    DS4_CUDA_CHECK(cudaMemcpy(state_init, init_img.data(), state_floats * 4, cudaMemcpyHostToDevice));
    DS4_CUDA_CHECK(cudaMemcpy(state, init_img.data(), state_floats * 4, cudaMemcpyHostToDevice));
    for (int k = 0; k < n_ckpt; k++) ckpts.push_back(alloc<float>(state_floats));
    L.resize(hp.n_layer);
    for (int l = 0; l < hp.n_layer; l++) {
        const LayerWeights &w = M->layers[l];
        LayerDev &d = L[l];
        const Off &of = offs[l];
        d.ring = state + of.ring;
        if (w.ratio) {
            d.ckv = state + of.ckv;
            d.csc = state + of.csc;
            const size_t n_rows = (size_t)(max_ctx / w.ratio) + 1;
            d.comp = alloc<float>(n_rows * hd);
            DS4_CUDA_CHECK(cudaMemset(d.comp, 0, n_rows * hd * 4));
            if (w.csa) {
                d.ikv = state + of.ikv;
                d.isc = state + of.isc;
                d.idx = alloc<float>(n_rows * hp.idx_dim);
                DS4_CUDA_CHECK(cudaMemset(d.idx, 0, n_rows * hp.idx_dim * 4));
            }
        }
    }

    // ---- scratch ----
    const int QR = hp.q_lora_rank, G = hp.o_groups, OR = hp.o_lora_rank, IH = hp.idx_heads, ID = hp.idx_dim;
    const int NE = hp.n_expert, K = hp.n_expert_used, F = hp.n_ff;
    const size_t B = bmax;
    int max_comp = 0;  // most compressed rows any layer can see
    for (int l = 0; l < hp.n_layer; l++) {
        const LayerWeights &w = M->layers[l];
        if (w.ratio) max_comp = std::max(max_comp, w.csa ? std::min(max_ctx / w.ratio, hp.idx_topk) : max_ctx / w.ratio);
    }
    d_steps = alloc<Step>(B);
    hc_chunks = (hc * E + kHcChunk - 1) / kHcChunk;
    hc_part = alloc<float>(B * hc_chunks * hp.hc_mix());
    hc_ss = alloc<double>(B * hc_chunks);
    H = alloc<float>(B * hc * E);
    hcw = alloc<float>(B * kHcwLd);
    a = alloc<float>(B * E);
    qr = alloc<float>(B * QR);
    q = alloc<float>(B * D * hd);
    kv = alloc<float>(B * hd);
    o = alloc<float>(B * D * hd);
    low = alloc<float>(B * G * OR);
    y = alloc<float>(B * E);
    cc = alloc<float>(B * 2 * hd);
    cz = alloc<float>(B * 2 * hd);
    ic = alloc<float>(B * 2 * ID);
    iz = alloc<float>(B * 2 * ID);
    qi = alloc<float>(B * IH * ID);
    wi = alloc<float>(B * IH);
    scores = alloc<float>(B * scores_ld);
    sel = alloc<int>(B * hp.idx_topk);
    n_sel = alloc<int>(B);
    glog = alloc<float>(B * NE);
    eids = alloc<int>(B * K);
    ewt = alloc<float>(B * K);
    gt = alloc<float>((size_t)(K + 1) * F);  // routed experts 0..K-1, then the shared expert
    up = alloc<float>((size_t)(K + 1) * F);
    mb = alloc<float>((size_t)(K + 1) * F);
    dn = alloc<float>((size_t)K * E);
    ysh = alloc<float>(B * E);
    if (bmax > 1) {
        shg = alloc<float>(B * F);
        shu = alloc<float>(B * F);
        shm = alloc<float>(B * F);
    }
    if (bmax > 1 && gemm) {
        e_off = alloc<int>((size_t)NE + 1);
        pair_tok = alloc<int>(B * K);
        slot_of = alloc<int>(B * K);
        gts = alloc<float>(B * K * F);
        ups = alloc<float>(B * K * F);
        mbs = alloc<float>(B * K * F);
        dns = alloc<float>(B * K * E);
        if (mm6) {  // the widest x of a batched product: the grouped output projection's, or the experts' down input
            const int64_t wide = std::max<int64_t>({(int64_t)E, (int64_t)hp.q_lora_rank, (int64_t)D * hd,
                                                    (int64_t)hp.o_groups * hp.o_lora_rank, (int64_t)F});
            x6_bytes = std::max(cuda_mm6_scratch((int64_t)B, wide), cuda_mm6_scratch((int64_t)B * K, F));
            x6 = alloc<uint8_t>(x6_bytes);
        }
    }
    z = alloc<float>(E);
    logits = alloc<float>(hp.n_vocab);

    const int max_rows = hp.window + max_comp;
    const size_t attn_smem_max = (size_t)(((max_rows + 3) & ~3) + (kAttnWarps + 1) * hd) * 4;
    idx_smem = ((size_t)IH * (ID + 1) + kIdxThreads / 32 * (size_t)ID) * 4;  // q, then a key row per warp
    if (attn_smem_max > 48 * 1024)
        DS4_CUDA_CHECK(cudaFuncSetAttribute(attention_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)attn_smem_max));
    const size_t attn_mh_smem_max = (size_t)(kAttnHeads * ((max_rows + 3) & ~3) + (kAttnWarps + 1) * hd) * 4;
    if (attn_mh_smem_max > 48 * 1024)
        DS4_CUDA_CHECK(cudaFuncSetAttribute(attention_mh_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            (int)attn_mh_smem_max));
    if (idx_smem > 48 * 1024)
        DS4_CUDA_CHECK(cudaFuncSetAttribute(idx_score_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)idx_smem));
    const size_t e_smem = (size_t)E * 4;
    if (e_smem > 48 * 1024) {
        DS4_CUDA_CHECK(cudaFuncSetAttribute(hc_pre_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)e_smem));
        DS4_CUDA_CHECK(cudaFuncSetAttribute(head_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)e_smem));
    }
    bytes += (uint64_t)max_ctx * 4;  // the token list on the host
    DS4_CUDA_CHECK(cudaDeviceSynchronize());
}

void CudaSession::reset_state() {
    DS4_CUDA_CHECK(cudaMemcpyAsync(state, state_init, state_floats * 4, cudaMemcpyDeviceToDevice, stream));
}

namespace {
void mv(const CudaModel &cm, const Tensor &t, const float *x, float *y, cudaStream_t s) {
    cuda_matvec(t.type, cm.dev(t), t.ne[1], t.ne[0], x, y, s);
}

// ya = Wa x and yb = Wb x in one launch when the two matrices have one type and shape (the expert matvec with a
// single "expert" 0 and a zero stride), else two launches.
void mv2(const CudaModel &cm, const Tensor &wa, const Tensor &wb, const float *x, float *ya, float *yb,
         cudaStream_t s) {
    if (wa.type != wb.type || wa.ne[0] != wb.ne[0] || wa.ne[1] != wb.ne[1]) {
        mv(cm, wa, x, ya, s);
        mv(cm, wb, x, yb, s);
        return;
    }
    ExpertMatvec p;
    p.W[0] = cm.dev(wa);
    p.W[1] = cm.dev(wb);
    p.y[0] = ya;
    p.y[1] = yb;
    p.n_mats = 2;
    p.expert_stride = 0;
    p.n_rows = wa.ne[1];
    p.n_cols = wa.ne[0];
    p.ids = nullptr;  // the identity: no ids to load before the weights
    p.ids_settled = true;
    p.n_ids = 1;
    p.x = x;
    p.x_stride = 0;
    cuda_matvec_experts(wa.type, p, s);
}

// Grouped matvec of one token: rows [g * rpg, (g+1) * rpg) of w take x + g * xgs (one launch).
void mv_grouped(const CudaModel &cm, const Tensor &w, const float *x, float *y, int64_t rpg, int64_t xgs,
                cudaStream_t s) {
    ExpertMatvec p;
    p.W[0] = cm.dev(w);
    p.y[0] = y;
    p.n_mats = 1;
    p.expert_stride = rpg * (int64_t)row_bytes(w.type, w.ne[0]);
    p.n_rows = rpg;
    p.n_cols = w.ne[0];
    p.ids = nullptr;  // the identity: no ids to load before the weights
    p.ids_settled = true;
    p.n_ids = (int)(w.ne[1] / rpg);
    p.x = x;
    p.x_stride = xgs;
    cuda_matvec_experts(w.type, p, s);
}

// partial HC mix of fn (rows x n) with nb token states H (see hc_mix_partial_kernel)
void hc_mix(const CudaModel &cm, const Tensor &fn, const float *H, int n_chunks, int nb, float *part, double *ss,
            cudaStream_t s) {
    const int n = (int)fn.ne[0], rows = (int)fn.ne[1];
    const dim3 grid(n_chunks, nb);
    if (fn.type == DS4_TYPE_F16)
        hc_mix_partial_kernel<DS4_TYPE_F16><<<grid, kHcThreads, 0, s>>>(cm.dev(fn), H, n, rows, part, ss);
    else
        hc_mix_partial_kernel<DS4_TYPE_F32><<<grid, kHcThreads, 0, s>>>(cm.dev(fn), H, n, rows, part, ss);
}
}  // namespace

namespace {
// mmq_kernel handles the type, and its loads are aligned for these weights (2-byte loads; F32 4-byte).
bool mmq_ok(int type, const uint8_t *W, size_t rb, int64_t n_cols) {
    if (n_cols % 8) return false;
    switch (type) {
        case DS4_TYPE_F32: return (uintptr_t)W % 4 == 0 && rb % 4 == 0;
        case DS4_TYPE_F16: case DS4_TYPE_Q8_0: case DS4_TYPE_Q2_K: case DS4_TYPE_Q4_K: case DS4_TYPE_IQ2_XXS:
            return (uintptr_t)W % 2 == 0 && rb % 2 == 0;
        default: return false;
    }
}

void mmq_launch(int type, const MmqArgs &p, dim3 grid, cudaStream_t s) {
    switch (type) {
        case DS4_TYPE_F32: mmq_kernel<DS4_TYPE_F32><<<grid, 32 * kQWarps, 0, s>>>(p); break;
        case DS4_TYPE_F16: mmq_kernel<DS4_TYPE_F16><<<grid, 32 * kQWarps, 0, s>>>(p); break;
        case DS4_TYPE_Q8_0: mmq_kernel<DS4_TYPE_Q8_0><<<grid, 32 * kQWarps, 0, s>>>(p); break;
        case DS4_TYPE_Q2_K: mmq_kernel<DS4_TYPE_Q2_K><<<grid, 32 * kQWarps, 0, s>>>(p); break;
        case DS4_TYPE_Q4_K: mmq_kernel<DS4_TYPE_Q4_K><<<grid, 32 * kQWarps, 0, s>>>(p); break;
        case DS4_TYPE_IQ2_XXS: mmq_kernel<DS4_TYPE_IQ2_XXS><<<grid, 32 * kQWarps, 0, s>>>(p); break;
        default: fail(DS4_E_BACKEND, "mmq: type %s", type_name(type));
    }
    DS4_CUDA_CHECK(cudaGetLastError());
}
}  // namespace

// Y[b * y_ld + r] = w[r] . X[b * x_ld + (r / rpg) * xgs ...] for the nb tokens of a step (rpg = 0: one group).
// One token: the decode kernels of cuda/quant.cu. Several: mm_kernel for F32/F16/Q8_0, else one matvec per token.
void CudaSession::mm(const Tensor &w, const float *X, int64_t x_ld, float *Y, int64_t y_ld, int nb, int64_t rpg,
                     int64_t xgs) {
    const CudaModel &C = *cm;
    const int64_t n_rows = w.ne[1], n_cols = w.ne[0];
    if (rpg <= 0) rpg = n_rows;
    const bool grouped = rpg < n_rows;
    const size_t rb = row_bytes(w.type, n_cols);
    const uint8_t *W = C.dev(w);
    const bool plain_ok = (w.type == DS4_TYPE_F32 || w.type == DS4_TYPE_F16)
                              ? ((uintptr_t)W % 16 == 0 && rb % 16 == 0 && n_cols % 8 == 0)
                              : w.type == DS4_TYPE_Q8_0;
    if (nb > 1 && mm6) {
        Mm6Args p;
        p.type = w.type;
        p.W[0] = W;
        p.Y[0] = Y;
        p.n_rows = n_rows;
        p.n_cols = n_cols;
        p.X = X;
        p.x_ld = x_ld;
        p.n_x = nb;
        p.rpg = grouped ? rpg : 0;
        p.xgs = xgs;
        p.n_tok = nb;
        p.y_ld = y_ld;
        p.scratch = x6;
        p.scratch_bytes = x6_bytes;
        if (cuda_mm6(p, stream)) return;
    }
    if (nb > 1 && gemm && mmq_ok(w.type, W, rb, n_cols) && rpg % kQBlockRows == 0 && n_rows < (1ll << 31) &&
        (n_rows + kQBlockRows - 1) / kQBlockRows <= 65535) {
        MmqArgs p{};
        p.W[0] = W;
        p.Y[0] = Y;
        p.rb = rb;
        p.n_rows = (int)n_rows;
        p.n_cols = (int)n_cols;
        p.X = X;
        p.x_ld = x_ld;
        p.rpg = (int)rpg;
        p.xgs = xgs;
        p.n_tok = nb;
        p.y_ld = y_ld;
        p.x_vec = (uintptr_t)X % 16 == 0 && x_ld % 4 == 0 && xgs % 4 == 0;
        mmq_launch(w.type, p, dim3((nb + kQNB - 1) / kQNB, (unsigned)((n_rows + kQBlockRows - 1) / kQBlockRows), 1),
                   stream);
        return;
    }
    if (nb > 1 && plain_ok && rpg % kMmRows == 0 && n_rows < (1ll << 31)) {
        const int grid = (int)std::max<int64_t>(1, std::min<int64_t>((n_rows + kMmRows - 1) / kMmRows, (int64_t)sm_count * 8));
        auto launch = [&](auto kernel) {
            for (int b0 = 0; b0 < nb; b0 += kMmBatch)
                kernel<<<grid, 32 * kMmWarps, 0, stream>>>(W, rb, (int)n_rows, (int)n_cols, X + b0 * x_ld, x_ld,
                                                           Y + b0 * y_ld, y_ld, std::min(kMmBatch, nb - b0),
                                                           (int)rpg, xgs);
        };
        if (w.type == DS4_TYPE_F32) launch(mm_kernel<DS4_TYPE_F32>);
        else if (w.type == DS4_TYPE_F16) launch(mm_kernel<DS4_TYPE_F16>);
        else launch(mm_kernel<DS4_TYPE_Q8_0>);
        DS4_CUDA_CHECK(cudaGetLastError());
        return;
    }
    for (int b = 0; b < nb; b++) {
        if (grouped)
            mv_grouped(C, w, X + b * x_ld, Y + b * y_ld, rpg, xgs, stream);
        else
            cuda_matvec(w.type, W, n_rows, n_cols, X + b * x_ld, Y + b * y_ld, stream);
    }
}

// 16-18 for the nb tokens of a batched step (gemm): the (token, expert) pairs sorted by expert, each used expert's
// gate/up/down as one product over its tokens (its weights read once per step), then the weighted sum in
// ascending expert id + the shared expert (ysh, computed before) + the HC post.
void CudaSession::routed_grouped(const LayerWeights &w, int nb, float lim) {
    const CudaModel &C = *cm;
    const Hparams &hp = M->hp;
    const int E = hp.n_embd, hc = hp.hc_mult, K = hp.n_expert_used, F = hp.n_ff, NE = hp.n_expert;
    cudaStream_t s = stream;
    const int n_pairs = nb * K;
    route_sort_kernel<<<1, 256, (size_t)(NE + 1 + n_pairs) * 4, s>>>(eids, nb, K, NE, e_off, pair_tok, slot_of);
    DS4_CUDA_CHECK(cudaGetLastError());
    auto experts = [&](const Tensor *W0, const Tensor *W1, const float *X, int64_t x_ld, const int *x_idx, float *Y0,
                       float *Y1, int64_t n_rows, int64_t n_cols) {
        const size_t rb = row_bytes(W0->type, n_cols);
        const uint8_t *d0 = C.dev(*W0);
        const bool pair = W1 && W1->type == W0->type;
        if (mm6) {
            Mm6Args q;
            q.type = W0->type;
            q.W[0] = d0;
            q.Y[0] = Y0;
            if (pair) {
                q.W[1] = C.dev(*W1);
                q.Y[1] = Y1;
                q.n_mats = 2;
            }
            q.n_rows = n_rows;
            q.n_cols = n_cols;
            q.expert_stride = (int64_t)(n_rows * rb);
            q.off = e_off;
            q.n_experts = NE;
            q.X = X;
            q.x_ld = x_ld;
            q.n_x = x_idx ? nb : n_pairs;
            q.x_idx = x_idx;
            q.n_tok = n_pairs;
            q.y_ld = n_rows;
            q.scratch = x6;
            q.scratch_bytes = x6_bytes;
            if ((!W1 || pair) && cuda_mm6(q, s)) return;
        }
        if (!mmq_ok(W0->type, d0, rb, n_cols) || (rb * n_rows) % 2)
            fail(DS4_E_BACKEND, "grouped experts: type %s unsupported", type_name(W0->type));
        MmqArgs p{};
        p.W[0] = d0;
        p.Y[0] = Y0;
        if (pair) {
            p.W[1] = C.dev(*W1);
            p.Y[1] = Y1;
        }
        p.rb = rb;
        p.expert_stride = (int64_t)(n_rows * rb);
        p.n_rows = (int)n_rows;
        p.n_cols = (int)n_cols;
        p.X = X;
        p.x_ld = x_ld;
        p.rpg = (int)n_rows;
        p.x_idx = x_idx;
        p.off = e_off;
        p.n_tok = n_pairs;
        p.y_ld = n_rows;
        p.x_vec = (uintptr_t)X % 16 == 0 && x_ld % 4 == 0;
        mmq_launch(W0->type, p, dim3((unsigned)((n_rows + kQBlockRows - 1) / kQBlockRows), NE, pair ? 2 : 1), s);
        if (W1 && !pair) {  // gate and up of different types: a second launch
            const size_t rb1 = row_bytes(W1->type, n_cols);
            if (!mmq_ok(W1->type, C.dev(*W1), rb1, n_cols))
                fail(DS4_E_BACKEND, "grouped experts: type %s unsupported", type_name(W1->type));
            p.W[0] = C.dev(*W1);
            p.Y[0] = Y1;
            p.rb = rb1;
            p.expert_stride = (int64_t)(n_rows * rb1);
            mmq_launch(W1->type, p, dim3((unsigned)((n_rows + kQBlockRows - 1) / kQBlockRows), NE, 1), s);
        }
    };
    experts(&w.gate_exps, &w.up_exps, a, E, pair_tok, gts, ups, F, E);
    swiglu_kernel<<<(n_pairs * F + 255) / 256, 256, 0, s>>>(gts, ups, n_pairs * F, lim, mbs);
    experts(&w.down_exps, nullptr, mbs, F, nullptr, dns, nullptr, E, F);
    moe_sum_post_sorted_kernel<<<dim3((E + 255) / 256, nb), 256, 0, s>>>(dns, slot_of, ewt, K, E, ysh, hcw, H, hc);
    DS4_CUDA_CHECK(cudaGetLastError());
}

// The launches of one step of nb tokens (facts D steps 0-18; the head is enqueue_head). Everything
// position-dependent reads the step records d_steps[0..nb) on the device, so a captured step replays for any
// positions.
void CudaSession::enqueue_step(int nb, bool idx_active) {
    const CudaModel &C = *cm;
    const Hparams &hp = M->hp;
    const int E = hp.n_embd, hc = hp.hc_mult, D = hp.n_head, hd = hp.head_dim, nrot = hp.n_rot;
    const int G = hp.o_groups, OR = hp.o_lora_rank, in_g = D * hd / G, QR = hp.q_lora_rank;
    const int IH = hp.idx_heads, ID = hp.idx_dim, K = hp.n_expert_used, F = hp.n_ff, NE = hp.n_expert;
    const int HCE = hc * E;
    const float eps = hp.rms_eps;
    cudaStream_t s = stream;
    const int ew_grid = (E + 255) / 256;
    const size_t e_smem = (size_t)E * 4;
    const bool one = nb == 1;
    // 7. and 8.: a compressor; one token walks its state (compressor_kernel), a batched step runs in parallel
    auto compress = [&](const float *cx, const float *cz_, int c_ld, int n, const float *ape, int ratio, int csa,
                        int head, float *kv_state, float *sc_state, const float *norm_w, float eps_, int n_rot,
                        int rt, float *rows_out, int threads) {
        if (n == 1 || comp_seq) {
            compressor_kernel<<<1, threads, head * 4, s>>>(cx, cz_, c_ld, n, ape, ratio, csa, head, d_steps, kv_state,
                                                           sc_state, norm_w, eps_, n_rot, C.d_rope_comp, rt, rows_out);
        } else {
            compressor_rows_kernel<<<n / ratio + 1, threads, head * 4, s>>>(cx, cz_, c_ld, n, ape, ratio, csa, head,
                                                                            d_steps, kv_state, sc_state, norm_w, eps_,
                                                                            n_rot, C.d_rope_comp, rt, rows_out);
            const int width = (csa ? 2 : 1) * head;
            compressor_state_kernel<<<(ratio * width + 255) / 256, 256, 0, s>>>(cx, cz_, c_ld, n, ape, ratio, csa,
                                                                                head, d_steps, kv_state, sc_state);
        }
        DS4_CUDA_CHECK(cudaGetLastError());
    };

    // 0. embedding into every stream
    embed_kernel<<<dim3(ew_grid, nb), 256, 0, s>>>(C.dev(M->tok_embd), M->tok_embd.type, E, hc, d_steps, H);
    for (int l = 0; l < hp.n_layer; l++) {
        const LayerWeights &w = M->layers[l];
        const LayerDev &ld = L[l];
        const float *rope = hp.ratios[l] ? C.d_rope_comp : C.d_rope_main;
        const int r = w.ratio;

        // 1-2. HC pre, a = RMS(x_in) * attn_norm
        hc_mix(C, w.hc_attn_fn, H, hc_chunks, nb, hc_part, hc_ss, s);
        hc_pre_kernel<<<nb, 1024, e_smem, s>>>(hc_part, hc_ss, hc_chunks, C.devf(w.hc_attn_scale),
                                               C.devf(w.hc_attn_base), H, C.devf(w.attn_norm), E, hc, hp.hc_iters,
                                               hp.hc_eps, eps, hcw, a);
        // 3. qr = RMS(q_a a) * q_a_norm; q = q_b qr; per-head RMS + RoPE (5)
        if (one) mv(C, w.q_a, a, qr, s);
        else mm(w.q_a, a, E, qr, QR, nb);
        rows_rms_rope_kernel<<<nb, 256, QR * 4, s>>>(qr, QR, C.devf(w.q_a_norm), eps, 0, nullptr, d_steps, 1);
        if (one) mv(C, w.q_b, qr, q, s);
        else mm(w.q_b, qr, QR, q, (int64_t)D * hd, nb);
        rows_rms_rope_kernel<<<nb * D, 128, hd * 4, s>>>(q, hd, nullptr, eps, nrot, rope, d_steps, D);
        // 4-6. kv: RMS * kv_norm, RoPE, round-trip, into the raw window ring
        if (one) mv(C, w.kv, a, kv, s);
        else mm(w.kv, a, E, kv, hd, nb);
        kv_kernel<<<nb, 256, hd * 4, s>>>(kv, hd, C.devf(w.kv_norm), eps, nrot, rope, d_steps, roundtrip ? 1 : 0,
                                          ring_rows, ld.ring);
        // 7. compressor (the step's tokens in order)
        if (r) {
            if (one) {
                mv2(C, w.cmp_kv, w.cmp_gate, a, cc, cz, s);
            } else {
                mm(w.cmp_kv, a, E, cc, 2 * hd, nb);
                mm(w.cmp_gate, a, E, cz, 2 * hd, nb);
            }
            compress(cc, cz, 2 * hd, nb, C.d_cmp_ape[l], r, w.csa ? 1 : 0, hd, ld.ckv, ld.csc, C.devf(w.cmp_norm),
                     eps, nrot, roundtrip ? 1 : 0, ld.comp, 512);
        }
        // 8-9. indexer compressor; indexer selection once more than top-k rows are visible (a token of the step
        // that still sees <= top-k rows gets all of them from the top-k kernel)
        bool use_sel = false;
        if (w.csa) {
            if (one) {
                mv2(C, w.idx_kv, w.idx_gate, a, ic, iz, s);
            } else {
                mm(w.idx_kv, a, E, ic, 2 * ID, nb);
                mm(w.idx_gate, a, E, iz, 2 * ID, nb);
            }
            compress(ic, iz, 2 * ID, nb, C.d_idx_ape[l], r, 1, ID, ld.ikv, ld.isc, C.devf(w.idx_norm), eps, nrot,
                     roundtrip ? 2 : 0, ld.idx, 256);
            if (idx_active) {
                use_sel = true;
                if (one) {
                    mv(C, w.idx_q_b, qr, qi, s);
                    mv(C, w.idx_proj, a, wi, s);
                } else {
                    mm(w.idx_q_b, qr, QR, qi, (int64_t)IH * ID, nb);
                    mm(w.idx_proj, a, E, wi, IH, nb);
                }
                idx_q_kernel<<<nb * IH, 128, ID * 4, s>>>(qi, ID, nrot, C.d_rope_comp, d_steps, roundtrip ? 1 : 0, IH);
                const int n_rows_max = max_ctx / r + 1;
                const int grid = std::max(1, std::min(132, (n_rows_max + kIdxThreads / 32 - 1) / (kIdxThreads / 32)));
                idx_score_kernel<<<dim3(grid, nb), kIdxThreads, idx_smem, s>>>(qi, wi, ld.idx, IH, ID, r,
                                                                      1.0f / std::sqrt((float)ID),
                                                                      1.0f / std::sqrt((float)IH), d_steps, scores,
                                                                      scores_ld);
                topk_kernel<<<nb, kTopkThreads, 0, s>>>(scores, scores_ld, r, hp.idx_topk, d_steps, sel, n_sel);
            }
        }
        // 10-11. attention with sinks, inverse RoPE
        {
            // visible compressed rows: csa layers see at most top-k (all rows while n_comp <= top-k), hca all
            int max_vis = 0;
            if (r) max_vis = w.csa ? std::min(max_ctx / r, hp.idx_topk) : max_ctx / r;
            const int max_rows = hp.window + max_vis;
            if (!one && gemm && D % kAttnHeads == 0) {
                const size_t smem = (size_t)(kAttnHeads * ((max_rows + 3) & ~3) + (kAttnWarps + 1) * hd) * 4;
                attention_mh_kernel<<<dim3(D / kAttnHeads, nb), 32 * kAttnWarps, smem, s>>>(
                    q, ld.ring, ld.comp, sel, n_sel, use_sel ? 1 : 0, hp.idx_topk, r, hp.window, ring_rows, hd, nrot,
                    C.devf(w.sinks), rope, 1.0f / std::sqrt((float)hd), d_steps, o);
            } else {
                const size_t smem = (size_t)(((max_rows + 3) & ~3) + (kAttnWarps + 1) * hd) * 4;
                attention_kernel<<<dim3(D, nb), 32 * kAttnWarps, smem, s>>>(
                    q, ld.ring, ld.comp, sel, n_sel, use_sel ? 1 : 0, hp.idx_topk, r, hp.window, ring_rows, hd,
                    nrot, C.devf(w.sinks), rope, 1.0f / std::sqrt((float)hd), d_steps, o);
            }
        }
        // 12. grouped output projection (group g = rows g*OR.. with the heads of g), then out_b
        if (one) mv_grouped(C, w.out_a, o, low, OR, in_g, s);
        else mm(w.out_a, o, (int64_t)D * hd, low, (int64_t)G * OR, nb, OR, in_g);
        if (one) mv(C, w.out_b, low, y, s);
        else mm(w.out_b, low, (int64_t)G * OR, y, E, nb);
        // 13. HC post
        hc_post_kernel<<<dim3(ew_grid, nb), 256, 0, s>>>(hcw, y, H, E, hc);

        // 14. FFN HC pre, n = RMS(x_f) * ffn_norm (into a)
        hc_mix(C, w.hc_ffn_fn, H, hc_chunks, nb, hc_part, hc_ss, s);
        hc_pre_kernel<<<nb, 1024, e_smem, s>>>(hc_part, hc_ss, hc_chunks, C.devf(w.hc_ffn_scale),
                                               C.devf(w.hc_ffn_base), H, C.devf(w.ffn_norm), E, hc, hp.hc_iters,
                                               hp.hc_eps, eps, hcw, a);
        // 15. router
        if (one) mv(C, w.gate_inp, a, glog, s);
        else mm(w.gate_inp, a, E, glog, NE, nb);
        const bool hash = w.tid2eid.present() && l < hp.n_hash;
        router_kernel<<<nb, 256, (size_t)2 * NE * 4, s>>>(glog, NE, K,
                                                         w.exp_bias.present() ? C.devf(w.exp_bias) : nullptr,
                                                         hash ? reinterpret_cast<const int32_t *>(C.dev(w.tid2eid)) : nullptr,
                                                         d_steps, hp.expert_scale, roundtrip ? 1 : 0, eids, ewt);
        // 17 (batched step): the shared expert of all tokens at once
        const float lim = hp.swiglu_limit[l];
        if (!one) {
            mm(w.gate_sh, a, E, shg, F, nb);
            mm(w.up_sh, a, E, shu, F, nb);
            swiglu_kernel<<<(nb * F + 255) / 256, 256, 0, s>>>(shg, shu, nb * F, lim, shm);
            mm(w.down_sh, shm, F, ysh, E, nb);
        }
        if (!one && gemm) {
            routed_grouped(w, nb, lim);
            continue;
        }
        // 16-18, one token at a time: routed gate+up in one launch (one token: the shared gate/up into slot K
        // and one SwiGLU for both), routed down in one launch, weighted sum + shared + HC post
        const int n_sw = one ? K + 1 : K;
        for (int t = 0; t < nb; t++) {
            const float *at = a + (size_t)t * E;
            {
                ExpertMatvec p;
                p.W[0] = C.dev(w.gate_exps);
                p.W[1] = C.dev(w.up_exps);
                p.y[0] = gt;
                p.y[1] = up;
                p.n_mats = 2;
                p.expert_stride = (int64_t)F * (int64_t)row_bytes(w.gate_exps.type, E);
                p.n_rows = F;
                p.n_cols = E;
                p.ids = eids + (size_t)t * K;
                p.n_ids = K;
                p.x = at;
                p.x_stride = 0;
                cuda_matvec_experts(w.gate_exps.type, p, s);
            }
            if (one) mv2(C, w.gate_sh, w.up_sh, at, gt + (size_t)K * F, up + (size_t)K * F, s);
            swiglu_kernel<<<(n_sw * F + 255) / 256, 256, 0, s>>>(gt, up, n_sw * F, lim, mb);
            {
                ExpertMatvec p;
                p.W[0] = C.dev(w.down_exps);
                p.y[0] = dn;
                p.n_mats = 1;
                p.expert_stride = (int64_t)E * (int64_t)row_bytes(w.down_exps.type, F);
                p.n_rows = E;
                p.n_cols = F;
                p.ids = eids + (size_t)t * K;
                p.n_ids = K;
                p.x = mb;
                p.x_stride = F;
                p.ids_settled = true;  // the router ran before gate+up; swiglu_kernel above is a plain launch
                cuda_matvec_experts(w.down_exps.type, p, s);
            }
            if (one) mv(C, w.down_sh, mb + (size_t)K * F, ysh, s);
            moe_sum_post_kernel<<<ew_grid, 256, 0, s>>>(dn, ewt + (size_t)t * K, K, E, ysh + (size_t)t * E,
                                                        hcw + (size_t)t * kHcwLd, H + (size_t)t * HCE, hc);
        }
    }
    DS4_CUDA_CHECK(cudaGetLastError());
}

// 19. head of token t of the step: collapse the streams, RMS * output_norm, output projection -> logits.
void CudaSession::enqueue_head(int t) {
    const CudaModel &C = *cm;
    const Hparams &hp = M->hp;
    const int E = hp.n_embd, hc = hp.hc_mult;
    const float *Ht = H + (size_t)t * hc * E;
    hc_mix(C, M->out_hc_fn, Ht, hc_chunks, 1, hc_part, hc_ss, stream);
    head_kernel<<<1, 1024, (size_t)E * 4, stream>>>(hc_part, hc_ss, hc_chunks, C.devf(M->out_hc_scale),
                                                    C.devf(M->out_hc_base), Ht, C.devf(M->out_norm), E, hc,
                                                    hp.hc_eps, hp.rms_eps, z);
    mv(C, M->output, z, logits, stream);
    DS4_CUDA_CHECK(cudaGetLastError());
}

// Evaluate toks[0..nb) at positions pos..pos+nb-1 (nb <= bmax; no checkpoint boundary inside). head: logits of
// every token (nb == 1: of the one token) into logits_out (n_vocab floats per token).
void CudaSession::run_step(const int32_t *toks, int nb, bool head, float *logits_out) {
    const Hparams &hp = M->hp;
    if (pos > 0 && pos % ckpt_every == 0 && (size_t)(pos / ckpt_every - 1) < ckpts.size())
        DS4_CUDA_CHECK(cudaMemcpyAsync(ckpts[pos / ckpt_every - 1], state, state_floats * 4, cudaMemcpyDeviceToDevice,
                                 stream));
    Step st[kMaxBatch];
    for (int t = 0; t < nb; t++) st[t] = Step{toks[t], pos + t};
    // pageable source: the runtime stages it before returning, so `st` may go out of scope
    DS4_CUDA_CHECK(cudaMemcpyAsync(d_steps, st, sizeof(Step) * nb, cudaMemcpyHostToDevice, stream));
    const int last = pos + nb - 1;
    const bool idx_active = hp.csa_ratio > 0 && (last + 1) / hp.csa_ratio > hp.idx_topk;
    int key = -1;  // graph key, or -1: launch directly
    if (nb == 1) key = (head ? 2 : 0) + (idx_active ? 1 : 0);
    else if (nb == bmax && !head) key = 4 + (idx_active ? 1 : 0);
    if (!use_graphs || key < 0 || !seen[key]) {
        // the first step of a shape runs directly (warms module loading and the matvec launch tables), later
        // ones replay the captured graph
        enqueue_step(nb, idx_active);
        if (nb == 1 && head) enqueue_head(0);
        if (key >= 0) seen[key] = true;
    } else {
        if (!graphs[key]) {
            cudaGraph_t graph = nullptr;
            DS4_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
            try {
                enqueue_step(nb, idx_active);
                if (nb == 1 && head) enqueue_head(0);
            } catch (...) {
                cudaStreamEndCapture(stream, &graph);
                if (graph) cudaGraphDestroy(graph);
                throw;
            }
            DS4_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
            const cudaError_t e = cudaGraphInstantiate(&graphs[key], graph, 0);
            cudaGraphDestroy(graph);
            DS4_CUDA_CHECK(e);
        }
        DS4_CUDA_CHECK(cudaGraphLaunch(graphs[key], stream));
    }
    if (head && logits_out) {
        for (int t = 0; t < nb; t++) {
            if (nb > 1) enqueue_head(t);
            DS4_CUDA_CHECK(cudaMemcpyAsync(logits_out + (size_t)t * hp.n_vocab, logits, (size_t)hp.n_vocab * 4,
                                     cudaMemcpyDeviceToHost, stream));
        }
    }
    pos += nb;
    tokens.insert(tokens.end(), toks, toks + nb);
}

CudaSessionPtr cuda_session_new(CudaModel &m, int max_ctx, bool roundtrip) {
    if (max_ctx < 1) fail(DS4_E_ARG, "max_ctx must be >= 1 (got %d)", max_ctx);
    auto s = CudaSessionPtr(new CudaSession);
    s->cm = &m;
    s->M = m.host;
    s->max_ctx = max_ctx;
    s->roundtrip = roundtrip;
    s->tokens.reserve(max_ctx);
    s->init();
    return s;
}

void cuda_session_eval(CudaSession &s, const int32_t *toks, int n, bool all_logits, float *logits) {
    const Hparams &hp = s.M->hp;
    if (n < 0) fail(DS4_E_ARG, "token count %d < 0", n);
    if (n == 0) return;
    if ((int64_t)s.pos + n > s.max_ctx)
        fail(DS4_E_STATE, "context full: %d tokens evaluated + %d new > max_ctx %d", s.pos, n, s.max_ctx);
    for (int i = 0; i < n; i++)
        if (toks[i] < 0 || toks[i] >= hp.n_vocab)
            fail(DS4_E_ARG, "token id %d at index %d is outside the vocabulary [0, %d)", toks[i], i, hp.n_vocab);
    try {
        int t = 0;
        while (t < n) {
            // a step: up to bmax tokens, never across a checkpoint position (saved before that position), and
            // the last token alone when only its logits are wanted (the one-token graph has the head)
            int nb = std::min(s.bmax, n - t);
            const int next_ckpt = (s.pos / s.ckpt_every + 1) * s.ckpt_every;
            nb = std::min(nb, next_ckpt - s.pos);
            const bool want_last = logits && !all_logits;
            if (want_last && t + nb == n && nb > 1) nb -= 1;
            const bool head = logits && (all_logits || t + nb == n);
            float *out = head ? logits + (all_logits ? (size_t)t * hp.n_vocab : 0) : nullptr;
            s.run_step(toks + t, nb, head, out);
            t += nb;
        }
        DS4_CUDA_CHECK(cudaStreamSynchronize(s.stream));
        DS4_CUDA_CHECK(cudaGetLastError());
    } catch (...) {
        // a CUDA failure leaves the device state undefined; pos/tokens still say what was enqueued
        cudaStreamSynchronize(s.stream);
        cudaGetLastError();
        throw;
    }
}

void cuda_session_truncate(CudaSession &s, int n) {
    if (n < 0 || n > s.pos) fail(DS4_E_STATE, "truncate to %d: must be in [0, %d] (tokens evaluated)", n, s.pos);
    if (n == s.pos) return;
    const int k = n / s.ckpt_every;  // checkpoints 0..k-1 hold the state before positions (i+1)*ckpt_every
    if (k == 0) {
        s.reset_state();
        s.pos = 0;
    } else {
        DS4_CUDA_CHECK(cudaMemcpyAsync(s.state, s.ckpts[k - 1], s.state_floats * 4, cudaMemcpyDeviceToDevice, s.stream));
        s.pos = k * s.ckpt_every;
    }
    // compressed / indexer rows are append-only: rows past the new position are rewritten before being read
    std::vector<int32_t> redo(s.tokens.begin() + s.pos, s.tokens.begin() + n);
    s.tokens.resize(s.pos);
    if (!redo.empty()) cuda_session_eval(s, redo.data(), (int)redo.size(), false, nullptr);
    DS4_CUDA_CHECK(cudaStreamSynchronize(s.stream));
}

int cuda_session_pos(const CudaSession &s) { return s.pos; }
uint64_t cuda_session_bytes(const CudaSession &s) { return s.bytes; }

}  // namespace ds4
