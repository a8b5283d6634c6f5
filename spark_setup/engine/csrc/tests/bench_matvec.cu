// bench_matvec: decode matvec bandwidth at the real DS4 shapes, against a device-to-device copy in the same run.
//
//   bench_matvec [--iters N] [--csv FILE]
//
// For each case: random valid weights are generated on the GPU (several copies, rotated per iteration so the
// 50-60 MB L2 cannot serve them), the CUDA result is checked against the CPU kernel on the same bytes, then the
// median time of N runs (CUDA events around each run) gives GB/s = weight bytes read / time. The copy baseline is
// cudaMemcpyAsync device-to-device of 1 GiB, counted as bytes read + written. Prints a markdown table.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common.h"
#include "cuda/check.cuh"
#include "ds4.h"
#include "quant.h"

#define CK(expr)                                                                                         \
    do {                                                                                                 \
        cudaError_t e_ = (expr);                                                                         \
        if (e_ != cudaSuccess) {                                                                         \
            std::fprintf(stderr, "CUDA error %s at %s:%d: %s\n", #expr, __FILE__, __LINE__, cudaGetErrorString(e_)); \
            std::exit(1);                                                                                \
        }                                                                                                \
    } while (0)

namespace {

// Random bytes, then every quant block's f16 scale fields set to finite values of a realistic size.
__global__ void fill_random(uint8_t *p, size_t n, uint64_t seed) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        uint64_t z = seed + i * 0x9E3779B97F4A7C15ull;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        p[i] = (uint8_t)(z ^ (z >> 31));
    }
}

__global__ void fix_scales(uint8_t *p, size_t n_blocks, int block_bytes, int off0, int off1) {
    for (size_t b = (size_t)blockIdx.x * blockDim.x + threadIdx.x; b < n_blocks; b += (size_t)gridDim.x * blockDim.x) {
        uint8_t *q = p + b * block_bytes;
        // f16 with exponent 5..12 (~1e-4 .. 0.03), random sign and mantissa from the existing byte
        auto put = [&](int off) {
            const uint16_t h = (uint16_t)((q[off + 1] & 0x80) << 8 | (uint16_t)(5 + (q[off] & 7)) << 10 | (q[off] & 0x3f) << 4);
            q[off] = (uint8_t)(h & 0xff);
            q[off + 1] = (uint8_t)(h >> 8);
        };
        put(off0);
        if (off1 >= 0) put(off1);
    }
}

void make_weights(uint8_t *d, int type, size_t bytes, uint64_t seed) {
    fill_random<<<1024, 256>>>(d, bytes, seed);
    const size_t bb = ds4::type_size(type);
    int o0 = -1, o1 = -1;
    switch (type) {
        case DS4_TYPE_Q8_0: o0 = 0; break;
        case DS4_TYPE_Q2_K: o0 = 80; o1 = 82; break;
        case DS4_TYPE_Q4_K: o0 = 0; o1 = 2; break;
        case DS4_TYPE_IQ2_XXS: o0 = 0; break;
        case DS4_TYPE_F16: o0 = 0; break;  // every value is a "scale": all finite
        default: break;
    }
    if (o0 >= 0) fix_scales<<<1024, 256>>>(d, bytes / bb, (int)bb, o0, o1);
    CK(cudaGetLastError());
}

std::vector<float> random_vec(size_t n, uint32_t seed) {
    std::mt19937 g(seed);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::vector<float> v(n);
    for (auto &x : v) x = nd(g);
    return v;
}

double median(std::vector<float> v) {
    std::sort(v.begin(), v.end());
    return v.empty() ? 0.0 : v[v.size() / 2];
}

// Max |a - b| over max |b| (the CPU result b is the reference).
double rel_diff(const std::vector<float> &a, const std::vector<float> &b) {
    double md = 0, mb = 0;
    for (size_t i = 0; i < a.size(); i++) {
        md = std::max(md, (double)std::fabs(a[i] - b[i]));
        mb = std::max(mb, (double)std::fabs(b[i]));
        if (!std::isfinite(a[i])) return INFINITY;
    }
    return md / (mb > 0 ? mb : 1);
}

struct Row {
    std::string name, type, shape;
    int ver;
    double bytes, us, gbs, pct, err;
    double gus, ggbs, gpct;  // back-to-back in a CUDA graph (as a decode step runs them)
};

constexpr int kGraphCalls = 20;  // calls captured per graph

constexpr size_t kRotateBytes = (size_t)1536 << 20;  // weights rotated per case: > 20x a 60 MB L2

