// cpu/quant.cpp: reference CPU kernels over the GGML block formats (ds4-model-facts.md section F).
//
// Dequantization performs exactly the f32 operations of gguf-py's quants.py in the same order (the build uses
// -ffp-contract=off), so results are identical to the last bit. Matvec dequantizes a block at a time and
// accumulates w*x into 8 lanes (lane = column % 8, columns in increasing order), then sums the lanes in a fixed
// tree: results are deterministic and independent of the thread count and of matvec vs matmul.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <thread>
#include <vector>

#include "common.h"
#include "iq2xxs_grid.h"
#include "quant.h"

namespace ds4 {

// ---- type table (gguf constants GGML_QUANT_SIZES) ----------------------------------------------------------

namespace {
struct TypeDesc {
    int id;
    const char *name;
    int64_t block;
    size_t bytes;
};
constexpr TypeDesc kTypes[] = {
    {0, "F32", 1, 4},        {1, "F16", 1, 2},          {2, "Q4_0", 32, 18},      {3, "Q4_1", 32, 20},
    {6, "Q5_0", 32, 22},     {7, "Q5_1", 32, 24},       {8, "Q8_0", 32, 34},      {9, "Q8_1", 32, 40},
    {10, "Q2_K", 256, 84},   {11, "Q3_K", 256, 110},    {12, "Q4_K", 256, 144},   {13, "Q5_K", 256, 176},
    {14, "Q6_K", 256, 210},  {15, "Q8_K", 256, 292},    {16, "IQ2_XXS", 256, 66}, {17, "IQ2_XS", 256, 74},
    {18, "IQ3_XXS", 256, 98}, {19, "IQ1_S", 256, 50},   {20, "IQ4_NL", 32, 18},   {21, "IQ3_S", 256, 110},
    {22, "IQ2_S", 256, 82},  {23, "IQ4_XS", 256, 136},  {24, "I8", 1, 1},         {25, "I16", 1, 2},
    {26, "I32", 1, 4},       {27, "I64", 1, 8},         {28, "F64", 1, 8},        {29, "IQ1_M", 256, 56},
    {30, "BF16", 1, 2},      {34, "TQ1_0", 256, 54},    {35, "TQ2_0", 256, 66},   {39, "MXFP4", 32, 17},
};

const TypeDesc *type_desc(int type) {
    for (const TypeDesc &t : kTypes)
        if (t.id == type) return &t;
    return nullptr;
}
}  // namespace

int64_t block_size(int type) {
    const TypeDesc *t = type_desc(type);
    return t ? t->block : 0;
}

size_t type_size(int type) {
    const TypeDesc *t = type_desc(type);
    return t ? t->bytes : 0;
}

size_t row_bytes(int type, int64_t n_cols) {
    const TypeDesc *t = type_desc(type);
    if (!t || n_cols <= 0 || n_cols % t->block != 0) return 0;
    return (size_t)(n_cols / t->block) * t->bytes;
}

const char *type_name(int type) {
    const TypeDesc *t = type_desc(type);
    return t ? t->name : "?";
}

bool kernel_type_supported(int type) {
    switch (type) {
        case DS4_TYPE_F32: case DS4_TYPE_F16: case DS4_TYPE_BF16: case DS4_TYPE_Q8_0: case DS4_TYPE_Q2_K:
        case DS4_TYPE_Q4_K: case DS4_TYPE_IQ2_XXS:
            return true;
        default:
            return false;
    }
}

// ---- scalar conversions ----------------------------------------------------------------------------------

float fp16_to_fp32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t man = h & 0x3ffu;
    uint32_t u;
    if (exp == 0x1f) {
        u = sign | 0x7f800000u | (man << 13);  // inf / nan (payload kept)
    } else if (exp != 0) {
        u = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        u = sign;
    } else {  // subnormal half: normalise
        int e = -1;
        do {
            e++;
            man <<= 1;
        } while ((man & 0x400u) == 0);
        u = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ffu) << 13);
    }
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

uint16_t fp32_to_fp16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t absu = u & 0x7fffffffu;
    if (absu > 0x7f800000u) return (uint16_t)(sign | 0x7e00u | ((absu >> 13) & 0x3ffu));  // nan stays nan
    if (absu >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  // rounds to >= 65536: inf
    if (absu >= 0x38800000u) {  // normal half
        uint32_t mant_odd = (absu >> 13) & 1u;
        absu += 0xfffu + mant_odd;  // round to nearest even on the 13 dropped bits
        return (uint16_t)(sign | ((absu - 0x38000000u) >> 13));
    }
    if (absu < 0x33000001u) return (uint16_t)sign;  // below half the smallest subnormal: zero
    // subnormal half
    uint32_t e = absu >> 23;
    uint32_t m = (absu & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126 - e;  // 14 + (113 - e) - 1
    uint32_t q = m >> shift;
    uint32_t rem = m & ((1u << shift) - 1);
    uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1u))) q++;
    return (uint16_t)(sign | q);
}

uint16_t fp32_to_bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

