// cuda/quant.cu: the GPU twins of cpu/quant.cpp (same block formats, ds4-model-facts.md section F).
//
// Matvec is written for decode, where it is a pure stream over the weights:
//  - one warp per output row, several warps per block, persistent grid sized to fill every SM;
//  - the weights of a row are read in tiles of a whole number of quant blocks whose size is also a multiple of
//    16 bytes, with coalesced 16-byte loads (lane i loads chunks i, i+32, ...) into a per-warp shared-memory
//    tile (quant blocks are 34/66/84 bytes: unaligned for direct vector loads), then each lane decodes its blocks
//    from shared memory and multiplies with x (float4 loads through the read-only cache);
//  - the next tile (of the same or the warp's next row) is loaded into registers before the current one is
//    decoded, so every warp keeps a tile of loads in flight while it computes.
// Dequantization uses the exact operation order of the reference (with __fmul_rn/__fsub_rn: no FMA contraction)
// so that GPU and CPU dequantization agree to the bit.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <type_traits>
#include <vector>

#include "check.cuh"
#include "common.h"
#include "iq2xxs_grid.h"
#include "quant.h"

namespace ds4 {

namespace {

constexpr int kWarps = 8;  // warps (rows in flight) per block

__device__ const uint64_t d_iq2xxs_grid[256] = {DS4_IQ2XXS_GRID_VALUES};

__device__ __forceinline__ float ld_half(const uint8_t *p) {
    return __half2float(__ushort_as_half((unsigned short)(p[0] | (p[1] << 8))));
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float4 ldx4(const float *p) { return __ldg(reinterpret_cast<const float4 *>(p)); }

// Small integers to float without I2F (a quarter-rate instruction that would bound these kernels): one PRMT puts
// byte k of w into the low mantissa bits of 2^23, one FADD removes 2^23. Exact.
__device__ __forceinline__ float ubyte_f(uint32_t w, int k) {
    return __uint_as_float(__byte_perm(w, 0x4B00u, 0x5440u | (unsigned)k)) - 8388608.0f;
}
// Signed byte k, given wb = w ^ 0x80808080 (each byte biased by 128).
__device__ __forceinline__ float sbyte_f(uint32_t wb, int k) {
    return __uint_as_float(__byte_perm(wb, 0x4B00u, 0x5440u | (unsigned)k)) - 8388736.0f;
}

// ---- per-type tile geometry and lane decode+dot ----------------------------------------------------------------

template <int T>
struct Q;

// Q8_0: 34-byte blocks of 32; tile = 32 blocks (1088 B = 68 chunks); lane = one block.
template <>
struct Q<DS4_TYPE_Q8_0> {
    static constexpr int BB = 34, BV = 32, BPT = 32;
    __device__ static float dot(const uint8_t *tile, int lane, int nvalid, const float *x, const uint64_t *) {
        if (lane >= nvalid) return 0.0f;
        const uint8_t *p = tile + BB * lane;
        const float d = ld_half(p);
        const unsigned short *q2 = reinterpret_cast<const unsigned short *>(p + 2);
        const float *xb = x + BV * lane;
        float s0 = 0.0f, s1 = 0.0f;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const float4 xv = ldx4(xb + 4 * i);
            const uint32_t wb = ((uint32_t)q2[2 * i] | ((uint32_t)q2[2 * i + 1] << 16)) ^ 0x80808080u;
            s0 = fmaf(sbyte_f(wb, 0), xv.x, s0);
            s1 = fmaf(sbyte_f(wb, 1), xv.y, s1);
            s0 = fmaf(sbyte_f(wb, 2), xv.z, s0);
            s1 = fmaf(sbyte_f(wb, 3), xv.w, s1);
        }
        return (s0 + s1) * d;
    }
};

// Q2_K: 84-byte blocks of 256; tile = 8 blocks (672 B = 42 chunks); lane = a quarter block (64 values).
template <>
struct Q<DS4_TYPE_Q2_K> {
    static constexpr int BB = 84, BV = 256, BPT = 8;
    __device__ static float dot(const uint8_t *tile, int lane, int nvalid, const float *x, const uint64_t *) {
        const int b = lane >> 2, sub = lane & 3;
        if (b >= nvalid) return 0.0f;
        const uint8_t *p = tile + BB * b;
        const float d = ld_half(p + 80), dmin = ld_half(p + 82);
        const int half = sub >> 1;
        const uint32_t *qs = reinterpret_cast<const uint32_t *>(p + 16 + 32 * half);
        float acc = 0.0f;
#pragma unroll
        for (int jj = 0; jj < 2; jj++) {
            const int j = 2 * (sub & 1) + jj;
#pragma unroll
            for (int h16 = 0; h16 < 2; h16++) {  // two 16-value sub-blocks, each with its own scale/min
                const uint8_t sc = p[8 * half + 2 * j + h16];
                const float *xb = x + BV * b + 128 * half + 32 * j + 16 * h16;
                float sq = 0.0f, sx = 0.0f;
#pragma unroll
                for (int w = 0; w < 4; w++) {
                    const uint32_t q4 = (qs[4 * h16 + w] >> (2 * j)) & 0x03030303u;
                    const float4 xv = ldx4(xb + 4 * w);
                    sq = fmaf(ubyte_f(q4, 0), xv.x, sq);
                    sq = fmaf(ubyte_f(q4, 1), xv.y, sq);
                    sq = fmaf(ubyte_f(q4, 2), xv.z, sq);
                    sq = fmaf(ubyte_f(q4, 3), xv.w, sq);
                    sx += (xv.x + xv.y) + (xv.z + xv.w);
                }
                acc = fmaf(d * (float)(sc & 15), sq, acc);
                acc = fmaf(-dmin * (float)(sc >> 4), sx, acc);
            }
        }
        return acc;
    }
};

__device__ __forceinline__ void q4k_scale_min(const uint8_t *s, int sb, float *sc, float *mn) {
    if (sb < 4) {
        *sc = (float)(s[sb] & 63);
        *mn = (float)(s[sb + 4] & 63);
    } else {
        *sc = (float)((s[sb + 4] & 15) | ((s[sb - 4] >> 6) << 4));
        *mn = (float)((s[sb + 4] >> 4) | ((s[sb] >> 6) << 4));
    }
}

// Q4_K: 144-byte blocks of 256; tile = 8 blocks (1152 B = 72 chunks); lane = a quarter block (2 sub-blocks).
template <>
struct Q<DS4_TYPE_Q4_K> {
    static constexpr int BB = 144, BV = 256, BPT = 8;
    __device__ static float dot(const uint8_t *tile, int lane, int nvalid, const float *x, const uint64_t *) {
        const int b = lane >> 2, c = lane & 3;
        if (b >= nvalid) return 0.0f;
        const uint8_t *p = tile + BB * b;
        const float d = ld_half(p), dmin = ld_half(p + 2);
        float sc0, mn0, sc1, mn1;
        q4k_scale_min(p + 4, 2 * c, &sc0, &mn0);
        q4k_scale_min(p + 4, 2 * c + 1, &sc1, &mn1);
        const uint32_t *qs = reinterpret_cast<const uint32_t *>(p + 16 + 32 * c);
        const float *xb = x + BV * b + 64 * c;
        float s0 = 0.0f, x0 = 0.0f, s1 = 0.0f, x1 = 0.0f;
#pragma unroll
        for (int w = 0; w < 8; w++) {
            const uint32_t lo = qs[w] & 0x0F0F0F0Fu, hi = (qs[w] >> 4) & 0x0F0F0F0Fu;
            const float4 a = ldx4(xb + 4 * w), h = ldx4(xb + 32 + 4 * w);
            s0 = fmaf(ubyte_f(lo, 0), a.x, s0);
            s0 = fmaf(ubyte_f(lo, 1), a.y, s0);
            s0 = fmaf(ubyte_f(lo, 2), a.z, s0);
            s0 = fmaf(ubyte_f(lo, 3), a.w, s0);
            s1 = fmaf(ubyte_f(hi, 0), h.x, s1);
            s1 = fmaf(ubyte_f(hi, 1), h.y, s1);
            s1 = fmaf(ubyte_f(hi, 2), h.z, s1);
            s1 = fmaf(ubyte_f(hi, 3), h.w, s1);
            x0 += (a.x + a.y) + (a.z + a.w);
            x1 += (h.x + h.y) + (h.z + h.w);
        }
        float acc = d * sc0 * s0 - dmin * mn0 * x0;
        return acc + (d * sc1 * s1 - dmin * mn1 * x1);
    }
};

// IQ2_XXS: 66-byte blocks of 256; tile = 16 blocks (1056 B = 66 chunks); lane = half a block (4 groups of 32).
// tabs = the grid (256 entries) then, per 7-bit sign index, 8 byte masks (0xFF = negative), both in shared memory.
// Signs are applied to 4 grid bytes at once (see the comment in the loop).
template <>
struct Q<DS4_TYPE_IQ2_XXS> {
    static constexpr int BB = 66, BV = 256, BPT = 16;
    __device__ static float dot(const uint8_t *tile, int lane, int nvalid, const float *x, const uint64_t *tabs) {
        const int b = lane >> 1, g0 = 4 * (lane & 1);
        if (b >= nvalid) return 0.0f;
        const uint8_t *p = tile + BB * b;
        const float d = ld_half(p);
        const unsigned short *u = reinterpret_cast<const unsigned short *>(p + 2);
        float acc = 0.0f;
#pragma unroll
        for (int g = g0; g < g0 + 4; g++) {
            const uint32_t w0 = (uint32_t)u[4 * g] | ((uint32_t)u[4 * g + 1] << 16);
            const uint32_t w1 = (uint32_t)u[4 * g + 2] | ((uint32_t)u[4 * g + 3] << 16);
            const float *xg = x + BV * b + 32 * g;
            float s = 0.0f;
#pragma unroll
            for (int k = 0; k < 4; k++) {
                const uint64_t gv = tabs[(w0 >> (8 * k)) & 0xff];
                const uint64_t m = tabs[256 + ((w1 >> (7 * k)) & 127u)];
                const uint32_t m_lo = (uint32_t)m, m_hi = (uint32_t)(m >> 32);
                // biased signed bytes 128 +- g: (g ^ m) + 128 - m per byte (every byte result lies in 85..171, so
                // the 32-bit add and subtract give exactly these bytes): one LOP3 + one IADD3 per 4 weights.
                const uint32_t lo = ((uint32_t)gv ^ m_lo) + 0x80808080u - m_lo;
                const uint32_t hi = ((uint32_t)(gv >> 32) ^ m_hi) + 0x80808080u - m_hi;
                const float4 xa = ldx4(xg + 8 * k), xb = ldx4(xg + 8 * k + 4);
                s = fmaf(sbyte_f(lo, 0), xa.x, s);
                s = fmaf(sbyte_f(lo, 1), xa.y, s);
                s = fmaf(sbyte_f(lo, 2), xa.z, s);
                s = fmaf(sbyte_f(lo, 3), xa.w, s);
                s = fmaf(sbyte_f(hi, 0), xb.x, s);
                s = fmaf(sbyte_f(hi, 1), xb.y, s);
                s = fmaf(sbyte_f(hi, 2), xb.z, s);
                s = fmaf(sbyte_f(hi, 3), xb.w, s);
            }
            acc = fmaf(d * (0.5f + (float)(w1 >> 28)) * 0.25f, s, acc);
        }
        return acc;
    }
};

// ---- row maps: which weights / input / output a global row index stands for -----------------------------------

struct PlainRows {
    const uint8_t *W;
    size_t rb;
    const float *x;
    float *y;
    __device__ const uint8_t *row(int64_t g) const { return W + (size_t)g * rb; }
    __device__ const float *xin(int64_t) const { return x; }
    __device__ float *out(int64_t g) const { return y + g; }
    bool uniform_x_groups(int) const { return true; }  // one x for every row
    static constexpr bool kConstWeights = true;        // row addresses depend on nothing a previous kernel writes
};

struct ExpertRows {
    const uint8_t *W0, *W1;
    float *y0, *y1;
    int64_t stride, n_rows, per_mat, x_stride;
    size_t rb;
    const int32_t *ids;
    const float *x;
    bool ids_settled = false;  // ExpertMatvec::ids_settled
    __device__ const uint8_t *row(int64_t g) const {
        const int m = g >= per_mat;
        const int64_t rem = g - (m ? per_mat : 0);
        const int64_t e = rem / n_rows, r = rem - e * n_rows;
        return (m ? W1 : W0) + (size_t)(ids ? ids[e] : e) * (size_t)stride + (size_t)r * rb;
    }
    __device__ const float *xin(int64_t g) const {
        const int64_t rem = g >= per_mat ? g - per_mat : g;
        return x + (rem / n_rows) * x_stride;
    }
    __device__ float *out(int64_t g) const { return g >= per_mat ? y1 + (g - per_mat) : y0 + g; }
    // groups of `n` consecutive rows stay inside one expert (so they share x) when n divides n_rows
    bool uniform_x_groups(int n) const { return n_rows % n == 0; }
    static constexpr bool kConstWeights = false;  // row addresses read the expert ids
};

// ---- the quantized matvec kernel -------------------------------------------------------------------------------

template <int T, bool ALIGNED, class Rows>
__global__ void __launch_bounds__(32 * kWarps) matvec_q(Rows rows, int64_t total_rows, int nblocks) {
    using QT = Q<T>;
    constexpr int TB = QT::BB * QT::BPT;  // tile bytes
    constexpr int CH = TB / 16;            // 16-byte chunks per tile
    constexpr int NL = (CH + 31) / 32;     // loads per lane
    static_assert(TB % 16 == 0, "tile must be a whole number of 16-byte chunks");

    __shared__ uint4 tiles[kWarps][CH];
    __shared__ uint64_t tabs[T == DS4_TYPE_IQ2_XXS ? 256 + 128 : 1];
    if (T == DS4_TYPE_IQ2_XXS) {
        for (int i = threadIdx.x; i < 256; i += blockDim.x) tabs[i] = d_iq2xxs_grid[i];
        for (int i = threadIdx.x; i < 128; i += blockDim.x) {
            const uint32_t sb = iq2xxs_sign_byte((uint32_t)i);
            uint64_t m = 0;
            for (int e = 0; e < 8; e++)
                if ((sb >> e) & 1) m |= (uint64_t)0xff << (8 * e);
            tabs[256 + i] = m;
        }
        __syncthreads();
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int64_t warp_id = (int64_t)blockIdx.x * kWarps + warp, n_warps = (int64_t)gridDim.x * kWarps;
    const int tiles_per_row = (nblocks + QT::BPT - 1) / QT::BPT;
    uint8_t *tile = reinterpret_cast<uint8_t *>(tiles[warp]);

    // Work items of this warp: (row = warp_id + k * n_warps, tile t) in row-major order.
    int64_t r = warp_id;
    int t = 0;
    if (r >= total_rows) return;
    uint4 reg[NL];
#pragma unroll
    for (int k = 0; k < NL; k++) reg[k] = make_uint4(0, 0, 0, 0);
    auto load = [&](int64_t rr, int tt) {
        const uint8_t *src = rows.row(rr) + (size_t)tt * TB;
        const int valid = min(QT::BPT, nblocks - tt * QT::BPT) * QT::BB;
#pragma unroll
        for (int k = 0; k < NL; k++) {
            const int c = lane + 32 * k;
            if (ALIGNED) {
                if (c < CH && 16 * c < valid) reg[k] = __ldg(reinterpret_cast<const uint4 *>(src) + c);
            } else if (c < CH) {
                uint32_t w[4] = {0, 0, 0, 0};
#pragma unroll
                for (int i = 0; i < 16; i++)
                    if (16 * c + i < valid) w[i / 4] |= (uint32_t)__ldg(src + 16 * c + i) << (8 * (i % 4));
                reg[k] = make_uint4(w[0], w[1], w[2], w[3]);
            }
        }
    };
    load(r, t);
    float acc = 0.0f;
    while (true) {
        __syncwarp();
#pragma unroll
        for (int k = 0; k < NL; k++) {
            const int c = lane + 32 * k;
            if (c < CH) tiles[warp][c] = reg[k];
        }
        __syncwarp();
        // next work item, prefetched while this tile is decoded
        int64_t nr = r;
        int nt = t + 1;
        if (nt == tiles_per_row) {
            nr = r + n_warps;
            nt = 0;
        }
        if (nr < total_rows) load(nr, nt);
        const int nvalid = min(QT::BPT, nblocks - t * QT::BPT);
        acc += QT::dot(tile, lane, nvalid, rows.xin(r) + (int64_t)t * QT::BPT * QT::BV, tabs);
        if (nt == 0) {
            acc = warp_sum(acc);
            if (lane == 0) *rows.out(r) = acc;
            acc = 0.0f;
        }
        if (nr >= total_rows) break;
        r = nr;
        t = nt;
    }
}


// ---- v2: several rows per warp, cp.async double buffering, coalesced x ------------------------------------------
// v1 above reads x with lane-contiguous float4 loads (lane i: columns 32i.. or 128i..): every load instruction
// touches 32 different cache lines, and on an H200 the L1 traffic for x, not HBM, bounded it (15-20% of copy
// bandwidth for Q8_0). v2 fixes both sides:
//  - lanes own interleaved columns: in round k, lane l handles columns 256k + 8l .. +7 of the tile, so the x loads
//    of a warp cover 1 KB contiguously;
//  - a warp computes kRows rows at once: each x load serves kRows rows (x traffic / kRows);
//  - tiles go global -> shared with cp.async (no register staging), double buffered: the next tile group is in
//    flight while the current one is decoded.
constexpr int kW2 = 4;    // warps per block
constexpr int kRows = 4;  // rows per warp

__device__ __forceinline__ void cp_async16(void *smem, const void *gmem) {
    const unsigned sa = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(sa), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait1() { asm volatile("cp.async.wait_group 1;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait0() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

__device__ __forceinline__ float dot8_s(uint32_t w0, uint32_t w1, const float (&xs)[8]) {  // biased signed bytes
    float s = sbyte_f(w0, 0) * xs[0];
    s = fmaf(sbyte_f(w0, 1), xs[1], s);
    s = fmaf(sbyte_f(w0, 2), xs[2], s);
    s = fmaf(sbyte_f(w0, 3), xs[3], s);
    s = fmaf(sbyte_f(w1, 0), xs[4], s);
    s = fmaf(sbyte_f(w1, 1), xs[5], s);
    s = fmaf(sbyte_f(w1, 2), xs[6], s);
    return fmaf(sbyte_f(w1, 3), xs[7], s);
}
__device__ __forceinline__ float dot8_u(uint32_t w0, uint32_t w1, const float (&xs)[8]) {  // unsigned bytes
    float s = ubyte_f(w0, 0) * xs[0];
    s = fmaf(ubyte_f(w0, 1), xs[1], s);
    s = fmaf(ubyte_f(w0, 2), xs[2], s);
    s = fmaf(ubyte_f(w0, 3), xs[3], s);
    s = fmaf(ubyte_f(w1, 0), xs[4], s);
    s = fmaf(ubyte_f(w1, 1), xs[5], s);
    s = fmaf(ubyte_f(w1, 2), xs[6], s);
    return fmaf(ubyte_f(w1, 3), xs[7], s);
}
__device__ __forceinline__ uint32_t ld_u32_2(const uint8_t *p) {  // 2-byte aligned 32-bit load from shared memory
    const unsigned short *u = reinterpret_cast<const unsigned short *>(p);
    return (uint32_t)u[0] | ((uint32_t)u[1] << 16);
}

// One round of one row: the lane's 8 weights (columns 256k + 8l .. +7 of the tile) times xs; sx = sum of xs.
template <int T>
struct V2;

template <>
struct V2<DS4_TYPE_Q8_0> {  // tile 32 blocks = 1024 columns; the lane's 8 weights: block 8k + l/4, offset 8(l%4)
    static constexpr int BB = 34, BV = 32, BPT = 32, ROUNDS = 4;
    __device__ static bool valid(int k, int lane, int nvalid) { return 8 * k + (lane >> 2) < nvalid; }
    __device__ static float dot(const uint8_t *tile, int k, int lane, const float (&xs)[8], float, const uint64_t *) {
        const uint8_t *p = tile + BB * (8 * k + (lane >> 2));
        const uint8_t *q = p + 2 + 8 * (lane & 3);
        return dot8_s(ld_u32_2(q) ^ 0x80808080u, ld_u32_2(q + 4) ^ 0x80808080u, xs) * ld_half(p);
    }
};

template <>
struct V2<DS4_TYPE_Q2_K> {  // tile 8 blocks; round k = block k; element i = 8l + e
    static constexpr int BB = 84, BV = 256, BPT = 8, ROUNDS = 8;
    __device__ static bool valid(int k, int, int nvalid) { return k < nvalid; }
    __device__ static float dot(const uint8_t *tile, int k, int lane, const float (&xs)[8], float sx, const uint64_t *) {
        const uint8_t *p = tile + BB * k;
        const int half = lane >> 4, j = (lane >> 2) & 3, sub = lane & 3;  // i/128, (i%128)/32, (i%32)/8
        const uint32_t *q = reinterpret_cast<const uint32_t *>(p + 16 + 32 * half + 8 * sub);
        const float s = dot8_u((q[0] >> (2 * j)) & 0x03030303u, (q[1] >> (2 * j)) & 0x03030303u, xs);
        const uint8_t sc = p[8 * half + 2 * j + (sub >> 1)];
        return (ld_half(p + 80) * (float)(sc & 15)) * s - (ld_half(p + 82) * (float)(sc >> 4)) * sx;
    }
};

template <>
struct V2<DS4_TYPE_Q4_K> {  // tile 8 blocks; round k = block k; chunk c = l/8 of 64, low/high nibble = (l/4)%2
    static constexpr int BB = 144, BV = 256, BPT = 8, ROUNDS = 8;
    __device__ static bool valid(int k, int, int nvalid) { return k < nvalid; }
    __device__ static float dot(const uint8_t *tile, int k, int lane, const float (&xs)[8], float sx, const uint64_t *) {
        const uint8_t *p = tile + BB * k;
        const int c = lane >> 3, hi = (lane >> 2) & 1;
        const uint32_t *q = reinterpret_cast<const uint32_t *>(p + 16 + 32 * c + 8 * (lane & 3));
        const float s = dot8_u((q[0] >> (4 * hi)) & 0x0F0F0F0Fu, (q[1] >> (4 * hi)) & 0x0F0F0F0Fu, xs);
        float sc, mn;
        q4k_scale_min(p + 4, 2 * c + hi, &sc, &mn);
        return (ld_half(p) * sc) * s - (ld_half(p + 2) * mn) * sx;
    }
};

template <>
struct V2<DS4_TYPE_IQ2_XXS> {  // tile 16 blocks; round k = block k; group l/4, grid entry l%4 of that group
    static constexpr int BB = 66, BV = 256, BPT = 16, ROUNDS = 16;
    __device__ static bool valid(int k, int, int nvalid) { return k < nvalid; }
    __device__ static float dot(const uint8_t *tile, int k, int lane, const float (&xs)[8], float, const uint64_t *tabs) {
        const uint8_t *p = tile + BB * k;
        const uint8_t *grp = p + 2 + 8 * (lane >> 2);
        const int e = lane & 3;
        const uint32_t w0 = ld_u32_2(grp), w1 = ld_u32_2(grp + 4);
        const uint64_t gv = tabs[(w0 >> (8 * e)) & 0xff];
        const uint64_t m = tabs[256 + ((w1 >> (7 * e)) & 127u)];
        const uint32_t m_lo = (uint32_t)m, m_hi = (uint32_t)(m >> 32);
        const uint32_t lo = ((uint32_t)gv ^ m_lo) + 0x80808080u - m_lo;  // see Q<IQ2_XXS>
        const uint32_t hi = ((uint32_t)(gv >> 32) ^ m_hi) + 0x80808080u - m_hi;
        return (ld_half(p) * (0.5f + (float)(w1 >> 28)) * 0.25f) * dot8_s(lo, hi, xs);
    }
};

// ---- v3 / v4: the v2 lane mapping with cheaper decodes -----------------------------------------------------------
// Counted from v2's code (bench/kernels.md, "analysis"): per 8 weights a lane spends ~34 (Q8_0) to ~50 (IQ2_XXS,
// Q2_K) instructions and 6-15 shared-memory wavefronts; both bound the quant-2 types near 1-1.4 TB/s on an H200.
// v3 trims what does not depend on the weight count: f16 scales with one 16-bit load instead of two byte loads,
// 4-bit scales to float with OR + FADD instead of I2F (quarter rate), Q8_0 quants with three aligned 32-bit loads
// and two funnel shifts instead of four 16-bit loads. v4 = v3 plus IQ2_XXS signs computed in registers (parity +
// a multiply that spreads 4 bits to 4 bytes) instead of a second random 8-byte shared-memory lookup per lane.
__device__ __forceinline__ float ld_h16(const uint8_t *p) {  // f16 at a 2-byte aligned address
    return __half2float(__ushort_as_half(*reinterpret_cast<const unsigned short *>(p)));
}
__device__ __forceinline__ float small_f(uint32_t u) {  // u < 2^23 to float, exact, without I2F
    return __uint_as_float(0x4B000000u | u) - 8388608.0f;
}
// 8 bytes at a 2-byte aligned address as two little-endian words: 3 aligned 32-bit loads + 2 funnel shifts.
// Reads up to 4 bytes past the 8 (the stage rows of v3 carry a 16-byte pad for that).
__device__ __forceinline__ void ld8_a2(const uint8_t *p, uint32_t &w0, uint32_t &w1) {
    const unsigned mis = (unsigned)(reinterpret_cast<uintptr_t>(p) & 3u);
    const uint32_t *u = reinterpret_cast<const uint32_t *>(p - mis);
    const uint32_t u0 = u[0], u1 = u[1], u2 = u[2];
    w0 = __funnelshift_r(u0, u1, 8 * mis);
    w1 = __funnelshift_r(u1, u2, 8 * mis);
}
// IQ2_XXS sign byte of a 7-bit index (bit 7 = parity of the 7) as two words of byte masks (0xFF = negative):
// (t * 0x00204081) & 0x01010101 moves bit i of a nibble t to bit 8i; * 255 widens each 0/1 byte to 0x00/0xFF.
__device__ __forceinline__ void iq2_sign_masks(uint32_t s7, uint32_t &m_lo, uint32_t &m_hi) {
    const uint32_t s8 = s7 | ((__popc(s7) & 1u) << 7);
    m_lo = (((s8 & 15u) * 0x00204081u) & 0x01010101u) * 255u;
    m_hi = (((s8 >> 4) * 0x00204081u) & 0x01010101u) * 255u;
}

template <int T, bool ARITH_SIGNS>
struct V3;

template <bool AS>
struct V3<DS4_TYPE_Q8_0, AS> {
    static constexpr int BB = 34, BV = 32, BPT = 32, ROUNDS = 4;
    __device__ static bool valid(int k, int lane, int nvalid) { return 8 * k + (lane >> 2) < nvalid; }
    __device__ static float dot(const uint8_t *tile, int k, int lane, const float (&xs)[8], float, const uint64_t *) {
        const uint8_t *p = tile + BB * (8 * k + (lane >> 2));
        uint32_t w0, w1;
        ld8_a2(p + 2 + 8 * (lane & 3), w0, w1);
        return dot8_s(w0 ^ 0x80808080u, w1 ^ 0x80808080u, xs) * ld_h16(p);
    }
};

template <bool AS>
struct V3<DS4_TYPE_Q2_K, AS> {
    static constexpr int BB = 84, BV = 256, BPT = 8, ROUNDS = 8;
    __device__ static bool valid(int k, int, int nvalid) { return k < nvalid; }
    __device__ static float dot(const uint8_t *tile, int k, int lane, const float (&xs)[8], float sx, const uint64_t *) {
        const uint8_t *p = tile + BB * k;
        const int half = lane >> 4, j = (lane >> 2) & 3, sub = lane & 3;
        const uint32_t *q = reinterpret_cast<const uint32_t *>(p + 16 + 32 * half + 8 * sub);
        const float s = dot8_u((q[0] >> (2 * j)) & 0x03030303u, (q[1] >> (2 * j)) & 0x03030303u, xs);
        const uint32_t sc = p[8 * half + 2 * j + (sub >> 1)];
        return (ld_h16(p + 80) * small_f(sc & 15u)) * s - (ld_h16(p + 82) * small_f(sc >> 4)) * sx;
    }
};

template <bool AS>
struct V3<DS4_TYPE_Q4_K, AS> {
    static constexpr int BB = 144, BV = 256, BPT = 8, ROUNDS = 8;
    __device__ static bool valid(int k, int, int nvalid) { return k < nvalid; }
    __device__ static float dot(const uint8_t *tile, int k, int lane, const float (&xs)[8], float sx, const uint64_t *) {
        const uint8_t *p = tile + BB * k;
        const int c = lane >> 3, hi = (lane >> 2) & 1, sb = 2 * c + hi;
        const uint32_t *q = reinterpret_cast<const uint32_t *>(p + 16 + 32 * c + 8 * (lane & 3));
        const float s = dot8_u((q[0] >> (4 * hi)) & 0x0F0F0F0Fu, (q[1] >> (4 * hi)) & 0x0F0F0F0Fu, xs);
        const uint8_t *sp = p + 4;
        uint32_t sc, mn;
        if (sb < 4) {
            sc = sp[sb] & 63u;
            mn = sp[sb + 4] & 63u;
        } else {
            sc = (sp[sb + 4] & 15u) | ((uint32_t)(sp[sb - 4] >> 6) << 4);
            mn = (uint32_t)(sp[sb + 4] >> 4) | ((uint32_t)(sp[sb] >> 6) << 4);
        }
        return (ld_h16(p) * small_f(sc)) * s - (ld_h16(p + 2) * small_f(mn)) * sx;
    }
};

template <bool AS>
struct V3<DS4_TYPE_IQ2_XXS, AS> {  // AS: signs from registers (v4) instead of the shared mask table (v3)
    static constexpr int BB = 66, BV = 256, BPT = 16, ROUNDS = 16;
    __device__ static bool valid(int k, int, int nvalid) { return k < nvalid; }
    __device__ static float dot(const uint8_t *tile, int k, int lane, const float (&xs)[8], float, const uint64_t *tabs) {
        const uint8_t *p = tile + BB * k;
        const uint8_t *grp = p + 2 + 8 * (lane >> 2);
        const int e = lane & 3;
        const uint32_t w1 = ld_u32_2(grp + 4);
        const uint64_t gv = tabs[grp[e]];
        uint32_t m_lo, m_hi;
        if (AS) {
            iq2_sign_masks((w1 >> (7 * e)) & 127u, m_lo, m_hi);
        } else {
            const uint64_t m = tabs[256 + ((w1 >> (7 * e)) & 127u)];
            m_lo = (uint32_t)m;
            m_hi = (uint32_t)(m >> 32);
        }
        const uint32_t lo = ((uint32_t)gv ^ m_lo) + 0x80808080u - m_lo;  // see Q<IQ2_XXS>
        const uint32_t hi = ((uint32_t)(gv >> 32) ^ m_hi) + 0x80808080u - m_hi;
        // d * (0.5 + s) * 0.25 == d * (0.125 + 0.25 s): both factors exact
        return (ld_h16(p) * fmaf(small_f(w1 >> 28), 0.25f, 0.125f)) * dot8_s(lo, hi, xs);
    }
};

// Decode struct of a kernel version (2, 3, 4).
template <int T, int VER>
struct Dec {
    using type = V3<T, VER >= 4>;
};
template <int T>
struct Dec<T, 2> {
    using type = V2<T>;
};

__device__ void iq2_tables(uint64_t *tabs) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) tabs[i] = d_iq2xxs_grid[i];
    for (int i = threadIdx.x; i < 128; i += blockDim.x) {
        const uint32_t sb = iq2xxs_sign_byte((uint32_t)i);
        uint64_t m = 0;
        for (int e = 0; e < 8; e++)
            if ((sb >> e) & 1) m |= (uint64_t)0xff << (8 * e);
        tabs[256 + i] = m;
    }
    __syncthreads();
}

// Requires 16-byte aligned rows (row bytes and base) and, for every group of kRows consecutive rows, one x.
// VER 2, 3, 4, 5 pick the decode (Dec; 5 decodes as 4); v3+ stage rows carry one extra 16-byte chunk (ld8_a2 reads
// past the row). VER 5 is launched with programmatic dependent launch (PDL, sm_90+): the kernel lets the next
// kernel of the stream launch at once (griddepcontrol.launch_dependents), and waits for the previous one
// (griddepcontrol.wait) only before reading anything that kernel may have written: x, expert ids, y. Plain rows
// start streaming their first weight tile before that wait (weights are constant during a decode step), so the
// launch latency and the ramp overlap the previous kernel's tail. Launched without the attribute, both are no-ops.
__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;\n" ::: "memory"); }
__device__ __forceinline__ void pdl_launch_dependents() { asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory"); }

template <int T, class Rows, int VER>
__global__ void __launch_bounds__(32 * kW2) matvec_v2(Rows rows, int64_t total_rows, int nblocks) {
    using V = typename Dec<T, VER>::type;
    constexpr bool PDL = VER >= 5;
    if (PDL) pdl_launch_dependents();
    constexpr int TB = V::BB * V::BPT, CH = TB / 16, RS = CH + (VER >= 3 ? 1 : 0);
    static_assert(TB % 16 == 0 && V::ROUNDS * 256 == V::BPT * V::BV, "tile geometry");
    __shared__ uint4 stage[kW2][2][kRows][RS];
    __shared__ uint64_t tabs[T == DS4_TYPE_IQ2_XXS ? 256 + 128 : 1];
    if (T == DS4_TYPE_IQ2_XXS) iq2_tables(tabs);

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int64_t n_groups = (total_rows + kRows - 1) / kRows;
    const int64_t n_warps = (int64_t)gridDim.x * kW2;
    int64_t g = (int64_t)blockIdx.x * kW2 + warp;
    if (PDL && !Rows::kConstWeights) pdl_wait();  // expert rows: the weight addresses depend on the router's ids
    if (g >= n_groups) return;
    const int tpr = (nblocks + V::BPT - 1) / V::BPT;

    auto issue = [&](int64_t gg, int tt, int st) {
        const int valid = min(V::BPT, nblocks - tt * V::BPT) * V::BB;
#pragma unroll
        for (int rr = 0; rr < kRows; rr++) {
            const int64_t r = gg * kRows + rr;
            if (r < total_rows) {
                const uint8_t *src = rows.row(r) + (size_t)tt * TB;
                for (int c = lane; c < CH && 16 * c < valid; c += 32) cp_async16(&stage[warp][st][rr][c], src + 16 * c);
            }
        }
        cp_async_commit();
    };

    int t = 0, st = 0;
    issue(g, t, st);
    if (PDL && Rows::kConstWeights) pdl_wait();  // before the first x read and any y write
    float acc[kRows];
#pragma unroll
    for (int rr = 0; rr < kRows; rr++) acc[rr] = 0.0f;
    while (true) {
        int64_t ng = g;
        int nt = t + 1;
        if (nt == tpr) {
            ng = g + n_warps;
            nt = 0;
        }
        const bool more = ng < n_groups;
        if (more)
            issue(ng, nt, st ^ 1);
        else
            cp_async_commit();  // keep the group count uniform for wait_group 1
        cp_async_wait1();
        __syncwarp();
        const int nvalid = min(V::BPT, nblocks - t * V::BPT);
        const float *xt = rows.xin(g * kRows) + (int64_t)t * V::BPT * V::BV;
        const uint8_t *tile = reinterpret_cast<const uint8_t *>(stage[warp][st][0]);
// v3+: unrolled (Q8_0 fully, 4 rounds; the others by 2, to keep the code within the instruction cache) so that
// per-lane addresses fold into immediates and the next round's loads issue before this round's arithmetic
#pragma unroll(VER >= 3 ? (V::ROUNDS <= 4 ? V::ROUNDS : 2) : 1)
        for (int k = 0; k < V::ROUNDS; k++) {
            if (!V::valid(k, lane, nvalid)) continue;
            const float4 a = ldx4(xt + 256 * k + 8 * lane), b = ldx4(xt + 256 * k + 8 * lane + 4);
            const float xs[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
            const float sx = ((a.x + a.y) + (a.z + a.w)) + ((b.x + b.y) + (b.z + b.w));
#pragma unroll
            for (int rr = 0; rr < kRows; rr++) acc[rr] += V::dot(tile + rr * RS * 16, k, lane, xs, sx, tabs);
        }
        __syncwarp();  // every lane is done with this stage before it is refilled
        if (nt == 0) {
#pragma unroll
            for (int rr = 0; rr < kRows; rr++) {
                const float v = warp_sum(acc[rr]);
                const int64_t r = g * kRows + rr;
                if (lane == 0 && r < total_rows) *rows.out(r) = v;
                acc[rr] = 0.0f;
            }
        }
        if (!more) break;
        g = ng;
        t = nt;
        st ^= 1;
    }
    cp_async_wait0();
}

// Kernel version: cuda_set_matvec_version(v), v = 1..7 or 9, forces one version for every quant type; 0 (the default;
// the environment variable DS4_MATVEC_VERSION=N overrides it at the first launch) picks per type (auto_version).
int g_matvec_version = -1;  // -1 = not read from the environment yet

// Per-type choice of version 0 ("auto"): v6 (tensor-core decode, matvec6.cuh) for the types it has, from H200
// runs 8-15 (bench/h200/run15-1427: graph timing, output head 85-89% of copy vs 74-76% for v2, routed Q2 experts 28%
// vs 16-17%); v2 for Q4_K (v6 has no Q4_K decoder). v2-v5 stay selectable (DS4_MATVEC_VERSION) for comparison.
int auto_version(int type) {
    return type == DS4_TYPE_Q8_0 || type == DS4_TYPE_Q2_K || type == DS4_TYPE_IQ2_XXS ? 6 : 2;
}

int matvec_version_for(int type) {
    if (g_matvec_version < 0) {
        const char *e = std::getenv("DS4_MATVEC_VERSION");
        const int v = e ? std::atoi(e) : 0;
        g_matvec_version = v >= 0 && v <= 9 && v != 8 ? v : 0;
    }
    return g_matvec_version > 0 ? g_matvec_version : auto_version(type);
}

// F32 / F16 / BF16: rows are plain arrays: direct 16-byte loads (4 floats or 8 halves per lane per step).
template <int T>
__device__ __forceinline__ float dot16(uint4 w, const float *x) {
    const float4 a = ldx4(x);
    if (T == DS4_TYPE_F32) {
        return __uint_as_float(w.x) * a.x + __uint_as_float(w.y) * a.y + __uint_as_float(w.z) * a.z +
               __uint_as_float(w.w) * a.w;
    } else {
        const float4 b = ldx4(x + 4);
        const uint32_t ws[4] = {w.x, w.y, w.z, w.w};
        const float xs[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
        float s = 0.0f;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            float lo, hi;
            if (T == DS4_TYPE_F16) {
                lo = __half2float(__ushort_as_half((unsigned short)(ws[i] & 0xffff)));
                hi = __half2float(__ushort_as_half((unsigned short)(ws[i] >> 16)));
            } else {
                lo = __uint_as_float(ws[i] << 16);
                hi = __uint_as_float(ws[i] & 0xffff0000u);
            }
            s = fmaf(lo, xs[2 * i], s);
            s = fmaf(hi, xs[2 * i + 1], s);
        }
        return s;
    }
}

template <int T, bool ALIGNED, class Rows>
__global__ void __launch_bounds__(32 * kWarps) matvec_f(Rows rows, int64_t total_rows, int64_t n_cols) {
    constexpr int ES = T == DS4_TYPE_F32 ? 4 : 2;  // element size
    constexpr int EPC = 16 / ES;                     // elements per 16-byte chunk
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int64_t n_warps = (int64_t)gridDim.x * kWarps;
    for (int64_t r = (int64_t)blockIdx.x * kWarps + warp; r < total_rows; r += n_warps) {
        const uint8_t *w = rows.row(r);
        const float *x = rows.xin(r);
        float acc = 0.0f;
        const int64_t n_chunks = ALIGNED ? n_cols / EPC : 0;
        for (int64_t c = lane; c < n_chunks; c += 32) acc += dot16<T>(__ldg(reinterpret_cast<const uint4 *>(w) + c), x + c * EPC);
        for (int64_t i = n_chunks * EPC + lane; i < n_cols; i += 32) {  // tail (or everything when unaligned)
            float v;
            if (T == DS4_TYPE_F32) {
                uint32_t u = 0;
                for (int k = 0; k < 4; k++) u |= (uint32_t)__ldg(w + 4 * i + k) << (8 * k);
                v = __uint_as_float(u);
            } else {
                const unsigned short h = (unsigned short)(__ldg(w + 2 * i) | (__ldg(w + 2 * i + 1) << 8));
                v = T == DS4_TYPE_F16 ? __half2float(__ushort_as_half(h)) : __uint_as_float((uint32_t)h << 16);
            }
            acc = fmaf(v, __ldg(x + i), acc);
        }
        acc = warp_sum(acc);
        if (lane == 0) *rows.out(r) = acc;
    }
}

// An attribute of the current device; 0 when it cannot be read (the CUDA error is cleared).
int device_attr(cudaDeviceAttr attr) {
    int dev = 0, v = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&v, attr, dev) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    return v;
}

int sm_count() {
    static const int n = device_attr(cudaDevAttrMultiProcessorCount);
    return n > 0 ? n : 16;
}

// Blocks for a persistent launch: enough to fill every SM at the kernel's occupancy (per_sm, computed once per
// kernel by the caller), fewer for small matrices. `rows_per_block` = rows one block handles at a time.
template <class K>
int grid_for(K kernel, int *per_sm, int threads, int64_t total_rows, int rows_per_block) {
    if (*per_sm == 0) {
        int n = 0;
        if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, 0) != cudaSuccess || n < 1) n = 1;
        *per_sm = n;
    }
    const int64_t want = (total_rows + rows_per_block - 1) / rows_per_block;
    return (int)std::max<int64_t>(1, std::min<int64_t>(want, (int64_t)sm_count() * *per_sm));
}

#include "matvec6.cuh"
#include "mm6.cuh"

template <int T, class Rows, int VER>
void launch_v(const Rows &rows, int64_t total, int64_t n_cols, cudaStream_t s) {
    auto k = matvec_v2<T, Rows, VER>;
    static int per_sm = 0;
    const int grid = grid_for(k, &per_sm, 32 * kW2, total, kW2 * kRows);
    const int nblocks = (int)(n_cols / Q<T>::BV);
    if (VER < 5) {
        k<<<grid, 32 * kW2, 0, s>>>(rows, total, nblocks);
        return;
    }
    launch_pdl(k, grid, 32 * kW2, 0, s, rows, total, nblocks);
}

template <int T, bool AL, class Rows>
void launch_q(const Rows &rows, int64_t total, int64_t n_cols, cudaStream_t s) {
    int ver = matvec_version_for(T);
    if constexpr (T == DS4_TYPE_Q8_0 || T == DS4_TYPE_Q2_K || T == DS4_TYPE_IQ2_XXS) {
        // The default (version 0) runs v6 in the configuration that fits the shape, below. Forced versions test one
        // configuration each: 6 = 16 warps per CTA (8 where the shared memory does not allow it; the default before
        // session 5, again the first choice for plain Q8_0 since run 66), 7 = 8 warps (a GB10 has ~99 KB per block),
        // 9 = 4 warps.
        // v9: 4 warps, several CTAs per SM, plain Q8_0 matrices that need no column split (attn_q_b, the output
        // head: runs 34-38, attn_q_b 76-77% of copy against v6's 70-71%, the output head within the run-to-run
        // spread of v6's); since the cheaper chunk copy (aaf6841) it comes after 16 warps, where those fit
        const bool by_shape = ver == 6 && g_matvec_version == 0;
        auto v9 = [&] {
            if constexpr (T == DS4_TYPE_Q8_0 && Rows::kConstWeights) return v6::launch<T, 4>(rows, total, n_cols, s);
            return false;
        };
        // Plain Q8_0 matrices take 16 warps first: with the cheaper chunk copy (aaf6841) they lead in every round of
        // run 65 (three rounds of every version on the same weights): attn_output_b 71-72% of copy against 68-69%
        // for 8 warps, the output head 87% against 86%, attn_q_b 76-77% against v9's 75-77%, attn_output_a and the
        // shared expert equal. Expert-row Q8_0 (the forward pass's grouped attn_output_a and its pairs) keeps 8 warps
        // first (two CTAs per SM on an H200; run 65: grouped 70-72% against 68-69%; run 49 before: 68% against 61%).
        // Where 16 warps do not fit (a GB10), plain matrices take v9, then 8 warps, as before.
        // The 2-bit types try 12 warps first: a layer's 6 routed experts are 1536 tiles of 16 rows, and 132 CTAs of 12
        // warps take one whole tile per warp, with no column split (run 51: down 12.6 -> 10.8 us, gate+up 20.8 -> 20.3;
        // 16 warps needed a 4-way split, three rounds per CTA, and the reductions between them)
        // The 2-bit types load x first (matvec6's XF; run 70); DS4_V6_XF=0 turns that off, for A/B runs only.
        static const bool x_first = [] {
            const char *e = std::getenv("DS4_V6_XF");
            return !e || std::atoi(e) != 0;
        }();
        auto v6_w = [&](auto w) {
            constexpr int W = decltype(w)::value;
            if constexpr (T != DS4_TYPE_Q8_0)
                if (x_first) return v6::launch<T, W, Rows, true>(rows, total, n_cols, s);
            return v6::launch<T, W, Rows, false>(rows, total, n_cols, s);
        };
        auto v6_16 = [&] { return v6_w(std::integral_constant<int, 16>{}); };
        auto v6_8 = [&] { return v6_w(std::integral_constant<int, 8>{}); };
        auto v6_2bit = [&] {
            if constexpr (T == DS4_TYPE_Q8_0) return false;
            else return v6_w(std::integral_constant<int, 12>{}) || v6_16() || v6_8();
        };
        auto v6_q8 = [&] { return Rows::kConstWeights ? v6_16() || v9() || v6_8() : v6_8() || v6_16(); };
        if (AL && by_shape && (T == DS4_TYPE_Q8_0 ? v6_q8() : v6_2bit())) return;
        if (AL && ver == 6 && !by_shape && (v6_16() || v6_8())) return;
        if (AL && ver == 7 && v6_8()) return;
        if (AL && ver == 9 && v9()) return;
    }
    if (ver >= 6) ver = T == DS4_TYPE_IQ2_XXS ? 4 : 2;  // shapes (or types) v6 / v7 do not take
    if (AL && ver >= 2 && rows.uniform_x_groups(kRows)) {
        if (ver == 2)
            launch_v<T, Rows, 2>(rows, total, n_cols, s);
        else if (ver == 3)
            launch_v<T, Rows, 3>(rows, total, n_cols, s);
        else if (ver == 4)
            launch_v<T, Rows, 4>(rows, total, n_cols, s);
        else
            launch_v<T, Rows, 5>(rows, total, n_cols, s);
        return;
    }
    auto k = matvec_q<T, AL, Rows>;
    static int per_sm = 0;
    k<<<grid_for(k, &per_sm, 32 * kWarps, total, kWarps), 32 * kWarps, 0, s>>>(rows, total, (int)(n_cols / Q<T>::BV));
}

template <int T, bool AL, class Rows>
void launch_f(const Rows &rows, int64_t total, int64_t n_cols, cudaStream_t s) {
    auto k = matvec_f<T, AL, Rows>;
    static int per_sm = 0;
    k<<<grid_for(k, &per_sm, 32 * kWarps, total, kWarps), 32 * kWarps, 0, s>>>(rows, total, n_cols);
}

template <bool AL, class Rows>
void launch_type(int type, const Rows &rows, int64_t total, int64_t n_cols, cudaStream_t s) {
    switch (type) {
        case DS4_TYPE_Q8_0: launch_q<DS4_TYPE_Q8_0, AL>(rows, total, n_cols, s); break;
        case DS4_TYPE_Q2_K: launch_q<DS4_TYPE_Q2_K, AL>(rows, total, n_cols, s); break;
        case DS4_TYPE_Q4_K: launch_q<DS4_TYPE_Q4_K, AL>(rows, total, n_cols, s); break;
        case DS4_TYPE_IQ2_XXS: launch_q<DS4_TYPE_IQ2_XXS, AL>(rows, total, n_cols, s); break;
        case DS4_TYPE_F32: launch_f<DS4_TYPE_F32, AL>(rows, total, n_cols, s); break;
        case DS4_TYPE_F16: launch_f<DS4_TYPE_F16, AL>(rows, total, n_cols, s); break;
        case DS4_TYPE_BF16: launch_f<DS4_TYPE_BF16, AL>(rows, total, n_cols, s); break;
        default: fail(DS4_E_ARG, "CUDA matvec does not support type %d (%s)", type, type_name(type));
    }
    DS4_CUDA_CHECK(cudaGetLastError());
}

void check_cols(int type, int64_t n_cols, const char *what) {
    if (!kernel_type_supported(type))
        fail(DS4_E_ARG, "%s: quant kernels do not support type %d (%s)", what, type, type_name(type));
    if (n_cols <= 0 || n_cols % block_size(type) != 0 || n_cols > (int64_t)1 << 30)
        fail(DS4_E_ARG, "%s: %lld columns is not a positive multiple of the %s block size %lld", what,
             (long long)n_cols, type_name(type), (long long)block_size(type));
}

// ---- dequantization (exact reference arithmetic) ---------------------------------------------------------------

__device__ void deq_block(int type, const uint8_t *b, float *out) {
    switch (type) {
        case DS4_TYPE_Q8_0: {
            const float d = ld_half(b);
            for (int i = 0; i < 32; i++) out[i] = __fmul_rn((float)(int8_t)b[2 + i], d);
            break;
        }
        case DS4_TYPE_Q2_K: {
            const float d = ld_half(b + 80), dmin = ld_half(b + 82);
            for (int i = 0; i < 256; i++) {
                const int half = i >> 7, j = (i & 127) >> 5, l = i & 31;
                const uint8_t sc = b[8 * half + 2 * j + l / 16];
                const float q = (float)((b[16 + 32 * half + l] >> (2 * j)) & 3);
                out[i] = __fsub_rn(__fmul_rn(__fmul_rn(d, (float)(sc & 15)), q), __fmul_rn(dmin, (float)(sc >> 4)));
            }
            break;
        }
        case DS4_TYPE_Q4_K: {
            const float d = ld_half(b), dmin = ld_half(b + 2);
            for (int sb = 0; sb < 8; sb++) {
                float sc, mn;
                q4k_scale_min(b + 4, sb, &sc, &mn);
                const float ds = __fmul_rn(d, sc), dm = __fmul_rn(dmin, mn);
                const int c = sb >> 1, sh = (sb & 1) * 4;
                for (int l = 0; l < 32; l++)
                    out[32 * sb + l] = __fsub_rn(__fmul_rn(ds, (float)((b[16 + 32 * c + l] >> sh) & 15)), dm);
            }
            break;
        }
        case DS4_TYPE_IQ2_XXS: {
            const float d = ld_half(b);
            for (int g = 0; g < 8; g++) {
                const uint8_t *grp = b + 2 + 8 * g;
                const uint32_t w1 = (uint32_t)grp[4] | ((uint32_t)grp[5] << 8) | ((uint32_t)grp[6] << 16) |
                                    ((uint32_t)grp[7] << 24);
                const float db = __fmul_rn(__fmul_rn(d, __fadd_rn(0.5f, (float)(w1 >> 28))), 0.25f);
                for (int k = 0; k < 4; k++) {
                    const uint64_t gv = d_iq2xxs_grid[grp[k]];
                    const uint32_t sg = iq2xxs_sign_byte((w1 >> (7 * k)) & 127u);
                    for (int e = 0; e < 8; e++)
                        out[32 * g + 8 * k + e] =
                            __fmul_rn(__fmul_rn(db, (float)((gv >> (8 * e)) & 0xff)), (sg >> e) & 1 ? -1.0f : 1.0f);
                }
            }
            break;
        }
        case DS4_TYPE_F16: out[0] = ld_half(b); break;
        case DS4_TYPE_BF16: out[0] = __uint_as_float(((uint32_t)b[0] | ((uint32_t)b[1] << 8)) << 16); break;
        case DS4_TYPE_F32:
            out[0] = __uint_as_float((uint32_t)b[0] | ((uint32_t)b[1] << 8) | ((uint32_t)b[2] << 16) | ((uint32_t)b[3] << 24));
            break;
        default: break;
    }
}

__global__ void dequant_kernel(int type, const uint8_t *data, size_t rb, int bs, int ts, int64_t blocks_per_row,
                               int64_t r0, int64_t n_blocks, float *out) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n_blocks; i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t r = i / blocks_per_row, k = i - r * blocks_per_row;
        deq_block(type, data + (size_t)(r0 + r) * rb + (size_t)k * ts, out + r * blocks_per_row * bs + k * bs);
    }
}

}  // namespace

