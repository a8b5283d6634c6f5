// cuda/matvec6.cuh: matvec version 6, the tensor-core decode (included by cuda/quant.cu after the row maps).
//
// Why: v2-v5 multiply f32 activations by exactly decoded weights on the ordinary cores. Counted from their SASS
// (bench/kernels.md) that costs 5-8 instructions per weight for the 2-bit types, which caps one layer's routed Q2
// experts near 32% of the copy bandwidth on an H200. Here the weights stay small integers and the products run on
// the integer tensor cores (mma.m16n8k32 s8 x s8 -> s32), without giving up f32 accuracy:
//  - x is split per group of XG columns into a power-of-two scale and four signed 8-bit digits,
//    x = scale * (2^24 d0 + 2^16 d1 + 2^8 d2 + d3), |X| < 2^30: 30 bits against the group's largest value, finer
//    than f32's own rounding of the products, so the result stays within the 1e-5 bound of the float64 reference.
//    Each CTA converts the x it needs into shared memory once (four digit planes, in the columns' order, or, for
//    Q8_0, in the mma's k order within each 32 columns).
//  - The four planes are four columns of the mma's B operand (columns 4-7 repeat them and are ignored): one mma
//    gives, for 16 weight rows and 32 columns, the exact integer dot product with every digit plane.
//  - Weights are A: Q8_0 quants as they are; Q2_K quants times their 4-bit scale (<= 45, one IMUL per 4 weights);
//    IQ2_XXS grid values with their signs (one PRMT per 4 weights: a selector of 2-bit grid codes plus sign bits
//    picks bytes from {8, 25, 43, -8, -25, -43}; codes and signs come from lookup tables replicated once per lane,
//    so the random lookups never conflict on a shared-memory bank; 16 copies in the 8-warp configuration).
//  - Integer sums are exact; the per-block float scales (f16 d, the IQ2 sub-block scale, the x group scale) are
//    applied once per 32 (Q8_0) or 256 (Q2_K, IQ2_XXS) columns.
// Mapping: a warp owns a tile of 16 consecutive rows; lane = 4 g + c holds rows g and g + 8 and, in every
// 32-column step, the 8 weights 8c .. 8c + 7 (the k order inside an mma is free as long as A and B agree, and
// this one makes every lane's B fragment one 8-byte load; Q8_0 takes the mma's own order, bytes 4c .. 4c + 3 and
// 16 + 4c .., so that its quant loads hit 32 banks). Tiles are streamed global -> shared with cp.async in chunks of
// CHUNK columns (a per-warp ring of NS stages). When there are too few tiles to fill the GPU evenly, the CTA's W
// warps (4, 8, 12 or 16, below) split the columns of a tile (ks warps per tile) and add their partial rows through
// shared memory. Launched with programmatic dependent launch: a CTA of a plain matrix, or of expert rows whose ids
// are settled, issues its first weight loads before waiting for the previous kernel. Results: bench/kernels.md.
namespace v6 {

__host__ __device__ __forceinline__ int64_t imin64(int64_t a, int64_t b) { return a < b ? a : b; }

// Warps per CTA (W, a template parameter): 16 (one CTA per SM: 4 warps per scheduler hide the mma and shared-memory
// latency; 150-210 KB of shared memory; tried first for plain Q8_0 matrices since run 66); 12 for the 2-bit types
// first (a layer's 1536 routed-expert tiles: one per warp in 132 CTAs, no column split); 8 ("v7"; two CTAs per SM on
// an H200, tried first for expert-row Q8_0, the forward pass's grouped and paired matvecs; the configuration
// of devices with ~100 KB per block, GB10): Q8_0 up to 4096 columns takes ~88 KB, the Q2_K down projections ~86 KB
// and IQ2_XXS ~80 KB (half-size chunks and tables, M6<IQ2_XXS, 8>); 4 ("v9", plain Q8_0 only, 35-70 KB): 3-5 CTAs
// per SM, so that in a chain of launches the next one's CTAs take over an SM a CTA at a time instead of all at once
// (attn_q_b 11.9 -> 11.1 us, runs 34-38).

constexpr int kMaxSlots = 4;         // distinct x vectors one CTA may need (expert down projections)
int g_diag = 0;                      // cuda_set_matvec_diag: benchmark diagnosis only (wrong results by design)

__device__ __forceinline__ void mma_s8(int (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void named_sync(int id, int threads) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
template <int N>
__device__ __forceinline__ void cp_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ uint32_t lds32(const uint8_t *p) { return *reinterpret_cast<const uint32_t *>(p); }
// PTX prmt in its default mode: selector bit 3 (sign replicate) is never set here, so unlike __byte_perm the
// compiler need not mask it away.
__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
    uint32_t r;
    asm("prmt.b32 %0, %1, %2, %3;\n" : "=r"(r) : "r"(a), "r"(b), "r"(sel));
    return r;
}

// ---- per-type chunk decoders ---------------------------------------------------------------------------------
// chunk(): one staged chunk of the warp's tile. rg / rg8: the stage rows g and g + 8; nb: valid quant blocks in the
// chunk; dg: this lane's digit plane at the chunk's first column + 8c; xs / sx: x group scales / 16-column sums at
// the chunk's first column; facc: per row, the digit-weighted sums (scaled by lane at the end); macc: per row, a
// term subtracted as is (Q2_K mins).
template <int T, int W>
struct M6;

template <int W>
struct M6<DS4_TYPE_Q8_0, W> {
    // (run 17 tried 128-column chunks with MINB = 2, so that the next launch's CTA fits beside this one under PDL:
    // the 35.7 MB matrices fell from ~70% to ~45% of copy, the output head from 85% to 77%; run 26 tried 8-row tiles,
    // two blocks per mma in B columns 0-3 / 4-7, 78-107 KB per CTA: attn_q_b 69%, attn_output_a/b 45% / 43%)
    // The mma's own k order (PERM): lane c holds quant bytes 4c .. 4c + 3 and 16 + 4c .. 16 + 4c + 3 of a block, so the
    // 32 lanes' words of one load sit in 32 different banks (stage rows are 68 words apart: bank 4 g + c); x's digit
    // planes are stored in the matching order (convert_x). Run 40 found 2-way bank conflicts with 8 consecutive bytes
    // per lane.
    static constexpr int CHUNK = 256, BLK = 32, DB = 272, SR = 272, NS = 2, XG = 32, MINB = 1;
    static constexpr bool SX = false, LUT = false, PERM = true;
    // A fragment of block b (of a chunk staged 16-byte aligned) of rows g and g + 8 (also the GEMM's, cuda/mm6.cuh)
    __device__ static void frag(const uint8_t *rg, const uint8_t *rg8, int b, int c, uint32_t (&a)[4]) {
        const uint8_t *rr[2] = {rg, rg8};
#pragma unroll
        for (int r = 0; r < 2; r++) {
            const uint8_t *p = rr[r] + 34 * b + 4 * c;  // the block's quants start at p + 2 - 4 c
            if ((b & 1) == 0) {  // quants at 2 mod 4: two aligned words and a funnel shift per fragment word
                a[r] = __funnelshift_r(lds32(p), lds32(p + 4), 16);
                a[2 + r] = __funnelshift_r(lds32(p + 16), lds32(p + 20), 16);
            } else {
                a[r] = lds32(p + 2);
                a[2 + r] = lds32(p + 18);
            }
        }
    }
    __device__ static void chunk(const uint8_t *rg, const uint8_t *rg8, int nb, const uint8_t *dg, const float *xs,
                                 const float *, int c, float (&facc)[2], float (&)[2], const uint32_t *) {
#pragma unroll
        for (int b = 0; b < CHUNK / BLK; b++) {
            if (b >= nb) break;
            uint32_t a[4];
            frag(rg, rg8, b, c, a);
            const uint2 bb = *reinterpret_cast<const uint2 *>(dg + 32 * b);
            int d[4] = {0, 0, 0, 0};
            mma_s8(d, a, bb.x, bb.y);
            const float x = xs[b];
            facc[0] = fmaf(ld_h16(rg + 34 * b) * x, (float)(d[0] * 256 + d[1]), facc[0]);
            facc[1] = fmaf(ld_h16(rg8 + 34 * b) * x, (float)(d[2] * 256 + d[3]), facc[1]);
        }
    }
};

template <int W>
struct M6<DS4_TYPE_Q2_K, W> {
    static constexpr int CHUNK = 512, BLK = 256, DB = 168, SR = 176, NS = 3, XG = 256, MINB = 1;
    static constexpr bool SX = true, LUT = false, PERM = false;
    // A block's scale words, this lane's quant words (rows g and g + 8), d and dmin; then the A fragment of its
    // 32-column step 4 h + j (also the GEMM's, cuda/mm6.cuh)
    __device__ static void load(const uint8_t *const (&p)[2], int c, uint32_t (&sc)[2][4], uint32_t (&q)[2][4],
                                float (&d)[2], float (&dm)[2]) {
#pragma unroll
        for (int r = 0; r < 2; r++) {
#pragma unroll
            for (int i = 0; i < 4; i++) sc[r][i] = lds32(p[r] + 4 * i);
#pragma unroll
            for (int h = 0; h < 2; h++) {
                q[r][2 * h] = lds32(p[r] + 16 + 32 * h + 8 * c);
                q[r][2 * h + 1] = lds32(p[r] + 20 + 32 * h + 8 * c);
            }
            d[r] = ld_h16(p[r] + 80);
            dm[r] = ld_h16(p[r] + 82);
        }
    }
    __device__ static void frag(const uint32_t (&sc)[2][4], const uint32_t (&q)[2][4], int h, int j, int sh,
                                uint32_t (&a)[4]) {
#pragma unroll
        for (int r = 0; r < 2; r++) {
            const uint32_t s = (sc[r][2 * h + (j >> 1)] >> (16 * (j & 1) + sh)) & 15u;
            a[r] = ((q[r][2 * h] >> (2 * j)) & 0x03030303u) * s;  // bytes <= 45: no carries
            a[2 + r] = ((q[r][2 * h + 1] >> (2 * j)) & 0x03030303u) * s;
        }
    }
    __device__ static void chunk(const uint8_t *rg, const uint8_t *rg8, int nb, const uint8_t *dg, const float *xs,
                                 const float *sx, int c, float (&facc)[2], float (&macc)[2], const uint32_t *) {
        const int sh = 8 * (c >> 1);
#pragma unroll
        for (int b = 0; b < CHUNK / BLK; b++) {
            if (b >= nb) break;
            const uint8_t *p[2] = {rg + 84 * b, rg8 + 84 * b};
            uint32_t sc[2][4], q[2][4];
            float d[2], dm[2];
            load(p, c, sc, q, d, dm);
            int acc[4] = {0, 0, 0, 0};  // exact over the whole 256-column block: |q sc| <= 45, |digit| <= 128
#pragma unroll
            for (int h = 0; h < 2; h++)
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    uint32_t a[4];
                    frag(sc, q, h, j, sh, a);
                    const uint2 bb = *reinterpret_cast<const uint2 *>(dg + 256 * b + 32 * (4 * h + j));
                    mma_s8(acc, a, bb.x, bb.y);
                }
            const float x = xs[b];
            facc[0] = fmaf(d[0] * x, (float)(acc[0] * 256 + acc[1]), facc[0]);
            facc[1] = fmaf(d[1] * x, (float)(acc[2] * 256 + acc[3]), facc[1]);
            // mins: this lane takes sub-blocks 4c .. 4c + 3 (scale bytes 4c.., sums of their 16 columns)
            const float4 sv = *reinterpret_cast<const float4 *>(sx + 16 * b + 4 * c);
#pragma unroll
            for (int r = 0; r < 2; r++) {
                const uint32_t mn = (lds32(p[r] + 4 * c) >> 4) & 0x0F0F0F0Fu;
                const float t = fmaf(ubyte_f(mn, 0), sv.x, fmaf(ubyte_f(mn, 1), sv.y,
                                fmaf(ubyte_f(mn, 2), sv.z, ubyte_f(mn, 3) * sv.w)));
                macc[r] = fmaf(dm[r], t, macc[r]);
            }
        }
    }
};

// IQ2_XXS selector tables: grid codes (nibble k = code of byte k: 0x08 -> 0, 0x19 -> 1, 0x2b -> 2) and signs
// (nibble k bit 2 = sign of element k), LC copies each (32, or 16 with 8 warps) so that lane l reads copy l mod LC.
constexpr uint32_t kIq2Pos = 0x002B1908u, kIq2Neg = 0x00D5E7F8u;  // bytes {8,25,43,0} and {-8,-25,-43,0}

template <int W>
struct M6<DS4_TYPE_IQ2_XXS, W> {
    // 12 or 16 warps: 1024-column chunks and a table copy per lane (48 KB). 8 warps (a GB10's ~99 KB per block): 512-column
    // chunks and 16 copies (24 KB; lanes l and l + 16 share one, so a lookup takes ~1.5 wavefronts instead of 1).
    static constexpr int CHUNK = W >= 12 ? 1024 : 512, BLK = 256, DB = CHUNK / 256 * 66, SR = W >= 12 ? 272 : 144;
    static constexpr int NS = 2, XG = 256, MINB = 1;
    static constexpr int LC = W >= 12 ? 32 : 16, ESH = W >= 12 ? 7 : 6;  // table copies; log2 of an entry's bytes
    static constexpr bool SX = false, LUT = true, PERM = false;
    // One 256-column block of rows g and g + 8. Sub-block s's header (4 grid-index bytes, then a word of 4 x 7 sign
    // bits and the 4-bit scale) starts 2 bytes into the block plus 8 s: at 2 mod 4 for even blocks (PAR 0), at 0 mod
    // 4 for odd ones (PAR 1). Table entry i of lane l's copy is at byte 128 i + 4 l: an index goes straight to
    // bits 7.. of the offset (one IMAD for the grid code; for the signs, one funnel shift that lands lane c's 7 bits
    // at bits 7..13, and one LOP3 that masks them and ORs in 4 l). PAR 0 reads the two aligned words around the sign
    // word (lane 3's bits lie wholly in the second one: both of its words are that one, ao = 4, and the funnel
    // shift becomes a rotation).
    // A fragment of sub-block s of rows g and g + 8 and their scales 2 ls + 1 (also the GEMM's, cuda/mm6.cuh)
    template <int PAR>
    __device__ static void frag(const uint8_t *const (&p)[2], int s, int c, int sh, int ao, uint32_t l4,
                                const uint8_t *lut, uint32_t (&a)[4], int (&scl)[2]) {
#pragma unroll
        for (int r = 0; r < 2; r++) {
            const uint8_t *h = p[r] + 2 + 8 * s;
            const uint32_t idx = h[c];
            uint32_t f, sc;
            if (PAR) {
                const uint32_t aux = lds32(h + 4);
                f = __funnelshift_r(aux, aux, sh);
                sc = aux >> 28;
            } else {
                const uint32_t hi = lds32(h + 6);
                f = __funnelshift_r(lds32(h + 2 + ao), hi, sh);
                sc = (hi >> 12) & 15u;
            }
            scl[r] = 2 * (int)sc + 1;
            const uint32_t sel = lds32(lut + ((idx << ESH) | l4)) |
                                 lds32(lut + (256 << ESH) + ((f & (127u << ESH)) | l4));
            a[r] = prmt(kIq2Pos, kIq2Neg, sel);
            a[2 + r] = prmt(kIq2Pos, kIq2Neg, sel >> 16);
        }
    }
    template <int PAR>
    __device__ static void block(const uint8_t *pg, const uint8_t *pg8, const uint8_t *db, float x, int sh, int ao,
                                 uint32_t l4, float (&facc)[2], const uint8_t *lut) {
        const uint8_t *p[2] = {pg, pg8};
        const int c = (int)(l4 >> 2) & 3;
        int ia[4] = {0, 0, 0, 0};  // per row: digit-plane pairs, summed over the 8 sub-blocks with their scales
#pragma unroll
        for (int s = 0; s < 8; s++) {
            uint32_t a[4];
            int scl[2];
            frag<PAR>(p, s, c, sh, ao, l4, lut, a, scl);
            const uint2 bb = *reinterpret_cast<const uint2 *>(db + 32 * s);
            int d[4] = {0, 0, 0, 0};
            mma_s8(d, a, bb.x, bb.y);
            ia[0] += scl[0] * d[0];
            ia[1] += scl[0] * d[1];
            ia[2] += scl[1] * d[2];
            ia[3] += scl[1] * d[3];
        }
        // block scale d * (2 ls + 1) / 8; |ia| <= 8 * 31 * 32 * 43 * 128 < 2^31
        facc[0] = fmaf(ld_h16(pg) * x, fmaf((float)ia[0], 256.0f, (float)ia[1]), facc[0]);
        facc[1] = fmaf(ld_h16(pg8) * x, fmaf((float)ia[2], 256.0f, (float)ia[3]), facc[1]);
    }
    __device__ static void chunk(const uint8_t *rg, const uint8_t *rg8, int nb, const uint8_t *dg, const float *xs,
                                 const float *, int c, float (&facc)[2], float (&)[2], const uint32_t *lut) {
        const uint32_t l4 = 4 * (threadIdx.x & (LC - 1));
        const uint8_t *lb = reinterpret_cast<const uint8_t *>(lut);
        const int sh0 = (16 + 7 * c - ESH) & 31, sh1 = (7 * c - ESH) & 31, ao = c == 3 ? 4 : 0;
#pragma unroll 1
        for (int b = 0; b < nb; b += 2) {  // blocks in pairs: block 2i's headers sit at 2 mod 4, 2i+1's at 0 mod 4
            block<0>(rg + 66 * b, rg8 + 66 * b, dg + 256 * b, xs[b] * 0.125f, sh0, ao, l4, facc, lb);
            if (b + 1 < nb)
                block<1>(rg + 66 * (b + 1), rg8 + 66 * (b + 1), dg + 256 * (b + 1), xs[b + 1] * 0.125f, sh1, 0, l4,
                         facc, lb);
        }
    }
};

// The 384 selector words, computed by the compiler from the grid (format data, iq2xxs_grid.h).
struct Iq2Lut {
    uint32_t w[256 + 128];
    constexpr Iq2Lut() : w() {
        constexpr uint64_t grid[256] = {DS4_IQ2XXS_GRID_VALUES};
        for (int i = 0; i < 256; i++)
            for (int k = 0; k < 8; k++) {
                const uint32_t v = (uint32_t)(grid[i] >> (8 * k)) & 0xff;
                w[i] |= (v == 0x08 ? 0u : v == 0x19 ? 1u : 2u) << (4 * k);
            }
        for (int i = 0; i < 128; i++) {
            const uint32_t sb = iq2xxs_sign_byte((uint32_t)i);
            for (int k = 0; k < 8; k++) w[256 + i] |= ((sb >> k) & 1u) << (4 * k + 2);
        }
    }
};
// In global memory (1.5 KB, L2- then L1-resident): the build below reads it with ordinary coalesced loads. From the
// constant bank, one indexed load per word per warp, the build took 9% of the gate+up launch's stall samples (ncu,
// run 69: constant-cache misses at every CTA's start).
__device__ Iq2Lut g_iq2_lut{};

// LC copies: lut[LC i + l] = word i. Each 16-byte store writes four copies of one word (LC is a multiple of 4), a
// warp's store 512 consecutive bytes. Split in two, so that a caller can put other work between the loads (a thread's
// words, all issued together) and the stores, which wait for them.
template <int W, int LC>
constexpr int kLutR = (256 + 128) * LC / 4 / (32 * W);  // 16-byte stores per thread
template <int W, int LC>
__device__ __forceinline__ void load_iq2_lut(uint32_t (&w)[kLutR<W, LC>]) {
    static_assert(LC % 4 == 0 && (256 + 128) * LC / 4 % (32 * W) == 0, "LUT build: whole rounds");
#pragma unroll
    for (int k = 0; k < kLutR<W, LC>; k++) w[k] = g_iq2_lut.w[4u * (threadIdx.x + k * 32u * W) / LC];
}
template <int W, int LC>
__device__ __forceinline__ void store_iq2_lut(uint32_t *lut, const uint32_t (&w)[kLutR<W, LC>]) {
#pragma unroll
    for (int k = 0; k < kLutR<W, LC>; k++)
        reinterpret_cast<uint4 *>(lut)[threadIdx.x + k * 32 * W] = make_uint4(w[k], w[k], w[k], w[k]);
}
template <int W, int LC>
__device__ __forceinline__ void build_iq2_lut(uint32_t *lut) {
    uint32_t w[kLutR<W, LC>];
    load_iq2_lut<W, LC>(w);
    store_iq2_lut<W, LC>(lut, w);
}

// x (K floats) -> four digit planes (plane p at dig + p K), group scales xs[K / XG], optionally 16-column sums.
// A warp converts pieces of 256 columns, 8 per lane; the loads of up to XB pieces go out together, so that a CTA of
// few warps does not wait one L2 latency per piece (8 warps, 4096 columns: two pieces a warp).
// PERM: within each 32 columns, stored bytes 8c .. 8c + 3 hold columns 4c .. 4c + 3 and bytes 8c + 4 .. 8c + 7 columns
// 16 + 4c .. 16 + 4c + 3 (the mma's k order, M6<Q8_0>), so that a lane's B fragment stays one 8-byte load.
template <int W>
constexpr int kXB = W >= 12 ? 2 : 4;  // x pieces of 256 columns a warp loads at once

// One round of convert_x, split in two so that a caller can issue other loads between them: load_x reads this
// warp's pieces (zeros past K), store_x converts them.
template <int W>
__device__ __forceinline__ void load_x(const float *x, int K, int base, float (&v)[kXB<W>][8]) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int j = 0; j < kXB<W>; j++) {
        const int i0 = base + j * W * 256 + 8 * lane;
        float4 a = make_float4(0, 0, 0, 0), b = a;
        if (i0 < K) a = ldx4(x + i0), b = ldx4(x + i0 + 4);
        v[j][0] = a.x, v[j][1] = a.y, v[j][2] = a.z, v[j][3] = a.w;
        v[j][4] = b.x, v[j][5] = b.y, v[j][6] = b.z, v[j][7] = b.w;
    }
}

