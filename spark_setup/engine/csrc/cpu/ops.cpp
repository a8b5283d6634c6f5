// cpu/ops.cpp: see ops.h.
#include "cpu/ops.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <numeric>

#include "quant.h"

namespace ds4::cpu {

void rms_norm(const float *x, int64_t n, const float *w, float eps, float *out) {
    double ss = 0.0;  // sum of squares in double: one reduction order, independent of n
    for (int64_t i = 0; i < n; i++) ss += (double)x[i] * (double)x[i];
    const float r = (float)(1.0 / std::sqrt(ss / (double)n + (double)eps));
    for (int64_t i = 0; i < n; i++) out[i] = w ? (x[i] * r) * w[i] : x[i] * r;
}

void softmax(float *x, int64_t n) {
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < n; i++) m = std::max(m, x[i]);
    if (!std::isfinite(m)) {  // all -inf: nothing to weigh (callers never pass this)
        for (int64_t i = 0; i < n; i++) x[i] = 0.0f;
        return;
    }
    double s = 0.0;
    for (int64_t i = 0; i < n; i++) {
        x[i] = std::exp(x[i] - m);
        s += x[i];
    }
    const float inv = (float)(1.0 / s);
    for (int64_t i = 0; i < n; i++) x[i] *= inv;
}

void Rope::init(int n_rot, double base, bool yarn, double factor, double orig_ctx, double beta_fast,
                double beta_slow) {
    const int half = n_rot / 2;
    inv_freq.assign(half, 0.0f);
    // YaRN correction range: the pair index where a dimension completes `rot` rotations over orig_ctx,
    // floored/ceiled and clamped to [0, n_rot-1]; linear ramp between them over the pair index.
    auto corr_dim = [&](double rot) {
        return (n_rot * std::log(orig_ctx / (rot * 2.0 * M_PI))) / (2.0 * std::log(base));
    };
    double lo = std::max(0.0, std::floor(corr_dim(beta_fast)));
    double hi = std::min((double)(n_rot - 1), std::ceil(corr_dim(beta_slow)));
    if (lo == hi) hi += 0.001;
    for (int i = 0; i < half; i++) {
        const float pos_freq = (float)std::pow(base, (double)(2 * i) / (double)n_rot);
        const float extrap = 1.0f / pos_freq;
        if (!yarn) {
            inv_freq[i] = extrap;
            continue;
        }
        const float interp = 1.0f / ((float)factor * pos_freq);
        const float ramp = std::min(1.0f, std::max(0.0f, (float)((i - lo) / (hi - lo))));
        const float keep = 1.0f - ramp;  // weight of the original (extrapolated) frequency
        inv_freq[i] = interp * (1.0f - keep) + extrap * keep;
    }
}

void Rope::apply(float *x, int dim, int64_t pos, bool inverse) const {
    const int half = (int)inv_freq.size();
    float *r = x + dim - 2 * half;
    for (int i = 0; i < half; i++) {
        const float ang = (float)pos * inv_freq[i];
        const float c = std::cos(ang);
        const float s = inverse ? -std::sin(ang) : std::sin(ang);
        const float a = r[2 * i], b = r[2 * i + 1];
        r[2 * i] = a * c - b * s;
        r[2 * i + 1] = b * c + a * s;
    }
}

// ---- round-trips ------------------------------------------------------------------------------------------

static float round_half_even(float v) { return std::nearbyint(v); }  // default FE_TONEAREST

float e4m3_round(float x) {
    if (std::isnan(x)) return x;
    const float a = std::min(std::fabs(x), 448.0f);
    float q;
    if (a < 0.015625f) {  // below the smallest normal 2^-6: subnormal grid m * 2^-9
        q = round_half_even(a * 512.0f) / 512.0f;
    } else {
        int e;
        std::frexp(a, &e);                           // a = f * 2^e, f in [0.5, 1): exponent of a is e-1
        const float step = std::ldexp(1.0f, e - 1 - 3);  // 3 mantissa bits
        q = round_half_even(a / step) * step;        // exact: a/step is a/2^k
        q = std::min(q, 448.0f);
    }
    return std::copysign(q, x);
}

float e2m1_round(float x) {
    static const float grid[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
    if (std::isnan(x)) return x;
    const float a = std::fabs(x);
    int best = 7;
    for (int i = 0; i < 7; i++) {
        const float mid = 0.5f * (grid[i] + grid[i + 1]);
        if (a < mid) { best = i; break; }
        if (a == mid) { best = (i % 2 == 0) ? i : i + 1; break; }  // tie: even code
    }
    return std::copysign(grid[best], x);
}

float f16_round(float x) { return fp16_to_fp32(fp32_to_fp16(x)); }

// power-of-two scale 2^ceil(log2(v)), v > 0, computed exactly
static float pow2_ceil(float v) {
    int e;
    const float f = std::frexp(v, &e);  // v = f * 2^e, f in [0.5, 1)
    return f == 0.5f ? std::ldexp(1.0f, e - 1) : std::ldexp(1.0f, e);
}

void kv_roundtrip(float *x, int n, int n_nope) {
    for (int b0 = 0; b0 < n_nope; b0 += 64) {
        const int b1 = std::min(n_nope, b0 + 64);
        float amax = 0.0f;
        for (int i = b0; i < b1; i++) amax = std::max(amax, std::fabs(x[i]));
        const float scale = pow2_ceil(std::max(amax, 1e-4f) / 448.0f);
        for (int i = b0; i < b1; i++) x[i] = e4m3_round(x[i] / scale) * scale;
    }
    for (int i = 0; i < n; i++) x[i] = f16_round(x[i]);
}

void indexer_roundtrip(float *x, int n) {
    for (int len = 1; len < n; len <<= 1) {  // unnormalised Walsh-Hadamard, natural (Sylvester) order
        for (int i = 0; i < n; i += 2 * len) {
            for (int j = i; j < i + len; j++) {
                const float a = x[j], b = x[j + len];
                x[j] = a + b;
                x[j + len] = a - b;
            }
        }
    }
    const float norm = 1.0f / std::sqrt((float)n);
    for (int i = 0; i < n; i++) x[i] *= norm;
    for (int b0 = 0; b0 < n; b0 += 32) {
        float amax = 0.0f;
        for (int i = b0; i < b0 + 32; i++) amax = std::max(amax, std::fabs(x[i]));
        const float scale = pow2_ceil(std::max(amax, 7.052966e-38f) / 6.0f);
        for (int i = b0; i < b0 + 32; i++) x[i] = e2m1_round(x[i] / scale) * scale;
    }
    for (int i = 0; i < n; i++) x[i] = f16_round(x[i]);
}

void topk(const float *s, int n, int k, int *idx) {
    std::vector<int> order(n);
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int a, int b) {
        return s[a] > s[b] || (s[a] == s[b] && a < b);
    });
    std::copy(order.begin(), order.begin() + k, idx);
}

}  // namespace ds4::cpu
