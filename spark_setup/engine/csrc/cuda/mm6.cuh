// cuda/mm6.cuh: the batched products of a prefill step on the integer tensor cores (included by cuda/quant.cu after
// matvec6.cuh; entry point cuda_mm6, quant.h).
//
// Why: the f32 GEMM of the prefill step (mmq_kernel, cuda/forward.cu) decodes every weight into a float and spends
// one FMA per weight and token. H200 run 83 (bench/h200/run83-2351/) put 88% of a 256-token step in it: 54% in the
// routed experts, where a 256-token step gives each expert ~6 tokens, so the decode itself dominates. Here the
// weights are decoded exactly as v6 decodes them for a matvec (matvec6.cuh: the same A fragments, by the same
// per-type helpers), once per 16-row x 32-column tile, and that tile then meets up to 2 NP tokens: the mma's B
// columns 0-3 are one token's four digit planes, 4-7 the next token's (v6 leaves 4-7 idle). Integer sums are exact
// and the per-block float scales are applied as v6 applies them, so results stay within the f32 reference bound.
//  - x is converted once per call into digit planes in global memory (convert_kernel: v6's store_x1, one warp per
//    256 columns of a row; scale groups of 256 columns for every type), then staged per chunk with cp.async.
//  - A CTA is 8 warps of 16 rows (128 rows) and one tile of up to 2 NP token slots; chunks of CHUNK columns (v6's
//    8-warp chunk of the type) are double buffered: the weights per warp, the x planes per CTA.
//  - Expert mode: the grid's y is the expert; a CTA walks that expert's slots (~6 in a 256-token step, ~24 in a
//    1024-token one) and returns at once for an expert no token chose. Dense mode: the grid's x is the token tile, so that consecutive CTAs share
//    weight rows in L2.
namespace mm6 {

constexpr int kW = 8;                     // warps per CTA
constexpr int kRowsPerCta = 16 * kW;
constexpr int kXG = 256;                  // x scale group (columns)
template <int T>
using D = v6::M6<T, kW>;                  // v6's 8-warp constants and A-fragment helpers of the type

// Converted x of one call: planes [n_x][4][L] bytes, then scales [n_x][L / 256] and 16-column sums [n_x][L / 16]
// (floats; the sums only for Q2_K's mins).
struct XPlanes {
    uint8_t *dig;
    float *xs, *sx;
    int L;
};
__host__ __device__ inline size_t planes_bytes(int64_t n_x, int64_t L) {
    return (size_t)n_x * (size_t)L * 4 + (size_t)n_x * (size_t)(L / kXG) * 4 + (size_t)n_x * (size_t)(L / 16) * 4 + 64;
}

template <bool SX, bool PERM>
__global__ void __launch_bounds__(256) convert_kernel(const float *X, int64_t x_ld, int n_x, XPlanes xp) {
    const int row = blockIdx.y, grp = blockIdx.x * 8 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= n_x || grp * kXG >= xp.L) return;  // uniform per warp
    const int i0 = grp * kXG + 8 * lane;
    const float4 a = ldx4(X + (int64_t)row * x_ld + i0), b = ldx4(X + (int64_t)row * x_ld + i0 + 4);
    const float v[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
    v6::store_x1<kXG, SX, PERM>(v, true, i0, xp.L, xp.dig + (size_t)row * 4 * xp.L, xp.xs + (size_t)row * (xp.L / kXG),
                                xp.sx + (size_t)row * (xp.L / 16));
}

struct Args {
    const uint8_t *W[2];
    float *Y[2];
    size_t rb;
    int64_t expert_stride;
    int n_rows, K;
    XPlanes xp;
    int rpg, xgs;
    const int *x_idx, *off;
    int n_tok;
    int64_t y_ld;
};

__device__ __forceinline__ void cp_async4(void *smem, const void *gmem) {
    const unsigned sa = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(sa), "l"(gmem) : "memory");
}