void cuda_set_matvec_version(int v) { g_matvec_version = v; }
void cuda_set_matvec_diag(int d) { v6::g_diag = d; }

void cuda_dequant_rows(int type, const void *d_data, int64_t n_cols, int64_t r0, int64_t r1, float *d_out,
                       cudaStream_t stream) {
    check_cols(type, n_cols, "CUDA dequantize");
    if (r0 < 0 || r1 < r0) fail(DS4_E_ARG, "CUDA dequantize: bad row range [%lld, %lld)", (long long)r0, (long long)r1);
    if (r1 == r0) return;
    const int64_t bpr = n_cols / block_size(type);
    const int64_t nb = bpr * (r1 - r0);
    const int threads = 128;
    const int grid = (int)std::min<int64_t>((nb + threads - 1) / threads, 65535);
    dequant_kernel<<<grid, threads, 0, stream>>>(type, static_cast<const uint8_t *>(d_data), row_bytes(type, n_cols),
                                                 (int)block_size(type), (int)type_size(type), bpr, r0, nb, d_out);
    DS4_CUDA_CHECK(cudaGetLastError());
}

void cuda_matvec(int type, const void *d_W, int64_t n_rows, int64_t n_cols, const float *d_x, float *d_y,
                 cudaStream_t stream) {
    check_cols(type, n_cols, "CUDA matvec");
    if (n_rows < 0) fail(DS4_E_ARG, "CUDA matvec: negative row count");
    if (n_rows == 0) return;
    if ((uintptr_t)d_x % 16 != 0) fail(DS4_E_ARG, "CUDA matvec: x must be 16-byte aligned");
    const size_t rb = row_bytes(type, n_cols);
    PlainRows rows{static_cast<const uint8_t *>(d_W), rb, d_x, d_y};
    const bool aligned = ((uintptr_t)d_W % 16 == 0) && rb % 16 == 0;
    if (aligned)
        launch_type<true>(type, rows, n_rows, n_cols, stream);
    else
        launch_type<false>(type, rows, n_rows, n_cols, stream);
}