// One warp's 256 columns (8 per lane, i0 = this lane's first; ok: they exist): the group scale(s), the four digit
// planes (plane p at dig + p ps), optionally the 16-column sums. Also the GEMM's x conversion (cuda/mm6.cuh).
template <int XG, bool SX, bool PERM>
__device__ __forceinline__ void store_x1(const float (&v)[8], bool ok, int i0, int ps, uint8_t *dig, float *xs,
                                         float *sx) {
    const int lane = threadIdx.x & 31;
    float m = 0.0f;
#pragma unroll
    for (int e = 0; e < 8; e++) m = fmaxf(m, fabsf(v[e]));
#pragma unroll
    for (int o = 1; o < XG / 8; o <<= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    // m < 2^(E-126); inv = 2^(156-E) puts |x| * inv below 2^30; both powers of two, so x * inv is exact
    const int E = max((int)((__float_as_uint(m) >> 23) & 0xff), 30);
    const float inv = __uint_as_float((uint32_t)(283 - E) << 23), scale = __uint_as_float((uint32_t)(E - 29) << 23);
    // Balanced base-256 digits without a digit loop: adding 0x80808080 (|X| < 2^30 keeps it in 32 bits) makes
    // the bytes of X + C unsigned digits u with X = sum (u_p - 128) 256^p, and u - 128 is u XOR 0x80 read as a
    // signed byte; the only balanced digits are these. Four values' bytes then go to the four planes by PRMT.
    uint32_t u[8], w[4][2];
#pragma unroll
    for (int e = 0; e < 8; e++) u[e] = ((uint32_t)__float2int_rn(v[e] * inv) + 0x80808080u) ^ 0x80808080u;
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const uint32_t *q = u + 4 * h;
        const uint32_t lo01 = prmt(q[0], q[1], 0x5140), hi01 = prmt(q[0], q[1], 0x7362);
        const uint32_t lo23 = prmt(q[2], q[3], 0x5140), hi23 = prmt(q[2], q[3], 0x7362);
        w[3][h] = prmt(lo01, lo23, 0x5410);  // bytes 0 (plane 3: the least significant digit)
        w[2][h] = prmt(lo01, lo23, 0x7632);  // bytes 1
        w[1][h] = prmt(hi01, hi23, 0x5410);  // bytes 2
        w[0][h] = prmt(hi01, hi23, 0x7632);  // bytes 3
    }
    if (ok) {
#pragma unroll
        for (int p = 0; p < 4; p++) {
            uint8_t *d = dig + (size_t)p * ps + i0;
            if (PERM) {  // this lane's columns 8L .. 8L + 7 of its 32 (L = lane mod 4): bytes 16 (L & 1) + 4 (L >> 1)
                const int L = lane & 3;  // and 8 further
                d += 16 * (L & 1) + 4 * (L >> 1) - 8 * L;
                *reinterpret_cast<uint32_t *>(d) = w[p][0];
                *reinterpret_cast<uint32_t *>(d + 8) = w[p][1];
            } else {
                *reinterpret_cast<uint2 *>(d) = make_uint2(w[p][0], w[p][1]);
            }
        }
        if ((lane & (XG / 8 - 1)) == 0) xs[i0 / XG] = scale;
    }
    if (SX) {
        const float *f = v;
        float sm = ((f[0] + f[1]) + (f[2] + f[3])) + ((f[4] + f[5]) + (f[6] + f[7]));
        sm += __shfl_xor_sync(0xffffffffu, sm, 1);
        if (ok && (lane & 1) == 0) sx[i0 / 16] = sm;
    }
}