// Shared memory of one stage: per warp 16 weight rows of SR bytes; per token slot 4 plane rows of XR bytes (XR =
// CHUNK + 32: the 8 rows one B-fragment load touches per half warp start 8 banks apart), its chunk's scales and sums.
template <int T, int NP>
struct Lay {
    static constexpr int CH = D<T>::CHUNK, TT = 2 * NP, XR = CH + 32;
    static constexpr int kW8 = kW * 16 * D<T>::SR;
    static constexpr int kX = TT * 4 * XR;
    static constexpr int kXs = TT * (CH / kXG) * 4;
    static constexpr int kSx = D<T>::SX ? TT * (CH / 16) * 4 : 0;
    static constexpr int kStage = kW8 + kX + kXs + kSx;
    static constexpr int kLut = D<T>::LUT ? (256 + 128) * D<DS4_TYPE_IQ2_XXS>::LC * 4 : 0;
    static constexpr int kBytes = 2 * kStage + kLut;
};

// One chunk of the warp's 16 rows against NP token pairs (np of them live). rg / rg8: stage rows g and g + 8;
// xg: this lane's B row (pair 0) at the chunk's first column + 8 c; xs / sx: the scales / sums of this lane's C
// token (pair 0); acc per pair: [2] per row (f), [2] per row (m, subtracted).
template <int T, int NP>
struct Chunk;

template <int NP>
struct Chunk<DS4_TYPE_Q8_0, NP> {
    using L = Lay<DS4_TYPE_Q8_0, NP>;
    __device__ static void run(const uint8_t *rg, const uint8_t *rg8, int nb, const uint8_t *xg, const float *xs,
                               const float *, int c, int np, float (&facc)[NP][2], float (&)[NP][2], const uint8_t *) {
        float f[NP][2];
#pragma unroll
        for (int p = 0; p < NP; p++) f[p][0] = f[p][1] = 0.0f;
#pragma unroll
        for (int b = 0; b < L::CH / 32; b++) {
            if (b >= nb) break;
            uint32_t a[4];
            D<DS4_TYPE_Q8_0>::frag(rg, rg8, b, c, a);
            const float h0 = ld_h16(rg + 34 * b), h1 = ld_h16(rg8 + 34 * b);
#pragma unroll
            for (int p = 0; p < NP; p++) {
                if (p >= np) break;
                const uint2 bb = *reinterpret_cast<const uint2 *>(xg + 8 * p * L::XR + 32 * b);
                int d[4] = {0, 0, 0, 0};
                v6::mma_s8(d, a, bb.x, bb.y);
                f[p][0] = fmaf(h0, (float)(d[0] * 256 + d[1]), f[p][0]);
                f[p][1] = fmaf(h1, (float)(d[2] * 256 + d[3]), f[p][1]);
            }
        }
#pragma unroll
        for (int p = 0; p < NP; p++) {  // one x scale per chunk (CH = 256 = kXG)
            const float x = xs[2 * p * (L::CH / kXG)];
            facc[p][0] = fmaf(x, f[p][0], facc[p][0]);
            facc[p][1] = fmaf(x, f[p][1], facc[p][1]);
        }
    }
};