size_t cuda_mm6_scratch(int64_t n_x, int64_t x_cols) { return mm6::planes_bytes(n_x, x_cols); }
bool cuda_mm6(const Mm6Args &p, cudaStream_t stream) { return mm6::run(p, stream); }

void cuda_matvec_experts(int type, const ExpertMatvec &p, cudaStream_t stream) {
    check_cols(type, p.n_cols, "CUDA expert matvec");
    if (p.n_mats < 1 || p.n_mats > 2 || p.n_ids < 0 || p.n_rows < 0 || !p.x || !p.W[0] || !p.y[0] ||
        (p.n_mats == 2 && (!p.W[1] || !p.y[1])))
        fail(DS4_E_ARG, "CUDA expert matvec: bad parameters");
    if (p.n_ids == 0 || p.n_rows == 0) return;
    const size_t rb = row_bytes(type, p.n_cols);
    const int64_t per_mat = (int64_t)p.n_ids * p.n_rows;
    ExpertRows rows{static_cast<const uint8_t *>(p.W[0]),
                    static_cast<const uint8_t *>(p.n_mats == 2 ? p.W[1] : p.W[0]),
                    p.y[0], p.n_mats == 2 ? p.y[1] : p.y[0], p.expert_stride, p.n_rows, per_mat, p.x_stride, rb,
                    p.ids, p.x, p.ids_settled};
    if ((uintptr_t)p.x % 16 != 0 || p.x_stride % 4 != 0)
        fail(DS4_E_ARG, "CUDA expert matvec: x and x_stride must be 16-byte aligned");
    bool aligned = rb % 16 == 0 && p.expert_stride % 16 == 0;
    for (int m = 0; m < p.n_mats; m++) aligned = aligned && (uintptr_t)p.W[m] % 16 == 0;
    if (aligned)
        launch_type<true>(type, rows, per_mat * p.n_mats, p.n_cols, stream);
    else
        launch_type<false>(type, rows, per_mat * p.n_mats, p.n_cols, stream);
}

