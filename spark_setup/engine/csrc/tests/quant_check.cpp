// quant_check: internal-API checks that the C ABI cannot reach. Prints "ok" or the first failure, exit 0/1.
//  - cpu_matmul (the batched form the model uses for prompts) equals cpu_matvec per token, bit for bit, for
//    every kernel type, with 1, 2 and 8 threads;
//  - fp32_to_fp16 / fp16_to_fp32 round-trip every finite half exactly and round to nearest even;
//  - fp32_to_bf16 rounds to nearest even.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "common.h"
#include "quant.h"

namespace {

int fails = 0;
void expect(bool ok, const char *what) {
    if (!ok && fails++ == 0) std::printf("FAIL: %s\n", what);
}

uint32_t bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}

}  // namespace

int main() {
    std::mt19937 rng(1);
    const int types[] = {DS4_TYPE_F32, DS4_TYPE_F16, DS4_TYPE_BF16, DS4_TYPE_Q8_0, DS4_TYPE_Q2_K, DS4_TYPE_Q4_K,
                         DS4_TYPE_IQ2_XXS};
    for (int type : types) {
        const int64_t n_rows = 37, n_cols = 512, n_tok = 5;
        const size_t rb = ds4::row_bytes(type, n_cols);
        std::vector<uint8_t> w(rb * n_rows);
        for (auto &b : w) b = (uint8_t)rng();
        // finite scales/values: clear the top exponent bit of every 16-bit word (covers f16/bf16 and block scales)
        for (size_t i = 1; i < w.size(); i += 2) w[i] &= 0x3f;
        if (type == DS4_TYPE_F32)
            for (size_t i = 3; i < w.size(); i += 4) w[i] &= 0x3f;
        std::normal_distribution<float> nd;
        std::vector<float> X((size_t)(n_tok * n_cols));
        for (auto &x : X) x = nd(rng);
        for (int threads : {1, 2, 8}) {
            std::vector<float> Y((size_t)(n_tok * n_rows)), y((size_t)n_rows);
            ds4::cpu_matmul(type, w.data(), n_rows, n_cols, X.data(), n_tok, Y.data(), threads);
            for (int64_t t = 0; t < n_tok; t++) {
                ds4::cpu_matvec(type, w.data(), n_rows, n_cols, X.data() + t * n_cols, y.data(), 1);
                for (int64_t r = 0; r < n_rows; r++)
                    expect(bits(Y[(size_t)(t * n_rows + r)]) == bits(y[(size_t)r]) && std::isfinite(y[(size_t)r]),
                           ds4::type_name(type));
            }
        }
    }
    for (uint32_t h = 0; h < 0x10000; h++) {
        if ((h & 0x7c00) == 0x7c00) continue;  // inf/nan
        expect(ds4::fp32_to_fp16(ds4::fp16_to_fp32((uint16_t)h)) == h, "fp16 round trip");
    }
    expect(ds4::fp32_to_fp16(1.0f + 1.0f / 2048) == 0x3c00, "fp16 tie to even (down)");
    expect(ds4::fp32_to_fp16(1.0f + 3.0f / 2048) == 0x3c02, "fp16 tie to even (up)");
    expect(ds4::fp32_to_fp16(65520.0f) == 0x7c00, "fp16 overflow to inf");
    expect(ds4::fp32_to_fp16(std::ldexp(1.0f, -25)) == 0x0000, "fp16 half of the smallest subnormal -> 0");
    expect(ds4::fp32_to_fp16(std::ldexp(1.5f, -25)) == 0x0001, "fp16 above half the smallest subnormal -> 1");
    expect(ds4::fp32_to_bf16(1.0f + 1.0f / 256) == 0x3f80, "bf16 tie to even");
    expect(ds4::fp32_to_bf16(1.0f + 3.0f / 256) == 0x3f82, "bf16 tie to even (up)");
    if (fails == 0) std::printf("ok\n");
    return fails ? 1 : 0;
}