template <int NP>
struct Chunk<DS4_TYPE_Q2_K, NP> {
    using L = Lay<DS4_TYPE_Q2_K, NP>;
    __device__ static void run(const uint8_t *rg, const uint8_t *rg8, int nb, const uint8_t *xg, const float *xs,
                               const float *sx, int c, int np, float (&facc)[NP][2], float (&macc)[NP][2],
                               const uint8_t *) {
        const int sh = 8 * (c >> 1), hb = c & 1;
#pragma unroll
        for (int b = 0; b < L::CH / 256; b++) {
            if (b >= nb) break;
            const uint8_t *p2[2] = {rg + 84 * b, rg8 + 84 * b};
            uint32_t sc[2][4], q[2][4];
            float d[2], dm[2];
            D<DS4_TYPE_Q2_K>::load(p2, c, sc, q, d, dm);
            int acc[NP][4];
#pragma unroll
            for (int p = 0; p < NP; p++) acc[p][0] = acc[p][1] = acc[p][2] = acc[p][3] = 0;
#pragma unroll
            for (int h = 0; h < 2; h++)
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    uint32_t a[4];
                    D<DS4_TYPE_Q2_K>::frag(sc, q, h, j, sh, a);
#pragma unroll
                    for (int p = 0; p < NP; p++) {
                        if (p >= np) break;
                        const uint2 bb = *reinterpret_cast<const uint2 *>(xg + 8 * p * L::XR + 256 * b + 32 * (4 * h + j));
                        v6::mma_s8(acc[p], a, bb.x, bb.y);
                    }
                }
            // mins: this lane's C token, sub-blocks 8 hb .. 8 hb + 7 (the other half is lane c ^ 1's)
            uint32_t mn[2][2];
#pragma unroll
            for (int r = 0; r < 2; r++)
#pragma unroll
                for (int i = 0; i < 2; i++) mn[r][i] = (v6::lds32(p2[r] + 8 * hb + 4 * i) >> 4) & 0x0F0F0F0Fu;
#pragma unroll
            for (int p = 0; p < NP; p++) {
                if (p >= np) break;
                const float x = xs[2 * p * (L::CH / kXG) + b];
                facc[p][0] = fmaf(d[0] * x, (float)(acc[p][0] * 256 + acc[p][1]), facc[p][0]);
                facc[p][1] = fmaf(d[1] * x, (float)(acc[p][2] * 256 + acc[p][3]), facc[p][1]);
                const float *sv = sx + 2 * p * (L::CH / 16) + 16 * b + 8 * hb;
                const float4 s0 = *reinterpret_cast<const float4 *>(sv), s1 = *reinterpret_cast<const float4 *>(sv + 4);
#pragma unroll
                for (int r = 0; r < 2; r++) {
                    const float t = fmaf(ubyte_f(mn[r][0], 0), s0.x, fmaf(ubyte_f(mn[r][0], 1), s0.y,
                                    fmaf(ubyte_f(mn[r][0], 2), s0.z, fmaf(ubyte_f(mn[r][0], 3), s0.w,
                                    fmaf(ubyte_f(mn[r][1], 0), s1.x, fmaf(ubyte_f(mn[r][1], 1), s1.y,
                                    fmaf(ubyte_f(mn[r][1], 2), s1.z, ubyte_f(mn[r][1], 3) * s1.w)))))));
                    macc[p][r] = fmaf(dm[r], t, macc[p][r]);
                }
            }
        }
    }
};

template <int NP>
struct Chunk<DS4_TYPE_IQ2_XXS, NP> {
    using L = Lay<DS4_TYPE_IQ2_XXS, NP>;
    using M = D<DS4_TYPE_IQ2_XXS>;
    template <int PAR>
    __device__ static void block(const uint8_t *pg, const uint8_t *pg8, const uint8_t *xb, const float *xs, int c,
                                 int sh, int ao, uint32_t l4, int np, float (&facc)[NP][2], const uint8_t *lut) {
        const uint8_t *p2[2] = {pg, pg8};
        int ia[NP][4];
#pragma unroll
        for (int p = 0; p < NP; p++) ia[p][0] = ia[p][1] = ia[p][2] = ia[p][3] = 0;
#pragma unroll
        for (int s = 0; s < 8; s++) {
            uint32_t a[4];
            int scl[2];
            M::template frag<PAR>(p2, s, c, sh, ao, l4, lut, a, scl);
#pragma unroll
            for (int p = 0; p < NP; p++) {
                if (p >= np) break;
                const uint2 bb = *reinterpret_cast<const uint2 *>(xb + 8 * p * L::XR + 32 * s);
                int d[4] = {0, 0, 0, 0};
                v6::mma_s8(d, a, bb.x, bb.y);
                ia[p][0] += scl[0] * d[0];
                ia[p][1] += scl[0] * d[1];
                ia[p][2] += scl[1] * d[2];
                ia[p][3] += scl[1] * d[3];
            }
        }
        const float h0 = ld_h16(pg), h1 = ld_h16(pg8);
#pragma unroll
        for (int p = 0; p < NP; p++) {
            if (p >= np) break;
            const float x = xs[2 * p * (L::CH / kXG)] * 0.125f;
            facc[p][0] = fmaf(h0 * x, fmaf((float)ia[p][0], 256.0f, (float)ia[p][1]), facc[p][0]);
            facc[p][1] = fmaf(h1 * x, fmaf((float)ia[p][2], 256.0f, (float)ia[p][3]), facc[p][1]);
        }
    }
    __device__ static void run(const uint8_t *rg, const uint8_t *rg8, int nb, const uint8_t *xg, const float *xs,
                               const float *, int c, int np, float (&facc)[NP][2], float (&)[NP][2],
                               const uint8_t *lut) {
        const uint32_t l4 = 4 * (threadIdx.x & (M::LC - 1));
        const int sh0 = (16 + 7 * c - M::ESH) & 31, sh1 = (7 * c - M::ESH) & 31, ao = c == 3 ? 4 : 0;
        // chunks are whole block pairs: block 2i's headers sit at 2 mod 4 in the stage, 2i + 1's at 0 mod 4
        block<0>(rg, rg8, xg, xs, c, sh0, ao, l4, np, facc, lut);
        if (nb > 1) block<1>(rg + 66, rg8 + 66, xg + 256, xs + 1, c, sh1, 0, l4, np, facc, lut);
    }
};