namespace {
void require_device() {
    int n_dev = 0;
    if (cudaGetDeviceCount(&n_dev) != cudaSuccess || n_dev == 0) {
        cudaGetLastError();
        fail(DS4_E_BACKEND, "no CUDA device available");
    }
}
}  // namespace

void cuda_dequant_host(int type, const void *data, int64_t n_cols, int64_t r0, int64_t r1, float *out) {
    check_cols(type, n_cols, "CUDA dequantize");
    if (r0 < 0 || r1 < r0) fail(DS4_E_ARG, "CUDA dequantize: bad row range [%lld, %lld)", (long long)r0, (long long)r1);
    if (r1 == r0) return;
    require_device();
    const size_t rb = row_bytes(type, n_cols);
    const size_t in_bytes = rb * (size_t)(r1 - r0), out_bytes = (size_t)(r1 - r0) * (size_t)n_cols * 4;
    void *d_in = nullptr;
    float *d_out = nullptr;
    try {
        DS4_CUDA_CHECK(cudaMalloc(&d_in, in_bytes));
        DS4_CUDA_CHECK(cudaMalloc(&d_out, out_bytes));
        DS4_CUDA_CHECK(cudaMemcpy(d_in, static_cast<const uint8_t *>(data) + rb * (size_t)r0, in_bytes,
                                  cudaMemcpyHostToDevice));
        cuda_dequant_rows(type, d_in, n_cols, 0, r1 - r0, d_out, nullptr);
        DS4_CUDA_CHECK(cudaDeviceSynchronize());
        DS4_CUDA_CHECK(cudaMemcpy(out, d_out, out_bytes, cudaMemcpyDeviceToHost));
    } catch (...) {
        cudaFree(d_in);
        cudaFree(d_out);
        throw;
    }
    cudaFree(d_in);
    cudaFree(d_out);
}