// ---- block dequantizers: one block -> its values, exactly gguf-py's arithmetic ------------------------------

namespace {

inline uint16_t ld16(const uint8_t *p) {
    uint16_t v;
    std::memcpy(&v, p, 2);
    return v;
}
inline uint32_t ld32(const uint8_t *p) {
    uint32_t v;
    std::memcpy(&v, p, 4);
    return v;
}

// Q8_0: d:f16, q[32]:int8; w = q * d.
void deq_q8_0(const uint8_t *b, float *out) {
    const float d = fp16_to_fp32(ld16(b));
    const int8_t *q = reinterpret_cast<const int8_t *>(b + 2);
    for (int i = 0; i < 32; i++) out[i] = (float)q[i] * d;
}

// Q2_K: scales[16], qs[64], d:f16, dmin:f16. w = (d*sc)*q - (dmin*m).
void deq_q2_k(const uint8_t *b, float *out) {
    const uint8_t *scales = b;
    const uint8_t *qs = b + 16;
    const float d = fp16_to_fp32(ld16(b + 80));
    const float dmin = fp16_to_fp32(ld16(b + 82));
    for (int half = 0; half < 2; half++) {
        for (int j = 0; j < 4; j++) {
            for (int l = 0; l < 32; l++) {
                const int i = 128 * half + 32 * j + l;
                const uint8_t sc = scales[8 * half + 2 * j + l / 16];
                const float dl = d * (float)(sc & 0xf);
                const float ml = dmin * (float)(sc >> 4);
                const float q = (float)((qs[32 * half + l] >> (2 * j)) & 3);
                out[i] = dl * q - ml;
            }
        }
    }
}

// Q4_K: d:f16, dmin:f16, scales[12] (6-bit packed), qs[128]. w = (d*sc)*q - (dmin*m).
void deq_q4_k(const uint8_t *b, float *out) {
    const float d = fp16_to_fp32(ld16(b));
    const float dmin = fp16_to_fp32(ld16(b + 2));
    const uint8_t *s = b + 4;
    const uint8_t *qs = b + 16;
    for (int sb = 0; sb < 8; sb++) {
        uint8_t sc, mn;
        if (sb < 4) {
            sc = s[sb] & 63;
            mn = s[sb + 4] & 63;
        } else {
            sc = (uint8_t)((s[sb + 4] & 15) | ((s[sb - 4] >> 6) << 4));
            mn = (uint8_t)((s[sb + 4] >> 4) | ((s[sb] >> 6) << 4));
        }
        const float ds = d * (float)sc;
        const float dm = dmin * (float)mn;
        const int c = sb / 2, shift = (sb & 1) * 4;
        for (int l = 0; l < 32; l++) {
            const float q = (float)((qs[32 * c + l] >> shift) & 15);
            out[32 * sb + l] = ds * q - dm;
        }
    }
}

// IQ2_XXS: d:f16, then 8 groups of (4 grid indices, u32 with 4 x 7-bit sign indices and a 4-bit scale).
// w = ((d * (0.5 + s)) * 0.25) * grid * sign.
void deq_iq2_xxs(const uint8_t *b, float *out) {
    const float d = fp16_to_fp32(ld16(b));
    for (int g = 0; g < 8; g++) {
        const uint8_t *grp = b + 2 + 8 * g;
        const uint32_t w1 = ld32(grp + 4);
        const float db = d * (0.5f + (float)(w1 >> 28)) * 0.25f;
        for (int k = 0; k < 4; k++) {
            const uint64_t gv = kIQ2XXSGrid[grp[k]];
            const uint8_t signs = iq2xxs_sign_byte((w1 >> (7 * k)) & 127u);
            for (int e = 0; e < 8; e++) {
                const float mag = (float)((gv >> (8 * e)) & 0xff);
                const float sgn = (signs >> e) & 1 ? -1.0f : 1.0f;
                out[32 * g + 8 * k + e] = db * mag * sgn;
            }
        }
    }
}

// Dequantize n values of a row starting at column c0 (c0, n multiples of the block size; for F32/F16/BF16 any).
void deq_span(int type, const uint8_t *row, int64_t c0, int64_t n, float *out) {
    switch (type) {
        case DS4_TYPE_F32:
            std::memcpy(out, row + 4 * c0, (size_t)n * 4);
            return;
        case DS4_TYPE_F16:
            for (int64_t i = 0; i < n; i++) out[i] = fp16_to_fp32(ld16(row + 2 * (c0 + i)));
            return;
        case DS4_TYPE_BF16:
            for (int64_t i = 0; i < n; i++) out[i] = bf16_to_fp32(ld16(row + 2 * (c0 + i)));
            return;
        case DS4_TYPE_Q8_0:
            for (int64_t i = 0; i < n; i += 32) deq_q8_0(row + (c0 + i) / 32 * 34, out + i);
            return;
        case DS4_TYPE_Q2_K:
            for (int64_t i = 0; i < n; i += 256) deq_q2_k(row + (c0 + i) / 256 * 84, out + i);
            return;
        case DS4_TYPE_Q4_K:
            for (int64_t i = 0; i < n; i += 256) deq_q4_k(row + (c0 + i) / 256 * 144, out + i);
            return;
        case DS4_TYPE_IQ2_XXS:
            for (int64_t i = 0; i < n; i += 256) deq_iq2_xxs(row + (c0 + i) / 256 * 66, out + i);
            return;
        default:
            fail(DS4_E_ARG, "quant kernels do not support type %d (%s)", type, type_name(type));
    }
}

void check_shape(int type, int64_t n_cols, const char *what) {
    if (!kernel_type_supported(type))
        fail(DS4_E_ARG, "%s: quant kernels do not support type %d (%s)", what, type, type_name(type));
    if (n_cols <= 0 || n_cols % block_size(type) != 0)
        fail(DS4_E_ARG, "%s: %lld columns is not a positive multiple of the %s block size %lld", what,
             (long long)n_cols, type_name(type), (long long)block_size(type));
}

constexpr int64_t kChunk = 256;  // columns dequantized at a time (a multiple of every block size and of 8)

// 8-lane dot accumulation over columns [c0, c0+n), c0 a multiple of 8.
inline void acc8(float *acc, const float *w, const float *x, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; l++) acc[l] += w[i + l] * x[i + l];
    for (int l = 0; i + l < n; l++) acc[l] += w[i + l] * x[i + l];
}