template <int T, int NP>
__global__ void __launch_bounds__(32 * kW) mm6_kernel(Args a) {
    using Ly = Lay<T, NP>;
    constexpr int CH = Ly::CH, TT = Ly::TT, XR = Ly::XR, SR = D<T>::SR, DB = D<T>::DB, UPR = SR / 16;
    extern __shared__ __align__(16) uint8_t smem[];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
    const uint8_t *W = blockIdx.z ? a.W[1] : a.W[0];
    float *Y = blockIdx.z ? a.Y[1] : a.Y[0];
    int begin, end, r0;
    if (a.off) {  // grid (row blocks, experts, matrices)
        begin = a.off[blockIdx.y];
        end = a.off[blockIdx.y + 1];
        W += (size_t)blockIdx.y * a.expert_stride;
        r0 = blockIdx.x * kRowsPerCta;
    } else {  // grid (token tiles, row blocks, matrices)
        begin = blockIdx.x * TT;
        end = min(a.n_tok, begin + TT);
        r0 = blockIdx.y * kRowsPerCta;
    }
    if (begin >= end) return;  // uniform over the CTA
    const int rw = r0 + 16 * warp;  // this warp's first row
    const int nrw = max(0, min(16, a.n_rows - rw));
    const int xoff = (r0 / a.rpg) * a.xgs;
    const int nch = (a.K + CH - 1) / CH;
    const int ntiles = (end - begin + TT - 1) / TT, items = ntiles * nch;
    uint8_t *lut = smem + 2 * Ly::kStage;
    if constexpr (D<T>::LUT) v6::build_iq2_lut<kW, D<DS4_TYPE_IQ2_XXS>::LC>(reinterpret_cast<uint32_t *>(lut));

    auto issue = [&](int it) {
        if (it < items) {
            const int tile = it / nch, k = it - tile * nch, st = it & 1;
            uint8_t *sg = smem + st * Ly::kStage;
            // this warp's 16 weight rows: the 16-byte aligned span around the chunk's DB bytes (v6's staging)
            const int off = k * DB, a0 = off & ~15;
            const int bytes = ((min(off + DB, (int)a.rb) + 15) & ~15) - a0;
            uint8_t *wd = sg + warp * 16 * SR;
            const uint8_t *ws = W + (size_t)rw * a.rb + a0;
            for (int t = lane; t < 16 * UPR; t += 32) {
                const int r = t / UPR, o = t - r * UPR;
                if (r < nrw && 16 * o < bytes) cp_async16(wd + r * SR + 16 * o, ws + (size_t)r * a.rb + 16 * o);
            }
            // the tile's x: 4 plane rows per slot, the chunk's scales and sums
            const int tb = begin + tile * TT, nt = min(TT, end - tb), col = xoff + k * CH;
            const int cols = min(CH, a.K - k * CH);
            uint8_t *xd = sg + Ly::kW8;
            for (int u = threadIdx.x; u < TT * 4 * (CH / 16); u += 32 * kW) {
                const int rr = u / (CH / 16), o = u - rr * (CH / 16), j = rr >> 2, pl = rr & 3;
                if (j < nt && 16 * o < cols) {
                    const int xr = a.x_idx ? a.x_idx[tb + j] : tb + j;
                    cp_async16(xd + rr * XR + 16 * o, a.xp.dig + ((size_t)xr * 4 + pl) * a.xp.L + col + 16 * o);
                }
            }
            float *xsd = reinterpret_cast<float *>(xd + Ly::kX);
            for (int u = threadIdx.x; u < TT * (CH / kXG); u += 32 * kW) {
                const int j = u / (CH / kXG), o = u - j * (CH / kXG);
                if (j < nt && o * kXG < cols) {
                    const int xr = a.x_idx ? a.x_idx[tb + j] : tb + j;
                    cp_async4(xsd + u, a.xp.xs + (size_t)xr * (a.xp.L / kXG) + col / kXG + o);
                }
            }
            if constexpr (D<T>::SX) {
                float *sxd = reinterpret_cast<float *>(xd + Ly::kX + Ly::kXs);
                for (int u = threadIdx.x; u < TT * (CH / 64); u += 32 * kW) {  // 16-byte pieces of 4 sums
                    const int j = u / (CH / 64), o = u - j * (CH / 64);
                    if (j < nt && 64 * o < cols) {
                        const int xr = a.x_idx ? a.x_idx[tb + j] : tb + j;
                        cp_async16(sxd + 4 * u, a.xp.sx + (size_t)xr * (a.xp.L / 16) + col / 16 + 4 * o);
                    }
                }
            }
        }
        cp_async_commit();
    };

    const float lam = (c & 1) ? 1.0f : 65536.0f;  // C columns 2c, 2c + 1: planes 0,1 (c even) or 2,3 of a token
    float facc[NP][2], macc[NP][2];
#pragma unroll
    for (int p = 0; p < NP; p++) facc[p][0] = facc[p][1] = macc[p][0] = macc[p][1] = 0.0f;
    issue(0);
    for (int it = 0; it < items; it++) {
        issue(it + 1);
        v6::cp_wait<1>();
        __syncthreads();
        const int tile = it / nch, k = it - tile * nch;
        const int tb = begin + tile * TT, nt = min(TT, end - tb), np = (nt + 1) >> 1;
        const uint8_t *sg = smem + (it & 1) * Ly::kStage;
        if (nrw > 0) {
            const uint8_t *stg = sg + warp * 16 * SR + ((k * DB) & 15);
            const uint8_t *xd = sg + Ly::kW8;
            const float *xsd = reinterpret_cast<const float *>(xd + Ly::kX);
            const float *sxd = reinterpret_cast<const float *>(xd + Ly::kX + Ly::kXs);
            const int nb = min(CH, a.K - k * CH) / D<T>::BLK;
            const int tc = c >> 1;  // this lane's C token within a pair
            Chunk<T, NP>::run(stg + g * SR, stg + (g + 8) * SR, nb, xd + g * XR + 8 * c, xsd + tc * (CH / kXG),
                              sxd + tc * (CH / 16), c, np, facc, macc, lut);
        }
        if (k == nch - 1) {  // the tile's last chunk: rows out, accumulators reset
#pragma unroll
            for (int p = 0; p < NP; p++) {
                if (p < np) {  // uniform
                    float v0 = facc[p][0] * lam - macc[p][0], v1 = facc[p][1] * lam - macc[p][1];
                    v0 += __shfl_xor_sync(0xffffffffu, v0, 1);
                    v1 += __shfl_xor_sync(0xffffffffu, v1, 1);
                    const int j = 2 * p + (c >> 1);
                    if ((c & 1) == 0 && j < nt) {
                        float *y = Y + (int64_t)(tb + j) * a.y_ld;
                        if (g < nrw) y[rw + g] = v0;
                        if (g + 8 < nrw) y[rw + g + 8] = v1;
                    }
                }
                facc[p][0] = facc[p][1] = macc[p][0] = macc[p][1] = 0.0f;
            }
        }
        __syncthreads();
    }
    cp_async_wait0();
}