void cuda_matvec_host(int type, const void *W, int64_t n_rows, int64_t n_cols, const float *x, float *y) {
    check_cols(type, n_cols, "CUDA matvec");
    require_device();
    const size_t wbytes = row_bytes(type, n_cols) * (size_t)n_rows;
    void *dW = nullptr;
    float *dx = nullptr, *dy = nullptr;
    auto cleanup = [&] {
        cudaFree(dW);
        cudaFree(dx);
        cudaFree(dy);
    };
    try {
        DS4_CUDA_CHECK(cudaMalloc(&dW, wbytes ? wbytes : 16));
        DS4_CUDA_CHECK(cudaMalloc(&dx, (size_t)n_cols * 4));
        DS4_CUDA_CHECK(cudaMalloc(&dy, (size_t)(n_rows ? n_rows : 1) * 4));
        DS4_CUDA_CHECK(cudaMemcpy(dW, W, wbytes, cudaMemcpyHostToDevice));
        DS4_CUDA_CHECK(cudaMemcpy(dx, x, (size_t)n_cols * 4, cudaMemcpyHostToDevice));
        cuda_matvec(type, dW, n_rows, n_cols, dx, dy, nullptr);
        DS4_CUDA_CHECK(cudaDeviceSynchronize());
        DS4_CUDA_CHECK(cudaMemcpy(y, dy, (size_t)n_rows * 4, cudaMemcpyDeviceToHost));
    } catch (...) {
        cleanup();
        throw;
    }
    cleanup();
}