template <int XG, bool SX, int W, bool PERM>
__device__ __forceinline__ void store_x(const float (&v)[kXB<W>][8], int K, int base, int ps, uint8_t *dig, float *xs,
                                        float *sx) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int j = 0; j < kXB<W>; j++) {
        const int i0 = base + j * W * 256 + 8 * lane;
        // K is a multiple of 32: a group of 4 lanes is all in or all out
        store_x1<XG, SX, PERM>(v[j], i0 < K, i0, ps, dig, xs, sx);
    }
}

template <int XG, bool SX, int W, bool PERM>
__device__ void convert_x(const float *x, int K, int ps, uint8_t *dig, float *xs, float *sx) {
    const int warp = threadIdx.x >> 5;
    for (int base = warp * 256; base < K; base += kXB<W> * W * 256) {
        float v[kXB<W>][8];
        load_x<W>(x, K, base, v);
        store_x<XG, SX, W, PERM>(v, K, base, ps, dig, xs, sx);
    }
}

// Which x a row reads (a key per distinct x vector), where it is, and where a 16-row tile starts. v6 handles
// expert rows only when keys grow with the row index (one matrix per launch, or one x shared by every expert);
// their expert ids are first copied to shared memory (ids: that copy), so that issuing a tile's loads never waits
// on a global load. All of it in 32-bit arithmetic: a matrix has < 2^31 rows here (checked on the host).
__device__ __forceinline__ int x_key(const PlainRows &, int) { return 0; }
__device__ __forceinline__ const float *x_of(const PlainRows &r, int) { return r.x; }
__device__ __forceinline__ const uint8_t *tile_ptr(const PlainRows &r, int tile, const int32_t *) {
    return r.W + (size_t)tile * 16 * r.rb;
}
__device__ __forceinline__ int x_key(const ExpertRows &r, int row) { return r.x_stride ? row / (int)r.n_rows : 0; }
__device__ __forceinline__ const float *x_of(const ExpertRows &r, int k) { return r.x + (int64_t)k * r.x_stride; }
__device__ __forceinline__ const uint8_t *tile_ptr(const ExpertRows &r, int tile, const int32_t *ids) {
    int g = tile * 16;
    const bool m = g >= (int)r.per_mat;
    if (m) g -= (int)r.per_mat;
    const int e = g / (int)r.n_rows, row = g - e * (int)r.n_rows;
    return (m ? r.W1 : r.W0) + (size_t)ids[e] * (size_t)r.stride + (size_t)row * r.rb;
}
// May the weight loads start before waiting for the previous kernel? Plain rows: always; expert rows: when the
// caller promised the ids were settled before that kernel began (ExpertMatvec::ids_settled).
__device__ __forceinline__ bool early_loads(const PlainRows &) { return true; }
__device__ __forceinline__ bool early_loads(const ExpertRows &r) { return r.ids_settled; }
__device__ __forceinline__ int n_ids(const PlainRows &) { return 0; }
__device__ __forceinline__ int n_ids(const ExpertRows &r) { return (int)(r.per_mat / r.n_rows); }
__device__ __forceinline__ const int32_t *ids_of(const PlainRows &) { return nullptr; }
__device__ __forceinline__ const int32_t *ids_of(const ExpertRows &r) { return r.ids; }
constexpr int kMaxIds = 256;
template <class Rows>
constexpr int kIdsBytes = Rows::kConstWeights ? 4 : 4 * kMaxIds;  // static shared memory of the ids copy