template <int T, int NP>
bool fits() {
    static const int smem_max = device_attr(cudaDevAttrMaxSharedMemoryPerBlockOptin);
    return Lay<T, NP>::kBytes <= smem_max;
}

template <int T, int NP>
void launch(const Args &a, int n_mats, int n_experts, cudaStream_t s) {
    using Ly = Lay<T, NP>;
    auto kernel = mm6_kernel<T, NP>;
    static const cudaError_t set = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Ly::kBytes);
    DS4_CUDA_CHECK(set);
    const unsigned rblocks = (unsigned)((a.n_rows + kRowsPerCta - 1) / kRowsPerCta);
    const dim3 grid = a.off ? dim3(rblocks, (unsigned)n_experts, (unsigned)n_mats)
                            : dim3((unsigned)((a.n_tok + Ly::TT - 1) / Ly::TT), rblocks, (unsigned)n_mats);
    kernel<<<grid, 32 * kW, Ly::kBytes, s>>>(a);
}

// cuda_mm6 (quant.h). Expert mode: 8-slot tiles (NP 4), chosen with 256-token steps, where an expert gets ~6 slots
// (run 86: 16-slot tiles, one 131 KB CTA per SM, prefill 917 -> 759 t/s); with the 1024-token steps of run 89 (~24
// slots an expert) 16-slot tiles are untried. Dense: 16, or 8 where a CTA of 16 does not fit (Q8_0's 107 KB on a
// GB10, ~99 KB per block).
template <int T>
bool run_t(const Args &a, const Mm6Args &p, cudaStream_t s) {
    const int np = !p.off && fits<T, 8>() ? 8 : fits<T, 4>() ? 4 : 0;
    if (!np) return false;
    const dim3 cg((unsigned)((a.xp.L / kXG + 7) / 8), (unsigned)p.n_x);
    convert_kernel<D<T>::SX, D<T>::PERM><<<cg, 256, 0, s>>>(p.X, p.x_ld, (int)p.n_x, a.xp);
    if (np == 8) launch<T, 8>(a, p.n_mats, p.n_experts, s);
    else launch<T, 4>(a, p.n_mats, p.n_experts, s);
    DS4_CUDA_CHECK(cudaGetLastError());
    return true;
}