void cuda_mm6_host(int type, const void *W, int64_t n_experts, int64_t n_rows, int64_t n_cols, const float *X,
                   int64_t n_x, const int32_t *x_idx, const int32_t *off, int64_t n_tok, float *Y) {
    check_cols(type, n_cols, "CUDA batched product");
    require_device();
    const size_t wbytes = row_bytes(type, n_cols) * (size_t)n_rows * (size_t)n_experts;
    std::vector<void *> bufs;
    auto dev = [&](size_t bytes) {
        void *p = nullptr;
        DS4_CUDA_CHECK(cudaMalloc(&p, bytes ? bytes : 16));
        bufs.push_back(p);
        return p;
    };
    auto cleanup = [&] {
        for (void *p : bufs) cudaFree(p);
    };
    try {
        Mm6Args p;
        p.type = type;
        p.W[0] = dev(wbytes);
        p.Y[0] = static_cast<float *>(dev((size_t)n_tok * n_rows * 4));
        p.n_rows = n_rows;
        p.n_cols = n_cols;
        p.X = static_cast<float *>(dev((size_t)n_x * n_cols * 4));
        p.x_ld = n_cols;
        p.n_x = n_x;
        p.n_tok = (int)n_tok;
        p.y_ld = n_rows;
        p.scratch_bytes = cuda_mm6_scratch(n_x, n_cols);
        p.scratch = dev(p.scratch_bytes);
        DS4_CUDA_CHECK(cudaMemcpy(const_cast<void *>(p.W[0]), W, wbytes, cudaMemcpyHostToDevice));
        DS4_CUDA_CHECK(cudaMemcpy(const_cast<float *>(p.X), X, (size_t)n_x * n_cols * 4, cudaMemcpyHostToDevice));
        if (x_idx) {
            p.x_idx = static_cast<int *>(dev((size_t)n_tok * 4));
            DS4_CUDA_CHECK(cudaMemcpy(const_cast<int *>(p.x_idx), x_idx, (size_t)n_tok * 4, cudaMemcpyHostToDevice));
        }
        if (off) {
            p.off = static_cast<int *>(dev((size_t)(n_experts + 1) * 4));
            DS4_CUDA_CHECK(cudaMemcpy(const_cast<int *>(p.off), off, (size_t)(n_experts + 1) * 4, cudaMemcpyHostToDevice));
            p.n_experts = (int)n_experts;
            p.expert_stride = (int64_t)(row_bytes(type, n_cols) * (size_t)n_rows);
        }
        if (!cuda_mm6(p, nullptr))
            fail(DS4_E_ARG, "no batched tensor-core kernel for %s [%lld x %lld] (Q8_0, Q2_K, IQ2_XXS with 16-byte rows)",
                 type_name(type), (long long)n_rows, (long long)n_cols);
        DS4_CUDA_CHECK(cudaDeviceSynchronize());
        DS4_CUDA_CHECK(cudaMemcpy(Y, p.Y[0], (size_t)n_tok * n_rows * 4, cudaMemcpyDeviceToHost));
    } catch (...) {
        cleanup();
        throw;
    }
    cleanup();
}

}  // namespace ds4
