// bandwidth.cpp: ds4_bandwidth_probe, the memory-bandwidth measurement behind `spark-setup roofline`.
//
// Decode of one stream is a pass over ~9 GB of weights per token, so its ceiling is the memory read bandwidth.
// The probe measures two numbers over a buffer of `bytes` (the footprint):
//   read: every byte of the buffer is loaded and folded into a checksum (nothing written);
//   copy: the first half is copied onto the second half (bytes read + bytes written = `bytes`).
// Each is timed `iters` times after a warm-up; the median is reported in GB/s (1e9 B/s).
// CPU backend: one std::thread per hardware thread, each over its own slice (first-touched by that thread).
// CUDA backend: cuda/bandwidth.cu (device buffer, CUDA-event timing).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "common.h"

namespace ds4 {

#ifdef DS4_WITH_CUDA
// cuda/bandwidth.cu; throws ds4::Error.
void cuda_bandwidth_probe(uint64_t bytes, int iters, double *read_gbs, double *copy_gbs);
#endif

namespace {

constexpr uint64_t kCpuDefaultBytes = 1ull << 30;  // 1 GiB: well past every last-level cache
constexpr int kCpuDefaultIters = 5;

double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    const size_t n = v.size();
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// XOR of 64-bit words into 8 independent lanes: the loads are the work, the XORs keep them alive, and the
// compiler turns the lanes into vector registers (wide loads, no dependency chain between iterations).
uint64_t read_words(const uint64_t *p, size_t n) {
    uint64_t acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; ++k) acc[k] ^= p[i + k];
    uint64_t s = 0;
    for (; i < n; ++i) s ^= p[i];
    for (int k = 0; k < 8; ++k) s ^= acc[k];
    return s;
}

std::atomic<uint64_t> g_sink{0};  // results land here so the reads cannot be optimised away

struct AlignedFree {
    void operator()(void *p) const { std::free(p); }
};

// Run fn(thread_index, begin_word, end_word) on n_threads threads over [0, n_words) and return the wall time.
template <class F>
double run_threads(int n_threads, size_t n_words, F fn) {
    std::vector<std::thread> th;
    th.reserve(n_threads);
    const auto t0 = std::chrono::steady_clock::now();
    for (int t = 0; t < n_threads; ++t) {
        const size_t b = n_words * t / n_threads, e = n_words * (t + 1) / n_threads;
        th.emplace_back([=] { fn(t, b, e); });
    }
    for (auto &x : th) x.join();
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

void cpu_probe(uint64_t bytes, int iters, double *read_gbs, double *copy_gbs) {
    const size_t n_words = static_cast<size_t>(bytes / 16) * 2;  // even count: the copy splits it in halves
    if (n_words < 1024) fail(DS4_E_ARG, "ds4_bandwidth_probe: %llu bytes is too small (need >= 16 KiB)",
                             static_cast<unsigned long long>(bytes));
    void *raw = nullptr;
    if (posix_memalign(&raw, 4096, n_words * sizeof(uint64_t)) != 0 || raw == nullptr)
        fail(DS4_E_NOMEM, "ds4_bandwidth_probe: cannot allocate %llu bytes",
             static_cast<unsigned long long>(n_words * sizeof(uint64_t)));
    std::unique_ptr<void, AlignedFree> hold(raw);
    uint64_t *buf = static_cast<uint64_t *>(raw);
    const int n_threads = std::max(1u, std::thread::hardware_concurrency());

    // first touch from the thread that will stream the slice (pages land on its node)
    run_threads(n_threads, n_words, [&](int, size_t b, size_t e) {
        for (size_t i = b; i < e; ++i) buf[i] = i * 0x9E3779B97F4A7C15ull;
    });

    const size_t half = n_words / 2;
    std::vector<double> rd, cp;
    for (int it = -1; it < iters; ++it) {  // it == -1: warm-up, not recorded
        std::vector<uint64_t> part(n_threads, 0);
        const double tr = run_threads(n_threads, n_words, [&](int t, size_t b, size_t e) {
            part[t] = read_words(buf + b, e - b);
        });
        uint64_t s = 0;
        for (uint64_t x : part) s ^= x;
        g_sink.fetch_xor(s, std::memory_order_relaxed);
        const double tc = run_threads(n_threads, half, [&](int, size_t b, size_t e) {
            std::memcpy(buf + half + b, buf + b, (e - b) * sizeof(uint64_t));
        });
        if (it >= 0) {
            rd.push_back(static_cast<double>(n_words * sizeof(uint64_t)) / tr / 1e9);
            cp.push_back(static_cast<double>(2 * half * sizeof(uint64_t)) / tc / 1e9);
        }
    }
    *read_gbs = median(rd);
    *copy_gbs = median(cp);
}

}  // namespace
}  // namespace ds4

extern "C" int ds4_bandwidth_probe(int backend, uint64_t bytes, int32_t iters, double *read_gbs, double *copy_gbs) {
    return ds4::guard([&] {
        DS4_CHECK_ARG(read_gbs != nullptr && copy_gbs != nullptr, "ds4_bandwidth_probe: outputs must not be NULL");
        DS4_CHECK_ARG(iters >= 0 && iters <= 10000, "ds4_bandwidth_probe: iters must be 0 (default) .. 10000, got %d",
                      iters);
        double r = 0.0, c = 0.0;
        if (backend == DS4_BACKEND_CPU) {
            ds4::cpu_probe(bytes ? bytes : ds4::kCpuDefaultBytes, iters ? iters : ds4::kCpuDefaultIters, &r, &c);
        } else if (backend == DS4_BACKEND_CUDA) {
#ifdef DS4_WITH_CUDA
            ds4::cuda_bandwidth_probe(bytes, iters, &r, &c);  // 0 = defaults (8 GiB or what fits, 20 runs)
#else
            ds4::fail(DS4_E_BACKEND, "ds4_bandwidth_probe: this engine was built without CUDA (spark-setup build)");
#endif
        } else {
            ds4::fail(DS4_E_ARG, "ds4_bandwidth_probe: unknown backend %d", backend);
        }
        *read_gbs = r;
        *copy_gbs = c;
        return DS4_OK;
    });
}