// Times `run(i)` (i = iteration, for rotation) with events around each call; returns the median in microseconds.
template <class F>
double time_median_us(int iters, cudaStream_t s, F &&run) {
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    std::vector<float> ms;
    for (int i = 0; i < iters + 5; i++) {
        CK(cudaEventRecord(e0, s));
        run(i);
        CK(cudaEventRecord(e1, s));
        CK(cudaEventSynchronize(e1));
        float t;
        CK(cudaEventElapsedTime(&t, e0, e1));
        if (i >= 5) ms.push_back(t);
    }
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    return median(ms) * 1e3;
}

double copy_gbs(int iters, cudaStream_t s) {
    const size_t n = (size_t)1 << 30;
    void *a, *b;
    CK(cudaMalloc(&a, n));
    CK(cudaMalloc(&b, n));
    CK(cudaMemset(a, 1, n));
    const double us = time_median_us(iters, s, [&](int) { CK(cudaMemcpyAsync(b, a, n, cudaMemcpyDeviceToDevice, s)); });
    CK(cudaFree(a));
    CK(cudaFree(b));
    return 2.0 * (double)n / (us * 1e-6) / 1e9;
}

// Streaming read baseline: every thread reads 16-byte chunks (grid-stride), the XOR keeps the loads alive.
__global__ void read_kernel(const uint4 *p, size_t n, uint32_t *sink) {
    uint32_t acc = 0;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const uint4 v = __ldg(p + i);
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (acc == 0x12345678u) *sink = acc;
}

double read_gbs(int iters, cudaStream_t s, int sms) {
    const size_t n = (size_t)1 << 30;
    void *a;
    uint32_t *sink;
    CK(cudaMalloc(&a, n));
    CK(cudaMalloc(&sink, 4));
    CK(cudaMemset(a, 1, n));
    const double us = time_median_us(iters, s, [&](int) {
        read_kernel<<<sms * 8, 256, 0, s>>>(static_cast<const uint4 *>(a), n / 16, sink);
    });
    CK(cudaFree(a));
    CK(cudaFree(sink));
    return (double)n / (us * 1e-6) / 1e9;
}

// Times calls back to back as a decode step issues them: kGraphCalls calls run(0..kGraphCalls-1) captured into one
// CUDA graph, replayed `reps` times (events around each replay); returns the median per call in microseconds.
// Single-call timing (time_median_us) also counts the launch latency after a synchronize, which a graph hides.
template <class F>
double time_graph_us(int reps, cudaStream_t s, F &&run) {
    cudaGraph_t g;
    cudaGraphExec_t ge;
    CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
    try {
        for (int i = 0; i < kGraphCalls; i++) run(i);
    } catch (...) {  // a launch failed during capture: end the capture so the stream stays usable
        cudaGraph_t bad = nullptr;
        cudaStreamEndCapture(s, &bad);
        if (bad) cudaGraphDestroy(bad);
        cudaGetLastError();
        throw;
    }
    CK(cudaStreamEndCapture(s, &g));
    CK(cudaGraphInstantiate(&ge, g, 0));
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    std::vector<float> ms;
    for (int i = 0; i < reps + 3; i++) {
        CK(cudaEventRecord(e0, s));
        CK(cudaGraphLaunch(ge, s));
        CK(cudaEventRecord(e1, s));
        CK(cudaEventSynchronize(e1));
        float t;
        CK(cudaEventElapsedTime(&t, e0, e1));
        if (i >= 3) ms.push_back(t);
    }
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    CK(cudaGraphExecDestroy(ge));
    CK(cudaGraphDestroy(g));
    return median(ms) * 1e3 / kGraphCalls;
}

// The streaming read with programmatic dependent launch, as the v5/v6 kernels launch: it lets the next kernel start
// at once and, reading nothing a previous kernel writes, never waits.
__global__ void read_kernel_pdl(const uint4 *p, size_t n, uint32_t *sink) {
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
    uint32_t acc = 0;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const uint4 v = __ldg(p + i);
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (acc == 0x12345678u) *sink = acc;
}

