// cuda/bandwidth.cu: device-memory bandwidth for the roofline (the CUDA half of ds4_bandwidth_probe).
//
// Two kernels over one device buffer of `bytes` (default 8 GiB, less when free memory is short):
//  - read: every thread streams 16-byte loads (uint4), grid-stride with 4 loads in flight, folds them into a
//    32-bit XOR, then warp-reduces and XORs one word per warp into a device counter: every load feeds a value
//    that is stored, so the compiler cannot drop any of them;
//  - copy: the first half of the buffer onto the second half, same access pattern (bytes read + written = bytes).
// The grid is sized from the occupancy calculator to fill every SM; each kernel is timed with CUDA events over
// `iters` runs after two warm-up runs; the median is reported in GB/s (1e9 B/s).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "check.cuh"
#include "common.h"

namespace ds4 {

namespace {

constexpr int kThreads = 512;
constexpr int kUnroll = 4;
constexpr uint64_t kDefaultBytes = 8ull << 30;      // 8 GiB: far beyond L2, like the 9 GB a token reads
constexpr uint64_t kReserveBytes = 1ull << 30;      // left free for the context and other users
constexpr uint64_t kMinBytes = 64ull << 20;         // below this the numbers mean little
constexpr int kDefaultIters = 20;

__device__ __forceinline__ unsigned fold(uint4 v) { return v.x ^ v.y ^ v.z ^ v.w; }

__global__ void read_kernel(const uint4 *__restrict__ src, uint64_t n, unsigned *__restrict__ sink) {
    const uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
    uint64_t i = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    unsigned acc = 0;
    for (; i + (kUnroll - 1) * stride < n; i += kUnroll * stride) {
        uint4 v[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) v[u] = __ldcs(src + i + u * stride);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) acc ^= fold(v[u]);
    }
    for (; i < n; i += stride) acc ^= fold(__ldcs(src + i));
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc ^= __shfl_xor_sync(0xffffffffu, acc, off);
    if ((threadIdx.x & 31) == 0) atomicXor(sink, acc);
}

__global__ void copy_kernel(const uint4 *__restrict__ src, uint4 *__restrict__ dst, uint64_t n) {
    const uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
    uint64_t i = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    for (; i + (kUnroll - 1) * stride < n; i += kUnroll * stride) {
        uint4 v[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) v[u] = __ldcs(src + i + u * stride);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) __stcs(dst + i + u * stride, v[u]);
    }
    for (; i < n; i += stride) __stcs(dst + i, __ldcs(src + i));
}

// Owns the device allocations and events; frees them on every exit path (errors throw).
struct Resources {
    void *buf = nullptr;
    unsigned *sink = nullptr;
    cudaEvent_t start = nullptr, stop = nullptr;
    ~Resources() {
        if (start) cudaEventDestroy(start);
        if (stop) cudaEventDestroy(stop);
        if (sink) cudaFree(sink);
        if (buf) cudaFree(buf);
    }
};

double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    const size_t n = v.size();
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

}  // namespace

void cuda_bandwidth_probe(uint64_t bytes, int iters, double *read_gbs, double *copy_gbs) {
    int dev = 0, n_dev = 0;
    cudaError_t e = cudaGetDeviceCount(&n_dev);
    if (e != cudaSuccess || n_dev == 0)
        fail(DS4_E_BACKEND, "no CUDA device (%s)", e != cudaSuccess ? cudaGetErrorString(e) : "none found");
    DS4_CUDA_CHECK(cudaGetDevice(&dev));
    size_t free_b = 0, total_b = 0;
    DS4_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));

    if (bytes == 0) bytes = kDefaultBytes;
    const uint64_t avail = free_b > kReserveBytes ? free_b - kReserveBytes : 0;
    bytes = std::min<uint64_t>(bytes, avail);
    bytes &= ~((2ull << 20) - 1);  // whole 2 MiB units: both halves stay 16-byte aligned
    if (bytes < kMinBytes)
        fail(DS4_E_NOMEM, "bandwidth probe: only %.2f GiB of GPU memory free (need >= 64 MiB + 1 GiB reserve)",
             static_cast<double>(free_b) / (1ull << 30));
    if (iters <= 0) iters = kDefaultIters;

    Resources r;
    DS4_CUDA_CHECK(cudaMalloc(&r.buf, bytes));
    DS4_CUDA_CHECK(cudaMalloc(reinterpret_cast<void **>(&r.sink), sizeof(unsigned)));
    DS4_CUDA_CHECK(cudaMemset(r.buf, 0x5a, bytes));  // touch every page before timing
    DS4_CUDA_CHECK(cudaMemset(r.sink, 0, sizeof(unsigned)));
    DS4_CUDA_CHECK(cudaEventCreate(&r.start));
    DS4_CUDA_CHECK(cudaEventCreate(&r.stop));

    int n_sm = 0, per_sm_read = 0, per_sm_copy = 0;
    DS4_CUDA_CHECK(cudaDeviceGetAttribute(&n_sm, cudaDevAttrMultiProcessorCount, dev));
    DS4_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm_read, read_kernel, kThreads, 0));
    DS4_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm_copy, copy_kernel, kThreads, 0));
    const int grid_read = n_sm * std::max(1, per_sm_read);
    const int grid_copy = n_sm * std::max(1, per_sm_copy);

    const uint64_t n_all = bytes / sizeof(uint4);
    const uint64_t n_half = n_all / 2;
    const uint4 *src = static_cast<const uint4 *>(r.buf);
    uint4 *dst = static_cast<uint4 *>(r.buf) + n_half;

    std::vector<double> rd, cp;
    for (int it = -2; it < iters; ++it) {  // two warm-up runs
        float ms_r = 0.f, ms_c = 0.f;
        DS4_CUDA_CHECK(cudaEventRecord(r.start));
        read_kernel<<<grid_read, kThreads>>>(src, n_all, r.sink);
        DS4_CUDA_CHECK(cudaGetLastError());
        DS4_CUDA_CHECK(cudaEventRecord(r.stop));
        DS4_CUDA_CHECK(cudaEventSynchronize(r.stop));
        DS4_CUDA_CHECK(cudaEventElapsedTime(&ms_r, r.start, r.stop));

        DS4_CUDA_CHECK(cudaEventRecord(r.start));
        copy_kernel<<<grid_copy, kThreads>>>(src, dst, n_half);
        DS4_CUDA_CHECK(cudaGetLastError());
        DS4_CUDA_CHECK(cudaEventRecord(r.stop));
        DS4_CUDA_CHECK(cudaEventSynchronize(r.stop));
        DS4_CUDA_CHECK(cudaEventElapsedTime(&ms_c, r.start, r.stop));
        if (it >= 0) {
            rd.push_back(static_cast<double>(n_all * sizeof(uint4)) / (ms_r * 1e-3) / 1e9);
            cp.push_back(static_cast<double>(2 * n_half * sizeof(uint4)) / (ms_c * 1e-3) / 1e9);
        }
    }
    *read_gbs = median(rd);
    *copy_gbs = median(cp);
}

}  // namespace ds4
