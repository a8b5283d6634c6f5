// cpu/ops.h: the small numeric pieces of the DS4 forward pass on the CPU (f32 values; the quantized matrix
// products live in quant.h). Reference implementations: plain loops, one obvious order of operations.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

namespace ds4::cpu {

// out = x / sqrt(mean(x^2) + eps) (* w when w != nullptr). out may alias x.
void rms_norm(const float *x, int64_t n, const float *w, float eps, float *out);

inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }
inline float silu(float x) { return x / (1.0f + std::exp(-x)); }
// torch.nn.functional.softplus with its default threshold (linear above 20).
inline float softplus(float x) { return x > 20.0f ? x : std::log1p(std::exp(x)); }

// In-place softmax over n values (max-subtracted). -inf entries get weight 0.
void softmax(float *x, int64_t n);

// Rotary tables for one layer kind: inv_freq[i] for the n_rot/2 interleaved pairs.
struct Rope {
    std::vector<float> inv_freq;
    // base: rope theta. yarn: apply YaRN (factor, original context, beta_fast/slow; no magnitude factor).
    void init(int n_rot, double base, bool yarn, double factor, double orig_ctx, double beta_fast, double beta_slow);
    // Rotate the trailing n_rot dims of x[0..dim) by angle pos*theta_i (inverse: -pos*theta_i). Pairs are
    // (2i, 2i+1) within the rope slice.
    void apply(float *x, int dim, int64_t pos, bool inverse = false) const;
};

// ---- numeric round-trips of the official model (ds4-model-facts.md D/I) ----
// Nearest FP8 E4M3 value (finite format, max 448; |x| > 448 clamps), ties to the even code.
float e4m3_round(float x);
// Nearest FP4 E2M1 value of {0,0.5,1,1.5,2,3,4,6} with sign (|x| > 6 clamps), ties to the even code.
float e2m1_round(float x);
// Nearest binary16 value (round to nearest even), returned as f32.
float f16_round(float x);
// KV row round-trip: FP8 E4M3 with one power-of-two scale per 64-value block over dims [0, n_nope), then
// every value (rope dims included) rounded to F16.
void kv_roundtrip(float *x, int n, int n_nope);
// Indexer round-trip: Walsh-Hadamard (natural order) scaled by 1/sqrt(n), then FP4 E2M1 with one power-of-two
// scale per 32-value block, then F16. n must be a power of two and a multiple of 32. The result stays in the
// Hadamard domain (queries and keys both are, so dot products are unchanged by the rotation itself).
void indexer_roundtrip(float *x, int n);

// Indices of the k largest of s[0..n) (k <= n), in descending score order; equal scores: lower index first.
void topk(const float *s, int n, int k, int *idx);

}  // namespace ds4::cpu