// The same read as a dependent kernel must do it: its first loads (weights: nothing a previous kernel writes) go out
// before it waits for the previous kernel, the rest after. What a chain of dependent launches can reach. Run 35 tried
// 2, 4 and 8 CTAs of 256 threads per SM with 4, 8 and 16 loads before the wait: 8 and 8 was best (82% of copy for
// 35.7 MB; with fewer CTAs per SM, 53-71%).
__global__ void read_kernel_dep(const uint4 *p, size_t n, uint32_t *sink) {
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
    constexpr int kPre = 8;
    const size_t stride = (size_t)gridDim.x * blockDim.x, i0 = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    uint4 pre[kPre];
#pragma unroll
    for (int k = 0; k < kPre; k++) pre[k] = i0 + k * stride < n ? __ldg(p + i0 + k * stride) : make_uint4(0, 0, 0, 0);
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
    uint32_t acc = 0;
#pragma unroll
    for (int k = 0; k < kPre; k++) acc ^= pre[k].x ^ pre[k].y ^ pre[k].z ^ pre[k].w;
    for (size_t i = i0 + kPre * stride; i < n; i += stride) {
        const uint4 v = __ldg(p + i);
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (acc == 0x12345678u) *sink = acc;
}

// How the ceiling's read kernel is launched.
enum class ReadLaunch { kPlain, kPdl, kPdlWait };

// The ceiling for launches of given sizes: per call, one streaming read of each size in `sizes` (rotated slices, as
// the cases' weights), kGraphCalls calls back to back in a graph, launched as `how` says; microseconds per call.
double read_graph_us(const std::vector<size_t> &sizes, ReadLaunch how, int reps, cudaStream_t s, int sms) {
    size_t call = 0;
    for (size_t b : sizes) call += b;
    const size_t n_calls = kRotateBytes / call;
    void *a;
    uint32_t *sink;
    CK(cudaMalloc(&a, n_calls * call));
    CK(cudaMalloc(&sink, 4));
    CK(cudaMemset(a, 1, n_calls * call));
    const double us = time_graph_us(reps, s, [&](int i) {
        const uint8_t *p = static_cast<uint8_t *>(a) + (i % n_calls) * call;
        for (size_t b : sizes) {
            const uint4 *q = reinterpret_cast<const uint4 *>(p);
            if (how == ReadLaunch::kPdlWait) {
                ds4::launch_pdl(read_kernel_dep, sms * 8, 256, 0, s, q, b / 16, sink);
            } else if (how == ReadLaunch::kPdl) {
                ds4::launch_pdl(read_kernel_pdl, sms * 8, 256, 0, s, q, b / 16, sink);
            } else {
                read_kernel<<<sms * 8, 256, 0, s>>>(q, b / 16, sink);
            }
            p += b;
        }
    });
    CK(cudaFree(a));
    CK(cudaFree(sink));
    return us;
}

// Fills the derived fields of a row.
Row make_row(std::string name, std::string type, std::string shape, int ver, double bytes, double us, double gus,
             double err, double copy) {
    const double gbs = bytes / (us * 1e-6) / 1e9, ggbs = bytes / (gus * 1e-6) / 1e9;
    return {std::move(name), std::move(type), std::move(shape), ver, bytes, us, gbs, 100.0 * gbs / copy, err,
            gus, ggbs, 100.0 * ggbs / copy};
}

// One plain matvec case: [rows x cols] of `type` (a list of matrices run back to back counts as one case). groups > 1:
// one matrix, launched as the forward pass launches attn_output_a (a grouped matvec: rows [g R, (g + 1) R) take
// x + g cols, through the expert path with settled group ids).
std::vector<Row> bench_plain(const char *name, int type, const std::vector<std::pair<int64_t, int64_t>> &mats,
                             int iters, double copy, cudaStream_t s, const std::vector<int> &versions,
                             int groups = 1) {
    size_t set_bytes = 0;
    int64_t max_rows = 0, max_cols = 0;
    for (auto &m : mats) {
        set_bytes += ds4::row_bytes(type, m.second) * (size_t)m.first;
        max_rows = std::max(max_rows, m.first);
        max_cols = std::max(max_cols, m.second);
    }
    const int copies = (int)std::max<size_t>(2, (kRotateBytes + set_bytes - 1) / set_bytes);
    std::vector<std::vector<uint8_t *>> W(copies, std::vector<uint8_t *>(mats.size()));
    for (int c = 0; c < copies; c++)
        for (size_t k = 0; k < mats.size(); k++) {
            const size_t b = ds4::row_bytes(type, mats[k].second) * (size_t)mats[k].first;
            CK(cudaMalloc(&W[c][k], b));
            make_weights(W[c][k], type, b, 1000 + 17 * k);  // same content in every copy, different addresses
        }
    float *dx, *dy;
    CK(cudaMalloc(&dx, max_cols * groups * 4));
    CK(cudaMalloc(&dy, max_rows * 4));
    const std::vector<float> x = random_vec((size_t)(max_cols * groups), 42);
    CK(cudaMemcpy(dx, x.data(), x.size() * 4, cudaMemcpyHostToDevice));
    CK(cudaDeviceSynchronize());
    auto matvec = [&](const uint8_t *w, int64_t rows, int64_t cols) {
        if (groups == 1) return ds4::cuda_matvec(type, w, rows, cols, dx, dy, s);
        ds4::ExpertMatvec p;
        p.W[0] = w;
        p.y[0] = dy;
        p.n_mats = 1;
        p.n_rows = rows / groups;
        p.n_cols = cols;
        p.expert_stride = (int64_t)ds4::row_bytes(type, cols) * p.n_rows;
        p.ids = nullptr;  // the identity, as in the forward pass
        p.n_ids = groups;
        p.ids_settled = true;
        p.x = dx;
        p.x_stride = cols;
        ds4::cuda_matvec_experts(type, p, s);
    };

    // CPU reference of every matrix of copy 0
    std::vector<std::vector<float>> yc(mats.size());
    for (size_t k = 0; k < mats.size(); k++) {
        const auto [rows, cols] = mats[k];
        const size_t b = ds4::row_bytes(type, cols) * (size_t)rows;
        std::vector<uint8_t> hw(b);
        CK(cudaMemcpy(hw.data(), W[0][k], b, cudaMemcpyDeviceToHost));
        yc[k].resize((size_t)rows);
        const int64_t R = rows / groups;
        for (int g = 0; g < groups; g++)
            ds4::cpu_matvec(type, hw.data() + ds4::row_bytes(type, cols) * (size_t)(g * R), R, cols,
                            x.data() + g * cols, yc[k].data() + g * R);
    }
    std::string shape;
    for (size_t k = 0; k < mats.size(); k++)
        shape += (k ? " + " : "") + std::to_string(mats[k].first) + "x" + std::to_string(mats[k].second);
    std::vector<Row> out;
    auto run = [&](int i) {
        for (size_t k = 0; k < mats.size(); k++)
            matvec(W[i % copies][k], mats[k].first, mats[k].second);
    };
    for (int ver : versions) try {
        ds4::cuda_set_matvec_version(ver);
        double err = 0;  // poisoned output, then every matrix of copy 0 against the CPU kernel
        for (size_t k = 0; k < mats.size(); k++) {
            const auto [rows, cols] = mats[k];
            std::vector<float> yg((size_t)rows);
            CK(cudaMemsetAsync(dy, 0xff, rows * 4, s));
            matvec(W[0][k], rows, cols);
            CK(cudaGetLastError());
            CK(cudaMemcpyAsync(yg.data(), dy, rows * 4, cudaMemcpyDeviceToHost, s));
            CK(cudaStreamSynchronize(s));
            err = std::max(err, rel_diff(yg, yc[k]));
        }
        const double us = time_median_us(iters, s, run);
        const double gus = time_graph_us(std::max(10, iters / kGraphCalls), s, run);
        out.push_back(make_row(name, ds4::type_name(type), shape, ver, (double)set_bytes, us, gus, err, copy));
    } catch (const ds4::Error &e) {  // one version failing must not hide the others' numbers
        std::fprintf(stderr, "%s v%d: engine error: %s\n", name, ver, e.what());
        out.push_back(make_row(name, ds4::type_name(type), shape, ver, (double)set_bytes, NAN, NAN, INFINITY, copy));
    }
    for (auto &v : W)
        for (auto *p : v) CK(cudaFree(p));
    CK(cudaFree(dx));
    CK(cudaFree(dy));
    return out;
}

// One layer's routed experts: gate+up [ff x embd] (one launch, shared x) then down [embd x ff] (per-expert x),
// n_used experts out of n_exp, expert ids drawn at random for every iteration.
std::vector<Row> bench_experts(const char *name, int gu_type, int down_type, int64_t embd, int64_t ff, int n_exp,
                               int n_used, int iters, double copy, cudaStream_t s, const std::vector<int> &versions,
                               int parts = 3) {  // parts: 1 = gate+up launch only, 2 = down only, 3 = both
    const size_t gu_rb = ds4::row_bytes(gu_type, embd), dn_rb = ds4::row_bytes(down_type, ff);
    const size_t gu_stride = gu_rb * (size_t)ff, dn_stride = dn_rb * (size_t)embd;
    uint8_t *gate, *up, *down;
    CK(cudaMalloc(&gate, gu_stride * n_exp));
    CK(cudaMalloc(&up, gu_stride * n_exp));
    CK(cudaMalloc(&down, dn_stride * n_exp));
    make_weights(gate, gu_type, gu_stride * n_exp, 1);
    make_weights(up, gu_type, gu_stride * n_exp, 2);
    make_weights(down, down_type, dn_stride * n_exp, 3);
    const int n_sets = iters + 16;
    std::vector<int32_t> ids((size_t)n_sets * n_used);
    std::mt19937 g(7);
    for (int i = 0; i < n_sets; i++) {
        std::vector<int32_t> perm(n_exp);
        for (int k = 0; k < n_exp; k++) perm[k] = k;
        std::shuffle(perm.begin(), perm.end(), g);
        std::copy(perm.begin(), perm.begin() + n_used, ids.begin() + (size_t)i * n_used);
    }
    int32_t *d_ids;
    float *dx, *d_gate, *d_up, *d_act, *d_out;
    CK(cudaMalloc(&d_ids, ids.size() * 4));
    CK(cudaMemcpy(d_ids, ids.data(), ids.size() * 4, cudaMemcpyHostToDevice));
    CK(cudaMalloc(&dx, embd * 4));
    CK(cudaMalloc(&d_gate, n_used * ff * 4));
    CK(cudaMalloc(&d_up, n_used * ff * 4));
    CK(cudaMalloc(&d_act, n_used * ff * 4));
    CK(cudaMalloc(&d_out, n_used * embd * 4));
    const std::vector<float> x = random_vec((size_t)embd, 5), act = random_vec((size_t)(n_used * ff), 6);
    CK(cudaMemcpy(dx, x.data(), embd * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(d_act, act.data(), act.size() * 4, cudaMemcpyHostToDevice));
    CK(cudaDeviceSynchronize());

    auto run = [&](int i) {
        ds4::ExpertMatvec gu;
        gu.W[0] = gate;
        gu.W[1] = up;
        gu.y[0] = d_gate;
        gu.y[1] = d_up;
        gu.n_mats = 2;
        gu.expert_stride = (int64_t)gu_stride;
        gu.n_rows = ff;
        gu.n_cols = embd;
        gu.ids = d_ids + (size_t)i * n_used;
        gu.n_ids = n_used;
        gu.x = dx;
        gu.x_stride = 0;
        if (parts & 1) ds4::cuda_matvec_experts(gu_type, gu, s);
        ds4::ExpertMatvec dn;
        dn.W[0] = down;
        dn.y[0] = d_out;
        dn.expert_stride = (int64_t)dn_stride;
        dn.n_rows = embd;
        dn.n_cols = ff;
        dn.ids = d_ids + (size_t)i * n_used;
        dn.n_ids = n_used;
        dn.x = d_act;
        dn.x_stride = ff;
        dn.ids_settled = true;  // as in the forward pass (the ids predate gate+up); gate+up itself waits for them
        if (parts & 2) ds4::cuda_matvec_experts(down_type, dn, s);
    };
    // CPU reference of set 0 on the same expert slices
    std::vector<float> c_gate((size_t)(n_used * ff)), c_up(c_gate.size()), c_out((size_t)(n_used * embd));
    std::vector<uint8_t> hg(gu_stride), hu(gu_stride), hd(dn_stride);
    for (int e = 0; e < n_used; e++) {
        const int32_t id = ids[(size_t)e];
        CK(cudaMemcpy(hg.data(), gate + (size_t)id * gu_stride, gu_stride, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(hu.data(), up + (size_t)id * gu_stride, gu_stride, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(hd.data(), down + (size_t)id * dn_stride, dn_stride, cudaMemcpyDeviceToHost));
        ds4::cpu_matvec(gu_type, hg.data(), ff, embd, x.data(), c_gate.data() + (size_t)e * ff);
        ds4::cpu_matvec(gu_type, hu.data(), ff, embd, x.data(), c_up.data() + (size_t)e * ff);
        ds4::cpu_matvec(down_type, hd.data(), embd, ff, act.data() + (size_t)e * ff, c_out.data() + (size_t)e * embd);
    }
    const double bytes = (double)n_used * ((parts & 1 ? 2.0 * gu_stride : 0.0) + (parts & 2 ? (double)dn_stride : 0.0));
    std::string shape = std::to_string(n_used) + "/" + std::to_string(n_exp) + " x (2x " + std::to_string(ff) + "x" +
                        std::to_string(embd) + " " + ds4::type_name(gu_type) + " + " + std::to_string(embd) + "x" +
                        std::to_string(ff) + " " + ds4::type_name(down_type) + ")";
    const std::string tname = std::string(ds4::type_name(gu_type)) + "+" + ds4::type_name(down_type);
    std::vector<Row> out;
    for (int ver : versions) try {
        ds4::cuda_set_matvec_version(ver);
        CK(cudaMemsetAsync(d_gate, 0xff, c_gate.size() * 4, s));
        CK(cudaMemsetAsync(d_up, 0xff, c_up.size() * 4, s));
        CK(cudaMemsetAsync(d_out, 0xff, c_out.size() * 4, s));
        run(0);
        CK(cudaGetLastError());
        std::vector<float> g_gate(c_gate.size()), g_up(c_up.size()), g_out(c_out.size());
        CK(cudaMemcpyAsync(g_gate.data(), d_gate, g_gate.size() * 4, cudaMemcpyDeviceToHost, s));
        CK(cudaMemcpyAsync(g_up.data(), d_up, g_up.size() * 4, cudaMemcpyDeviceToHost, s));
        CK(cudaMemcpyAsync(g_out.data(), d_out, g_out.size() * 4, cudaMemcpyDeviceToHost, s));
        CK(cudaStreamSynchronize(s));
        const double err = std::max({parts & 1 ? rel_diff(g_gate, c_gate) : 0.0, parts & 1 ? rel_diff(g_up, c_up) : 0.0,
                                     parts & 2 ? rel_diff(g_out, c_out) : 0.0});
        const double us = time_median_us(iters, s, [&](int i) { run(1 + i % (n_sets - 1)); });
        const double gus = time_graph_us(std::max(10, iters / kGraphCalls), s, [&](int i) { run(1 + i % (n_sets - 1)); });
        out.push_back(make_row(name, tname, shape, ver, bytes, us, gus, err, copy));
    } catch (const ds4::Error &e) {
        std::fprintf(stderr, "%s v%d: engine error: %s\n", name, ver, e.what());
        out.push_back(make_row(name, tname, shape, ver, bytes, NAN, NAN, INFINITY, copy));
    }
    for (void *p : {(void *)gate, (void *)up, (void *)down, (void *)d_ids, (void *)dx, (void *)d_gate, (void *)d_up,
                    (void *)d_act, (void *)d_out})
        CK(cudaFree(p));
    return out;
}

}  // namespace

int main(int argc, char **argv) {
    int iters = 200;
    const char *csv = nullptr, *only = nullptr;
    std::vector<int> versions = {0, 6, 9, 7, 2, 4, 1};
    for (int i = 1; i < argc; i++) {
        if (!std::strcmp(argv[i], "--iters") && i + 1 < argc) {
            iters = std::atoi(argv[++i]);
        } else if (!std::strcmp(argv[i], "--csv") && i + 1 < argc) {
            csv = argv[++i];
        } else if (!std::strcmp(argv[i], "--case") && i + 1 < argc) {
            only = argv[++i];
        } else if (!std::strcmp(argv[i], "--versions") && i + 1 < argc) {
            versions.clear();
            for (const char *p = argv[++i]; *p;) {
                char *end;
                const long v = std::strtol(p, &end, 10);
                if (end == p || v < 0 || v > 9 || v == 8) {
                    std::fprintf(stderr, "--versions: a comma-separated list of 0..7 and 9 (0 = per-type default)\n");
                    return 2;
                }
                versions.push_back((int)v);
                p = *end == ',' ? end + 1 : end;
            }
        } else {
            std::fprintf(stderr, "usage: %s [--iters N] [--csv FILE] [--versions 0,6,9,7,2,4,1] [--case SUBSTRING]\n", argv[0]);
            return 2;
        }
    }
    if (versions.empty() || iters < 1) {
        std::fprintf(stderr, "nothing to run\n");
        return 2;
    }
    int dev = 0;
    cudaDeviceProp prop;
    CK(cudaGetDevice(&dev));
    CK(cudaGetDeviceProperties(&prop, dev));
    cudaStream_t s;
    CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    const double copy = copy_gbs(std::max(20, iters / 5), s);
    const double read = read_gbs(std::max(20, iters / 5), s, prop.multiProcessorCount);

    if (const char *d = std::getenv("DS4_V6_DIAG")) ds4::cuda_set_matvec_diag(std::atoi(d));  // see quant.h
    std::vector<Row> rows;
    auto add = [&](std::vector<Row> r) { rows.insert(rows.end(), r.begin(), r.end()); };
    auto want = [&](const char *name) { return !only || std::strstr(name, only); };  // --case: run only these
    try {
        // every kernel version on the same weights, side by side (v1 = the first version, the baseline)
        if (want("output head"))
            add(bench_plain("output head", DS4_TYPE_Q8_0, {{129280, 4096}}, iters, copy, s, versions));
        if (want("attn_q_b"))
            add(bench_plain("attn_q_b", DS4_TYPE_Q8_0, {{32768, 1024}}, iters, copy, s, versions));
        if (want("attn_output_a"))
            add(bench_plain("attn_output_a", DS4_TYPE_Q8_0, {{8192, 4096}}, iters, copy, s, versions));
        if (want("attn_output_a grouped"))
            add(bench_plain("attn_output_a grouped", DS4_TYPE_Q8_0, {{8192, 4096}}, iters, copy, s, versions, 8));
        if (want("attn_output_b"))
            add(bench_plain("attn_output_b", DS4_TYPE_Q8_0, {{4096, 8192}}, iters, copy, s, versions));
        if (want("shared expert (gate, up, down)"))
            add(bench_plain("shared expert (gate, up, down)", DS4_TYPE_Q8_0, {{2048, 4096}, {2048, 4096}, {4096, 2048}},
                        iters, copy, s, versions));
        if (want("routed experts, Q2 file"))
            add(bench_experts("routed experts, Q2 file", DS4_TYPE_IQ2_XXS, DS4_TYPE_Q2_K, 4096, 2048, 256, 6, iters, copy, s,
                          versions));
        if (want("routed Q2: gate+up launch only"))
            add(bench_experts("routed Q2: gate+up launch only", DS4_TYPE_IQ2_XXS, DS4_TYPE_Q2_K, 4096, 2048, 256, 6, iters,
                          copy, s, versions, 1));
        if (want("routed Q2: down launch only"))
            add(bench_experts("routed Q2: down launch only", DS4_TYPE_IQ2_XXS, DS4_TYPE_Q2_K, 4096, 2048, 256, 6, iters,
                          copy, s, versions, 2));
        if (want("routed experts, Q4 file"))
            add(bench_experts("routed experts, Q4 file", DS4_TYPE_Q4_K, DS4_TYPE_Q4_K, 4096, 2048, 256, 6, iters, copy, s,
                          versions));
        if (std::getenv("DS4_BENCH_PLAIN_Q2")) {  // the expert launches' bytes as plain matrices (diagnosis)
            if (want("plain IQ2_XXS [12288x4096]"))
                add(bench_plain("plain IQ2_XXS [12288x4096]", DS4_TYPE_IQ2_XXS, {{12288, 4096}}, iters, copy, s, versions));
            if (want("plain Q2_K [24576x2048]"))
                add(bench_plain("plain Q2_K [24576x2048]", DS4_TYPE_Q2_K, {{24576, 2048}}, iters, copy, s, versions));
        }
        if (want("token_embd-like F16 [4096x4096]"))
            add(bench_plain("token_embd-like F16 [4096x4096]", DS4_TYPE_F16, {{4096, 4096}}, iters, copy, s, {0}));
        ds4::cuda_set_matvec_version(0);
    } catch (const ds4::Error &e) {
        std::fprintf(stderr, "engine error: %s\n", e.what());
        return 1;
    }

    std::printf("## Matvec bandwidth on %s (sm_%d%d, %d SMs, L2 %d MB)\n\n", prop.name, prop.major, prop.minor,
                prop.multiProcessorCount, prop.l2CacheSize >> 20);
    std::printf("Device-to-device copy (1 GiB, bytes read + written): **%.0f GB/s**; plain streaming read of 1 GiB "
                "(16-byte loads): %.0f GB/s. Weights rotated over >= 1.5 GB so L2 does not serve them; GB/s = weight "
                "bytes read / time. *single*: median of %d calls, each timed alone (events around one call after a "
                "synchronize: includes the launch latency). *graph*: %d calls back to back in one CUDA graph (how a "
                "decode step runs them), median replay / %d. Version 0 = the per-type default.\n\n",
                copy, read, iters, kGraphCalls, kGraphCalls);
    // What a launch of these sizes can reach at all: the streaming read over the same bytes, back to back in a graph
    std::printf("Ceilings: the streaming read kernel over the same bytes as a case (contiguous slices), %d calls back "
                "to back in a graph: plain launches, PDL launches that never wait, and PDL launches that wait for the previous "
                "kernel after their first loads (as a dependent kernel must):\n\n| bytes per call | launches | plain us | "
                "plain %% of copy | PDL us | PDL %% of copy | PDL+wait us | PDL+wait %% of copy |\n"
                "|---|---:|---:|---:|---:|---:|---:|---:|\n", kGraphCalls);
    const struct {
        const char *name;
        std::vector<size_t> sizes;
    } ceil_cases[] = {
        {"35.7 MB (attn_q_b, attn_output_a/b)", {(size_t)32768 * 1088}},
        {"26.0 MB (routed Q2 gate+up)", {(size_t)6 * 2 * 2048 * 1056}},
        {"16.5 MB (routed Q2 down)", {(size_t)6 * 4096 * 672}},
        {"42.5 MB (routed Q2 set: gate+up, then down)", {(size_t)6 * 2 * 2048 * 1056, (size_t)6 * 4096 * 672}},
    };
    for (const auto &cc : ceil_cases) try {
        double b = 0;
        for (size_t x : cc.sizes) b += (double)x;
        const int reps = std::max(10, iters / kGraphCalls);
        std::printf("| %s | %zu |", cc.name, cc.sizes.size());
        for (ReadLaunch how : {ReadLaunch::kPlain, ReadLaunch::kPdl, ReadLaunch::kPdlWait}) {
            const double us = read_graph_us(cc.sizes, how, reps, s, prop.multiProcessorCount);
            std::printf(" %.1f | %.0f%% |", us, 100.0 * b / (us * 1e-6) / 1e9 / copy);
        }
        std::printf("\n");
    } catch (const ds4::Error &e) {  // a failed PDL launch (ds4::launch_pdl throws)
        std::fprintf(stderr, "engine error: %s\n", e.what());
        return 1;
    }
    std::printf("\n");
    std::printf("| case | ver | type | shape (rows x cols) | MB read | single us | single GB/s | single %% of copy | "
                "graph us | graph GB/s | graph %% of copy | max rel diff vs CPU |\n");
    std::printf("|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    bool ok = true;
    for (const Row &r : rows) {
        std::printf("| %s | v%d | %s | %s | %.1f | %.1f | %.0f | %.0f%% | %.1f | %.0f | %.0f%% | %.1e |\n",
                    r.name.c_str(), r.ver, r.type.c_str(), r.shape.c_str(), r.bytes / 1e6, r.us, r.gbs, r.pct, r.gus,
                    r.ggbs, r.gpct, r.err);
        ok = ok && r.err < 1e-3;
    }
    // side by side: graph % of copy per version, and the fastest correct version per case
    std::printf("\n### Graph %% of copy per version (fastest correct version per case last; read %% = of plain read)\n\n");
    std::printf("| case |");
    for (int v : versions) std::printf(" v%d |", v);
    std::printf(" fastest | its GB/s | its %% of read |\n|---|");
    for (size_t i = 0; i < versions.size(); i++) std::printf("---:|");
    std::printf("---|---:|---:|\n");
    std::vector<std::string> names;
    for (const Row &r : rows)
        if (std::find(names.begin(), names.end(), r.name) == names.end()) names.push_back(r.name);
    for (const std::string &n : names) {
        std::printf("| %s |", n.c_str());
        const Row *best = nullptr;
        for (int v : versions) {
            const Row *f = nullptr;
            for (const Row &r : rows)
                if (r.name == n && r.ver == v) f = &r;
            if (!f) {
                std::printf(" - |");
                continue;
            }
            const bool good = f->err < 1e-3;
            std::printf(" %.0f%%%s |", f->gpct, good ? "" : " (WRONG)");
            if (good && (!best || f->gus < best->gus)) best = f;
        }
        if (best)
            std::printf(" v%d | %.0f | %.0f%% |\n", best->ver, best->ggbs, 100.0 * best->ggbs / read);
        else
            std::printf(" none correct | - | - |\n");
    }
    if (csv) {
        FILE *f = std::fopen(csv, "w");
        if (f) {
            std::fprintf(f, "case,version,type,shape,bytes,median_us,gbs,pct_of_copy,graph_us,graph_gbs,graph_pct_of_copy,"
                            "max_rel_diff,copy_gbs,read_gbs\n");
            for (const Row &r : rows)
                std::fprintf(f, "\"%s\",%d,%s,\"%s\",%.0f,%.2f,%.1f,%.1f,%.2f,%.1f,%.1f,%.3e,%.1f,%.1f\n",
                             r.name.c_str(), r.ver, r.type.c_str(), r.shape.c_str(), r.bytes, r.us, r.gbs, r.pct, r.gus,
                             r.ggbs, r.gpct, r.err, copy, read);
            std::fclose(f);
        }
    }
    std::printf("\n%s\n", ok ? "all CUDA results match the CPU kernels (max rel diff < 1e-3)"
                              : "FAIL: a CUDA result differs from the CPU kernel");
    return ok ? 0 : 1;
}