bool run(const Mm6Args &p, cudaStream_t s) {
    const int T = p.type;
    if (T != DS4_TYPE_Q8_0 && T != DS4_TYPE_Q2_K && T != DS4_TYPE_IQ2_XXS) return false;
    const int64_t K = p.n_cols, rpg = p.rpg > 0 ? p.rpg : p.n_rows;
    const int64_t groups = (p.n_rows + rpg - 1) / rpg;
    const int64_t L = groups > 1 ? (groups - 1) * p.xgs + K : K;
    const size_t rb = row_bytes(T, K);
    const bool grouped = groups > 1;
    auto al16 = [](const void *q) { return (uintptr_t)q % 16 == 0; };
    // whole 256-column groups and 16-byte weight rows (v6's staging), 16-byte x rows, groups of whole CTAs
    if (K <= 0 || K % 256 || L > (1 << 24) || rb % 16 || p.n_rows <= 0 || p.n_rows >= (1 << 30) || p.n_tok <= 0 ||
        !al16(p.W[0]) || (p.n_mats > 1 && !al16(p.W[1])) || !al16(p.X) || p.x_ld % 4 || p.x_ld < L ||
        p.expert_stride % 16 || (grouped && (rpg % kRowsPerCta || p.xgs % 256)) || p.n_x <= 0 ||
        p.n_mats < 1 || p.n_mats > 2 || (p.off && (p.n_experts <= 0 || p.n_experts > 65535)) ||
        (!p.off && p.n_tok > p.n_x && !p.x_idx) || (p.n_rows + kRowsPerCta - 1) / kRowsPerCta > 65535 ||
        p.n_x > 65535 ||
        !p.scratch || !al16(p.scratch) || p.scratch_bytes < planes_bytes(p.n_x, L))
        return false;
    Args a{};
    a.xp.L = (int)L;
    a.xp.dig = static_cast<uint8_t *>(p.scratch);
    a.xp.xs = reinterpret_cast<float *>(a.xp.dig + (size_t)p.n_x * L * 4);
    a.xp.sx = a.xp.xs + (size_t)p.n_x * (L / kXG);
    a.W[0] = static_cast<const uint8_t *>(p.W[0]);
    a.W[1] = static_cast<const uint8_t *>(p.W[1]);
    a.Y[0] = p.Y[0];
    a.Y[1] = p.Y[1];
    a.rb = rb;
    a.expert_stride = p.expert_stride;
    a.n_rows = (int)p.n_rows;
    a.K = (int)K;
    a.rpg = (int)rpg;
    a.xgs = (int)p.xgs;
    a.x_idx = p.x_idx;
    a.off = p.off;
    a.n_tok = p.n_tok;
    a.y_ld = p.y_ld;
    if (T == DS4_TYPE_Q8_0) return run_t<DS4_TYPE_Q8_0>(a, p, s);
    if (T == DS4_TYPE_Q2_K) return run_t<DS4_TYPE_Q2_K>(a, p, s);
    return run_t<DS4_TYPE_IQ2_XXS>(a, p, s);
}

}  // namespace mm6