template <int T, int W>
struct Layout {
    using D = M6<T, W>;
    static constexpr int kStage = 16 * D::SR;
    static constexpr int kStages = W * D::NS * kStage;
    static constexpr int kLut = D::LUT ? (256 + 128) * M6<DS4_TYPE_IQ2_XXS, W>::LC * 4 : 0;
    // column split (ks > 1): every round of a CTA has its own partial rows (W x 16 floats) and one arrival counter per
    // tile group, so that no warp waits for the others: the last to arrive adds them up
    __host__ __device__ static int red_bytes(int ks, int umax) { return ks > 1 ? umax * (W * 16 * 4 + W / ks * 4) : 0; }
    // a slot: 4 digit planes of K bytes at a stride of K + 32 (plane p starts 8 banks after plane p - 1, so the
    // 16 addresses of one B-fragment load hit 32 different banks), then the group scales, then the 16-column sums
    __host__ __device__ static int plane(int K) { return K + 32; }
    __host__ __device__ static int xs_off(int K) { return 4 * plane(K); }
    __host__ __device__ static int sx_off(int K) { return xs_off(K) + (4 * (K / D::XG) + 15) / 16 * 16; }
    __host__ __device__ static int slot_bytes(int K) { return sx_off(K) + (D::SX ? 4 * (K / 16) : 0); }
    __host__ __device__ static int smem(int K, int slots, int red) { return kStages + kLut + (red + 15) / 16 * 16 + slots * slot_bytes(K); }
};

