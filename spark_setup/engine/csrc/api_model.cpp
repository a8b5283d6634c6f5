// api_model.cpp: the model and session part of the C ABI (ds4.h), plus test entry points for the numeric
// round-trips (exported, not in ds4.h: tests bind them by name).
#include <cstring>
#include <memory>

#include "common.h"
#include "ds4.h"
#include "model.h"
#include "model_cuda.h"  // CUDA backend dispatch (cuda/forward.cu); empty without DS4_WITH_CUDA

struct ds4_model {
    std::unique_ptr<ds4::Model> m;
    int backend = DS4_BACKEND_CPU;
#ifdef DS4_WITH_CUDA
    ds4::CudaModelPtr cuda;  // set when opened with DS4_BACKEND_CUDA: sessions run on the GPU
#endif
};

struct ds4_session {
    std::unique_ptr<ds4::Session> s;
#ifdef DS4_WITH_CUDA
    ds4::CudaSessionPtr cuda;  // the CUDA session (then s is null)
#endif
};

extern "C" {

int ds4_model_open(const char *path, int backend, ds4_model **out) {
    return ds4::guard([&] {
        DS4_CHECK_ARG(path && out, "ds4_model_open: null argument");
        if (backend != DS4_BACKEND_CPU && backend != DS4_BACKEND_CUDA) ds4::fail(DS4_E_ARG, "unknown backend %d", backend);
#ifndef DS4_WITH_CUDA
        if (backend == DS4_BACKEND_CUDA)
            ds4::fail(DS4_E_BACKEND, "this engine was built without CUDA: rebuild it for the GPU (spark-setup build) "
                      "or use the cpu backend");
#endif
        auto h = std::make_unique<ds4_model>();
        h->m = ds4::Model::load(path);
        h->backend = backend;
#ifdef DS4_WITH_CUDA
        if (backend == DS4_BACKEND_CUDA) h->cuda = ds4::cuda_model_load(*h->m);
#endif
        *out = h.release();
        return DS4_OK;
    });
}

void ds4_model_free(ds4_model *m) { delete m; }

int ds4_model_describe(const ds4_model *m, ds4_model_desc *out) {
    return ds4::guard([&] {
        DS4_CHECK_ARG(m && out, "ds4_model_describe: null argument");
        const ds4::Hparams &hp = m->m->hp;
        ds4_model_desc d;
        std::memset(&d, 0, sizeof d);
        d.n_layer = hp.n_layer;
        d.n_embd = hp.n_embd;
        d.n_vocab = hp.n_vocab;
        d.n_head = hp.n_head;
        d.head_dim = hp.head_dim;
        d.n_rot = hp.n_rot;
        d.q_lora_rank = hp.q_lora_rank;
        d.o_groups = hp.o_groups;
        d.o_lora_rank = hp.o_lora_rank;
        d.n_expert = hp.n_expert;
        d.n_expert_used = hp.n_expert_used;
        d.n_expert_shared = hp.n_expert_shared;
        d.n_ff_exp = hp.n_ff;
        d.n_hash_layers = hp.n_hash;
        d.sliding_window = hp.window;
        d.idx_heads = hp.idx_heads;
        d.idx_dim = hp.idx_dim;
        d.idx_topk = hp.idx_topk;
        d.hc_mult = hp.hc_mult;
        d.hc_iters = hp.hc_iters;
        d.is_full_size = hp.is_full_size ? 1 : 0;
        d.weight_bytes = m->m->weight_bytes;
        *out = d;
        return DS4_OK;
    });
}

int ds4_session_new(ds4_model *m, int32_t max_ctx, uint32_t flags, ds4_session **out) {
    return ds4::guard([&] {
        DS4_CHECK_ARG(m && out, "ds4_session_new: null argument");
        DS4_CHECK_ARG(max_ctx >= 1, "max_ctx must be >= 1 (got %d)", max_ctx);
        DS4_CHECK_ARG((flags & ~(uint32_t)DS4_SESSION_NO_ROUNDTRIP) == 0, "unknown session flags 0x%x", flags);
        auto h = std::make_unique<ds4_session>();
#ifdef DS4_WITH_CUDA
        if (m->cuda) {
            h->cuda = ds4::cuda_session_new(*m->cuda, max_ctx, (flags & DS4_SESSION_NO_ROUNDTRIP) == 0);
            *out = h.release();
            return DS4_OK;
        }
#endif
        h->s = std::make_unique<ds4::Session>(m->m.get(), max_ctx, (flags & DS4_SESSION_NO_ROUNDTRIP) == 0);
        *out = h.release();
        return DS4_OK;
    });
}

void ds4_session_free(ds4_session *s) { delete s; }

uint64_t ds4_session_bytes(const ds4_session *s) {
#ifdef DS4_WITH_CUDA
    if (s && s->cuda) return ds4::cuda_session_bytes(*s->cuda);
#endif
    return s ? s->s->bytes : 0;
}

int32_t ds4_session_pos(const ds4_session *s) {
#ifdef DS4_WITH_CUDA
    if (s && s->cuda) return ds4::cuda_session_pos(*s->cuda);
#endif
    return s ? s->s->pos : 0;
}

int ds4_session_eval(ds4_session *s, const int32_t *tokens, int32_t n, int32_t all_logits, float *logits_out) {
    return ds4::guard([&] {
        DS4_CHECK_ARG(s, "ds4_session_eval: null session");
        DS4_CHECK_ARG(n >= 0 && (tokens || n == 0), "ds4_session_eval: bad token array");
#ifdef DS4_WITH_CUDA
        if (s->cuda) {
            ds4::cuda_session_eval(*s->cuda, tokens, n, all_logits != 0, logits_out);
            return DS4_OK;
        }
#endif
        s->s->eval(tokens, n, all_logits != 0, logits_out);
        return DS4_OK;
    });
}

int ds4_session_truncate(ds4_session *s, int32_t n) {
    return ds4::guard([&] {
        DS4_CHECK_ARG(s, "ds4_session_truncate: null session");
#ifdef DS4_WITH_CUDA
        if (s->cuda) {
            ds4::cuda_session_truncate(*s->cuda, n);
            return DS4_OK;
        }
#endif
        s->s->truncate(n);
        return DS4_OK;
    });
}

// ---- test entry points (not part of ds4.h) ----------------------------------------------------------------
// kind: 0 = nearest E4M3 value, 1 = nearest E2M1 value, 2 = nearest F16 value (elementwise over n values);
//       3 = KV row round-trip (x has n values, the first n_aux are FP8 blocks);
//       4 = indexer round-trip (Hadamard + FP4 + F16; n a power of two, multiple of 32).
__attribute__((visibility("default"))) int ds4_test_roundtrip(int kind, const float *x, int64_t n, int64_t n_aux,
                                                              float *out) {
    return ds4::guard([&] {
        DS4_CHECK_ARG(x && out && n >= 0, "ds4_test_roundtrip: bad arguments");
        std::memcpy(out, x, sizeof(float) * n);
        switch (kind) {
        case 0: for (int64_t i = 0; i < n; i++) out[i] = ds4::cpu::e4m3_round(out[i]); break;
        case 1: for (int64_t i = 0; i < n; i++) out[i] = ds4::cpu::e2m1_round(out[i]); break;
        case 2: for (int64_t i = 0; i < n; i++) out[i] = ds4::cpu::f16_round(out[i]); break;
        case 3:
            DS4_CHECK_ARG(n_aux >= 0 && n_aux <= n, "n_aux out of range");
            ds4::cpu::kv_roundtrip(out, (int)n, (int)n_aux);
            break;
        case 4:
            DS4_CHECK_ARG(n >= 32 && (n & (n - 1)) == 0, "indexer round-trip needs a power of two >= 32");
            ds4::cpu::indexer_roundtrip(out, (int)n);
            break;
        default: ds4::fail(DS4_E_ARG, "unknown round-trip kind %d", kind);
        }
        return DS4_OK;
    });
}

}  // extern "C"