inline float reduce8(const float *a) { return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7])); }

int pick_threads(int n_threads, int64_t n_rows, double work_bytes) {
    if (n_threads <= 0) {
        unsigned hc = std::thread::hardware_concurrency();
        n_threads = (int)std::min(8u, hc ? hc : 1u);
    }
    if (work_bytes < 4.0e6) n_threads = 1;  // thread start-up would dominate
    return (int)std::max<int64_t>(1, std::min<int64_t>(n_threads, n_rows));
}

template <class F>
void parallel_rows(int64_t n_rows, int n_threads, F &&fn) {
    if (n_threads <= 1) {
        fn(0, n_rows);
        return;
    }
    std::vector<std::thread> th;
    std::vector<std::exception_ptr> errs((size_t)n_threads);
    int64_t per = (n_rows + n_threads - 1) / n_threads;
    for (int t = 0; t < n_threads; t++) {
        int64_t a = t * per, b = std::min(n_rows, a + per);
        if (a >= b) break;
        th.emplace_back([&, t, a, b] {
            try {
                fn(a, b);
            } catch (...) {
                errs[(size_t)t] = std::current_exception();
            }
        });
    }
    for (auto &x : th) x.join();
    for (auto &e : errs)
        if (e) std::rethrow_exception(e);
}

}  // namespace

void cpu_dequant_rows(int type, const void *data, int64_t n_cols, int64_t r0, int64_t r1, float *out) {
    check_shape(type, n_cols, "dequantize");
    if (r0 < 0 || r1 < r0) fail(DS4_E_ARG, "dequantize: bad row range [%lld, %lld)", (long long)r0, (long long)r1);
    const size_t rb = row_bytes(type, n_cols);
    const uint8_t *base = static_cast<const uint8_t *>(data);
    for (int64_t r = r0; r < r1; r++) deq_span(type, base + (size_t)r * rb, 0, n_cols, out + (r - r0) * n_cols);
}

void cpu_matvec(int type, const void *W, int64_t n_rows, int64_t n_cols, const float *x, float *y, int n_threads) {
    cpu_matmul(type, W, n_rows, n_cols, x, 1, y, n_threads);
}

void cpu_matmul(int type, const void *W, int64_t n_rows, int64_t n_cols, const float *X, int64_t n_tok, float *Y,
                int n_threads) {
    check_shape(type, n_cols, "matvec");
    if (n_rows < 0 || n_tok < 0) fail(DS4_E_ARG, "matvec: negative size");
    const size_t rb = row_bytes(type, n_cols);
    const uint8_t *base = static_cast<const uint8_t *>(W);
    int nt = pick_threads(n_threads, n_rows, (double)rb * (double)n_rows * (double)std::max<int64_t>(1, n_tok / 4));
    parallel_rows(n_rows, nt, [&](int64_t a, int64_t b) {
        std::vector<float> wbuf((size_t)kChunk);
        std::vector<float> acc((size_t)(8 * n_tok));
        for (int64_t r = a; r < b; r++) {
            const uint8_t *row = base + (size_t)r * rb;
            std::fill(acc.begin(), acc.end(), 0.0f);
            for (int64_t c0 = 0; c0 < n_cols; c0 += kChunk) {
                const int64_t n = std::min(kChunk, n_cols - c0);
                deq_span(type, row, c0, n, wbuf.data());
                for (int64_t t = 0; t < n_tok; t++) acc8(&acc[(size_t)(8 * t)], wbuf.data(), X + t * n_cols + c0, n);
            }
            for (int64_t t = 0; t < n_tok; t++) Y[t * n_rows + r] = reduce8(&acc[(size_t)(8 * t)]);
        }
    });
}

}  // namespace ds4