// XF ("x first"): when a CTA reads one x vector of at most kXB * W * 256 columns and waits for the previous kernel
// before its first weight load (expert rows whose ids are not settled: the routed experts), x's loads go out right
// after that wait, beside the ids' and ahead of the first ring stage, instead of queueing behind that stage's weight
// loads (ncu, run 69: 8% of the gate+up launch's stall samples on the first use of x; run 71: gate+up 19.2 -> 18.2 us).
// A CTA that issues weight loads before the wait is left as it was, x already being the first load after the wait:
// plain matrices, and the Q2_K down projections, whose ids are settled (runs 70 and 73: issuing any ring stage after
// the x loads instead of before the wait cost 2-14%).
template <int T, class Rows, int W, bool XF>
__global__ void __launch_bounds__(32 * W, W <= 4 ? 4 : M6<T, W>::MINB) matvec6(Rows rows, int total_rows, int K, int ks, int rounds, int diag) {
    using D = M6<T, W>;
    using L = Layout<T, W>;
    constexpr int kLC = M6<DS4_TYPE_IQ2_XXS, W>::LC;  // IQ2_XXS table copies
    extern __shared__ __align__(16) uint8_t smem[];
    __shared__ int32_t ids[kIdsBytes<Rows> / 4];
    pdl_launch_dependents();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
    const int n_tiles = (total_rows + 15) / 16;
    const int tpr = W / ks;  // tiles per round
    const int R0 = (int)((int64_t)rounds * blockIdx.x / gridDim.x), R1 = (int)((int64_t)rounds * (blockIdx.x + 1) / gridDim.x);
    const int grp = warp / ks, sl = warp % ks;
    const int nch = (K + D::CHUNK - 1) / D::CHUNK;
    const int ch0 = sl * nch / ks, my_nch = (sl + 1) * nch / ks - ch0;
    const size_t rb = rows.rb;

    uint8_t *stage = smem + warp * D::NS * L::kStage;
    uint32_t *lut = reinterpret_cast<uint32_t *>(smem + L::kStages);
    const int umax = (rounds + (int)gridDim.x - 1) / (int)gridDim.x;  // rounds of the busiest CTA
    float *red = reinterpret_cast<float *>(smem + L::kStages + L::kLut);
    int *arrived = reinterpret_cast<int *>(red + (ks > 1 ? umax * W * 16 : 0));  // [umax][W / ks]
    uint8_t *xslots = smem + L::kStages + L::kLut + (L::red_bytes(ks, umax) + 15) / 16 * 16;
    const int sb = L::slot_bytes(K);

    const int U = R1 - R0;

    // the x vectors this CTA reads (keys grow with the row): converted once into shared memory
    int kfirst = 0, klast = -1;
    if (U > 0) {
        kfirst = x_key(rows, R0 * tpr * 16);
        klast = x_key(rows, (min(R1 * tpr, n_tiles) - 1) * 16);
    }
    const bool early = early_loads(rows);
    const bool xsplit = XF && !early && klast == kfirst && K <= kXB<W> * W * 256 && !(diag & 8);
    float xv[kXB<W>][8];
    auto xload = [&] {
        if (xsplit) load_x<W>(x_of(rows, kfirst), K, warp * 256, xv);
    };
    auto convert_all = [&] {
        if (xsplit) {
            store_x<D::XG, D::SX, W, D::PERM>(xv, K, warp * 256, L::plane(K), xslots,
                                              reinterpret_cast<float *>(xslots + L::xs_off(K)),
                                              reinterpret_cast<float *>(xslots + L::sx_off(K)));
            return;
        }
        for (int k = kfirst; k <= klast && k - kfirst < kMaxSlots && !(diag & 8); k++) {
            uint8_t *sl8 = xslots + (k - kfirst) * sb;
            convert_x<D::XG, D::SX, W, D::PERM>(x_of(rows, k), K, L::plane(K), sl8, reinterpret_cast<float *>(sl8 + L::xs_off(K)),
                                       reinterpret_cast<float *>(sl8 + L::sx_off(K)));
        }
    };
    if (!Rows::kConstWeights) {  // expert rows: the weight addresses come from the router's ids
        // The table needs nothing of the previous kernel: its loads go out before the wait, its stores after the
        // wait and the x and id loads, so that its load latency overlaps theirs instead of preceding them.
        uint32_t lw[kLutR<W, kLC>];
        if constexpr (D::LUT) load_iq2_lut<W, kLC>(lw);
        if (!early) {
            pdl_wait();
            xload();
        }
        for (int i = threadIdx.x; i < n_ids(rows); i += blockDim.x) ids[i] = (diag & 4) || !ids_of(rows) ? i : ids_of(rows)[i];
        if constexpr (D::LUT) store_iq2_lut<W, kLC>(lut, lw);
        __syncthreads();
    }

    // items: (unit u, chunk k) in order; unit u = tile (R0 + u) * tpr + grp, chunk ch0 + k of it
    // A chunk's DB bytes of a row start at a multiple of 8: the copy takes the 16-byte aligned span around them
    // (rows are 16-byte multiples, so the span stays inside the row) into a stage row of SR bytes; the chunk's
    // data then starts 0 or 8 bytes into it.
    constexpr int UPR = D::SR / 16;  // 16-byte units per stage row
    // Lane l copies units t = l + 32 i of a chunk (row t / UPR, unit t % UPR): a warp's instruction covers 512
    // contiguous stage bytes, about two rows' contiguous spans (run 57: giving each instruction 8 rows' 64 bytes
    // instead cost a fifth of the Q8_0 bandwidth). A whole chunk of 16 rows, the common case, takes the lane's source
    // offsets worked out once (uoff) and the tile's address once per tile; the last chunk of a row or tile takes the
    // general loop. (The general loop for every chunk cost ~250 instructions a chunk: ~8 per IQ2_XXS mma, ~30 per
    // Q8_0 one.)
    constexpr int NU = (16 * UPR + 31) / 32;  // units per lane in a whole chunk
    uint32_t uoff[NU];                        // r * rb + 16 o (16 rows of a matrix span < 2^32 bytes here)
#pragma unroll
    for (int i = 0; i < NU; i++) {
        const int t = lane + 32 * i, r = t / UPR;
        uoff[i] = (uint32_t)r * (uint32_t)rb + 16u * (uint32_t)(t - r * UPR);
    }
    int pu = -1;                     // the unit whose tile address is below
    const uint8_t *psrc = nullptr;
    int pnrows = 0;
    auto issue = [&](int u, int k, int st) {
        const int tile = (R0 + u) * tpr + grp;
        if (u < U && tile < n_tiles && !(diag & 2)) {
            if (u != pu) {
                pu = u;
                psrc = tile_ptr(rows, tile, ids);
                pnrows = min(16, total_rows - tile * 16);
            }
            const int off = (ch0 + k) * D::DB, a0 = off & ~15;
            const int bytes = ((min(off + D::DB, (int)rb) + 15) & ~15) - a0;
            const uint8_t *src = psrc + a0;
            uint8_t *dst = stage + st * L::kStage;
            if (bytes == D::SR && pnrows == 16) {
#pragma unroll
                for (int i = 0; i < NU; i++)
                    if (32 * i + 32 <= 16 * UPR || lane + 32 * i < 16 * UPR)
                        cp_async16(dst + 16 * (lane + 32 * i), src + uoff[i]);
            } else {
                for (int t = lane; t < 16 * UPR; t += 32) {
                    const int r = t / UPR, o = t - r * UPR;
                    if (r < pnrows && 16 * o < bytes) cp_async16(dst + r * D::SR + 16 * o, src + (size_t)r * rb + 16 * o);
                }
            }
        }
        cp_async_commit();
    };
    int iu = 0, ik = 0, ist = 0;  // next item to issue
    auto issue_next = [&] {
        issue(iu, ik, ist);
        if (++ik == my_nch) ik = 0, iu++;
        if (++ist == D::NS) ist = 0;
    };

    // the first weight loads go out first; the table and x conversion overlap their latency (run 47: issuing some
    // stages of a deeper ring only after the wait, so that loads stream during the conversion, gained nothing)
#pragma unroll
    for (int s = 0; s < D::NS - 1; s++) issue_next();
    if (D::LUT && Rows::kConstWeights) build_iq2_lut<W, kLC>(lut);
    if (early) pdl_wait();  // before reading x or writing y
    if (ks > 1)
        for (int i = threadIdx.x; i < umax * (W / ks); i += blockDim.x) arrived[i] = 0;
    convert_all();
    __syncthreads();

    const float lam = c == 0 ? 65536.0f : c == 1 ? 1.0f : 0.0f;  // columns 0,1 = planes 0,1; 2,3 = planes 2,3
    float facc[2] = {0.0f, 0.0f}, macc[2] = {0.0f, 0.0f};
    int st = 0;
    for (int u = 0; u < U; u++) {
        const int tile = (R0 + u) * tpr + grp;
        const bool live = tile < n_tiles;
        const uint8_t *xsl = xslots + (live ? x_key(rows, tile * 16) - kfirst : 0) * sb;
        const float *xs = reinterpret_cast<const float *>(xsl + L::xs_off(K));
        const float *sx = reinterpret_cast<const float *>(xsl + L::sx_off(K));
        for (int k = 0; k < my_nch; k++) {
            issue_next();
            cp_wait<D::NS - 1>();
            __syncwarp();
            if (live && !(diag & 1)) {
                const int col0 = (ch0 + k) * D::CHUNK;
                const int nb = min(D::CHUNK, K - col0) / D::BLK;
                const uint8_t *stg = stage + st * L::kStage + (((ch0 + k) * D::DB) & 15);
                D::chunk(stg + g * D::SR, stg + (g + 8) * D::SR, nb, xsl + (size_t)(g & 3) * L::plane(K) + col0 + 8 * c,
                         xs + col0 / D::XG, sx + col0 / 16, c, facc, macc, lut);
            }
            __syncwarp();
            if (++st == D::NS) st = 0;
        }
        if (live) {
            float v0 = facc[0] * lam - macc[0], v1 = facc[1] * lam - macc[1];
            v0 += __shfl_xor_sync(0xffffffffu, v0, 1);
            v0 += __shfl_xor_sync(0xffffffffu, v0, 2);
            v1 += __shfl_xor_sync(0xffffffffu, v1, 1);
            v1 += __shfl_xor_sync(0xffffffffu, v1, 2);
            if (ks == 1) {
                if (c == 0) {
                    if (tile * 16 + g < total_rows) *rows.out(tile * 16 + g) = v0;
                    if (tile * 16 + g + 8 < total_rows) *rows.out(tile * 16 + g + 8) = v1;
                }
            } else if (umax == 1) {  // one round: the group meets at a named barrier, its first warp adds up
                float *rg = red + grp * ks * 16;
                if (c == 0) {
                    rg[sl * 16 + g] = v0;
                    rg[sl * 16 + g + 8] = v1;
                }
                named_sync(1 + grp, 32 * ks);
                if (sl == 0 && lane < 16) {
                    float v = 0.0f;
                    for (int s2 = 0; s2 < ks; s2++) v += rg[s2 * 16 + lane];
                    if (tile * 16 + lane < total_rows) *rows.out(tile * 16 + lane) = v;
                }
            } else {
                // several rounds: this warp's partial rows, then its arrival; the last of the group's ks warps adds
                // them up, and no warp waits for the others before its next round (run 28: a barrier per round cost
                // ~0.5 us; run 29: the expert launches gain, single-round launches do better with the barrier)
                float *rg = red + (u * (W / ks) + grp) * ks * 16;
                if (c == 0) {
                    rg[sl * 16 + g] = v0;
                    rg[sl * 16 + g + 8] = v1;
                }
                __syncwarp();
                int last = 0;
                if (lane == 0) {
                    __threadfence_block();
                    last = atomicAdd(&arrived[u * (W / ks) + grp], 1) == ks - 1;
                }
                if (__shfl_sync(0xffffffffu, last, 0)) {
                    __threadfence_block();
                    if (lane < 16) {
                        float v = 0.0f;
                        for (int s2 = 0; s2 < ks; s2++) v += rg[s2 * 16 + lane];
                        if (tile * 16 + lane < total_rows) *rows.out(tile * 16 + lane) = v;
                    }
                }
            }
        }
        facc[0] = facc[1] = macc[0] = macc[1] = 0.0f;
    }
    cp_async_wait0();
}

// Host side: picks the column split, the grid and the shared memory; false when v6 does not apply (the caller
// then runs v2). Requires 16-byte aligned rows (checked by the caller) and, for experts, whole 16-row tiles.
bool tiles_ok(const PlainRows &, int64_t) { return true; }
bool tiles_ok(const ExpertRows &r, int64_t total) {  // keys must grow with the row; ids fit the shared copy
    return r.n_rows % 16 == 0 && (r.x_stride == 0 || total == r.per_mat) && r.per_mat / r.n_rows <= kMaxIds;
}
int64_t key_span_rows(const PlainRows &) { return INT64_MAX; }
int64_t key_span_rows(const ExpertRows &r) { return r.x_stride ? r.n_rows : INT64_MAX; }

template <int T, int W, class Rows, bool XF = false>
bool launch(const Rows &rows, int64_t total, int64_t n_cols, cudaStream_t s) {
    using D = M6<T, W>;
    using L = Layout<T, W>;
    if (!tiles_ok(rows, total) || n_cols % D::BLK != 0 || n_cols > (1 << 20) || total >= ((int64_t)1 << 31) / 2)
        return false;
    const int K = (int)n_cols;
    const int64_t n_tiles = (total + 15) / 16;
    const int nch = (K + D::CHUNK - 1) / D::CHUNK;
    const int64_t span = key_span_rows(rows);
    auto kernel = matvec6<T, Rows, W, XF>;

    // CTAs per SM: as many as the shared memory holds (16 warps: one; 8 warps: two on an H200, one on a GB10; 4 warps,
    // v9: 3-5). Where several fit, the next launch's CTAs start in the free slots as this one's finish.
    static const int smem_sm = device_attr(cudaDevAttrMaxSharedMemoryPerMultiprocessor);
    // (expert rows: two x slots, what a CTA of a few tiles needs unless its rows span more than two experts' inputs)
    const int est = L::smem(K, span == INT64_MAX ? 1 : 2, L::red_bytes(W, 1)) + kIdsBytes<Rows> + 1024;
    const int per_sm = std::max(1, std::min(smem_sm / est, 64 / W));
    // column split: the smallest ks whose rounds fill the GPU evenly enough
    const int sms = sm_count() * per_sm;
    int best_ks = 1;
    double best_eff = -1;
    for (int ks = 1; ks <= W && ks <= nch; ks *= 2) {
        if (W % ks) continue;  // 12 warps: 1, 2 or 4
        const int64_t rounds = (n_tiles + W / ks - 1) / (W / ks);
        const int64_t ctas = sms;
        const int64_t waves = (rounds + ctas - 1) / ctas;
        const double eff = (double)rounds / (double)(waves * ctas);
        if (eff > best_eff + 0.05) {
            best_eff = eff;
            best_ks = ks;
        }
    }
    static const int ks_env = [] {  // DS4_V6_KS: force the column split (benchmark diagnosis; 0 = chosen here)
        const char *e = std::getenv("DS4_V6_KS");
        return e ? std::atoi(e) : 0;
    }();
    const int ks = ks_env > 0 && W % ks_env == 0 && (ks_env & (ks_env - 1)) == 0 && ks_env <= nch ? ks_env : best_ks;
    const int64_t rounds = (n_tiles + W / ks - 1) / (W / ks);
    // v9 takes only shapes with at least two CTAs per SM and no column split: with one, each of its small CTAs
    // converts all of x (run 34: attn_output_a 63%, attn_output_b 45% of copy against v6's 67 / 64%); and a small
    // matrix would get a handful of CTAs (run 43: [512 x 4096] in 8 CTAs, 27 us a launch)
    if (W <= 4 && (ks > 1 || rounds < 2 * (int64_t)sm_count())) return false;
    int64_t grid = std::min<int64_t>(rounds, (int64_t)sms);
    // distinct x vectors per CTA (expert down projections): at most kMaxSlots
    auto slots_for = [&](int64_t gr) -> int64_t {
        if (span == INT64_MAX) return 1;
        const int64_t rows_per_cta = ((rounds + gr - 1) / gr) * 16 * (W / ks);
        return (rows_per_cta + span - 1) / span + 1;
    };
    while (slots_for(grid) > kMaxSlots && grid < rounds) grid = std::min<int64_t>(rounds, grid * 2);
    const int slots = (int)std::min<int64_t>(kMaxSlots, slots_for(grid));
    if (slots_for(grid) > kMaxSlots) return false;
    const int smem = L::smem(K, slots, L::red_bytes(ks, (int)((rounds + grid - 1) / grid)));
    // W = 12 or 16: 150-210 KB per CTA, fits an H100/H200 (227 KB per block); a GB10 (sm_121) allows about 99 KB,
    // where the caller goes on to the smaller configurations (launch_q's order) and then v2 (Q8_0 with 8192 columns)
    static const int smem_max = device_attr(cudaDevAttrMaxSharedMemoryPerBlockOptin);
    if (smem + kIdsBytes<Rows> > smem_max) return false;
    static int smem_set = 0;
    if (smem > smem_set) {
        if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) != cudaSuccess) {
            cudaGetLastError();
            return false;
        }
        smem_set = smem;
    }
    launch_pdl(kernel, (int)grid, 32 * W, (size_t)smem, s, rows, (int)total, K, ks, (int)rounds, g_diag);
    return true;
}

}  // namespace v6
