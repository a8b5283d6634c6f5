// model.cpp: DeepSeek-V4-Flash, layer by layer, as in ds4-model-facts.md section D (step numbers below).
//
// Loading binds every tensor by its GGUF name with exact dims derived from the metadata. The forward pass
// evaluates a batch of tokens layer by layer: the position-independent parts (projections, MoE) run as
// matrix x batch products whose every row is bit-identical to the single-token matvec, and the stateful parts
// (raw window, compressors, indexer, attention) run token by token in position order, so a batched prefill
// gives exactly the same numbers as feeding the tokens one at a time.
#include "model.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "common.h"
#include "quant.h"

namespace ds4 {

namespace {

constexpr float NEG_INF = -std::numeric_limits<float>::infinity();
const char *A = "deepseek4.";

std::string dims_str(const int64_t *ne, int n) {
    std::string s = "[";
    for (int i = 0; i < n; i++) s += (i ? ", " : "") + std::to_string(ne[i]);
    return s + "]";
}

std::string types_str(const std::vector<int> &types) {
    std::string s;
    for (size_t i = 0; i < types.size(); i++) s += (i ? "/" : "") + std::string(type_name(types[i]));
    return s;
}

const std::vector<int> MATRIX_TYPES = {DS4_TYPE_F32, DS4_TYPE_F16, DS4_TYPE_BF16, DS4_TYPE_Q8_0,
                                       DS4_TYPE_Q2_K, DS4_TYPE_Q4_K, DS4_TYPE_IQ2_XXS};
const std::vector<int> F32_ONLY = {DS4_TYPE_F32};

struct Binder {
    const GGUF &g;
    bool strict;  // full-size file: the exact types of the real Q2/Q4 files (facts B)
    uint64_t bytes = 0;

    // dims: innermost first. types: accepted types (tiny files); strict_type: the real file's type (-1: any of
    // `types`).
    Tensor bind(const std::string &name, std::vector<int64_t> dims, const std::vector<int> &types,
                int strict_type = -1) {
        const TensorInfo *ti = g.find(name);
        if (!ti) fail(DS4_E_MODEL, "missing tensor '%s'", name.c_str());
        int64_t want[4] = {1, 1, 1, 1};
        for (size_t i = 0; i < dims.size(); i++) want[i] = dims[i];
        if (ti->n_dims > (int)std::max<size_t>(dims.size(), 1) ||
            !std::equal(want, want + 4, ti->ne))
            fail(DS4_E_MODEL, "tensor '%s' has dims %s; expected %s", name.c_str(), dims_str(ti->ne, ti->n_dims).c_str(),
                 dims_str(want, (int)dims.size()).c_str());
        const bool ok = (strict && strict_type >= 0) ? ti->type == strict_type
                                                     : std::find(types.begin(), types.end(), ti->type) != types.end();
        if (!ok) {
            const std::string exp = (strict && strict_type >= 0) ? type_name(strict_type) : types_str(types);
            fail(DS4_E_MODEL, "tensor '%s' has type %s; expected %s", name.c_str(), type_name(ti->type), exp.c_str());
        }
        if (ti->type != DS4_TYPE_I32 && row_bytes(ti->type, ti->ne[0]) == 0)
            fail(DS4_E_MODEL, "tensor '%s': row of %lld values is not a whole number of %s blocks", name.c_str(),
                 (long long)ti->ne[0], type_name(ti->type));
        Tensor t;
        t.data = g.data(*ti);
        t.type = ti->type;
        std::copy(ti->ne, ti->ne + 4, t.ne);
        t.name = name;
        bytes += ti->nbytes;
        return t;
    }
};

int req_int(const GGUF &g, const std::string &key) {
    int64_t v;
    if (!g.get_i64(key, &v)) fail(DS4_E_MODEL, "GGUF key '%s' is missing or not an integer", key.c_str());
    if (v < 0 || v > (1 << 30)) fail(DS4_E_MODEL, "GGUF key '%s' = %lld is out of range", key.c_str(), (long long)v);
    return (int)v;
}

double req_float(const GGUF &g, const std::string &key) {
    double v;
    if (!g.get_f64(key, &v)) fail(DS4_E_MODEL, "GGUF key '%s' is missing or not a number", key.c_str());
    return v;
}

void check_real(const char *key, double got, double want) {
    if (std::fabs(got - want) > 1e-6 * std::max(1.0, std::fabs(want)))
        fail(DS4_E_MODEL, "%s%s = %g but DeepSeek-V4-Flash has %g (the file claims the full-size model)", A, key, got,
             want);
}

// Row r of a matrix tensor (rows are ne0 values).
const uint8_t *row_ptr(const Tensor &t, int64_t r) { return t.data + (size_t)r * row_bytes(t.type, t.ne[0]); }

// Y[n_tok x rows] = W[rows x ne0] * X[n_tok x ne0] (every row equal to the single-token matvec).
void matmul(const Tensor &w, const float *X, int n_tok, float *Y) {
    cpu_matmul(w.type, w.data, w.ne[1], w.ne[0], X, n_tok, Y);
}
// Same on a block of rows [r0, r0 + n_rows) (a 2-D slice or one expert of a 3-D tensor, flattened).
void matmul_rows(const Tensor &w, int64_t r0, int64_t n_rows, const float *X, int n_tok, float *Y) {
    cpu_matmul(w.type, row_ptr(w, r0), n_rows, w.ne[0], X, n_tok, Y);
}

std::vector<float> dequant_all(const Tensor &t) {
    const int64_t rows = t.ne[1] * t.ne[2] * t.ne[3];
    std::vector<float> out((size_t)(rows * t.ne[0]));
    cpu_dequant_rows(t.type, t.data, t.ne[0], 0, rows, out.data());
    return out;
}

}  // namespace

// =========================================================================================================
// Loading

std::unique_ptr<Model> Model::load(const std::string &path) {
    std::string err;
    int code = DS4_E_IO;
    auto g = GGUF::open(path, &err, &code);
    if (!g) fail(code, "%s", err.c_str());
    auto m = std::make_unique<Model>();
    Hparams &hp = m->hp;
    const std::string a = A;

    // ---- hyper-parameters (facts A) ----
    std::string arch;
    if (g->get_string("general.architecture", &arch) && arch != "deepseek4")
        fail(DS4_E_MODEL, "general.architecture is '%s', not 'deepseek4'", arch.c_str());
    hp.n_layer = req_int(*g, a + "block_count");
    hp.n_embd = req_int(*g, a + "embedding_length");
    hp.n_vocab = req_int(*g, a + "vocab_size");
    hp.n_head = req_int(*g, a + "attention.head_count");
    const int n_head_kv = req_int(*g, a + "attention.head_count_kv");
    hp.head_dim = req_int(*g, a + "attention.key_length");
    const int v_len = req_int(*g, a + "attention.value_length");
    hp.n_rot = req_int(*g, a + "rope.dimension_count");
    hp.q_lora_rank = req_int(*g, a + "attention.q_lora_rank");
    hp.o_groups = req_int(*g, a + "attention.output_group_count");
    hp.o_lora_rank = req_int(*g, a + "attention.output_lora_rank");
    hp.n_expert = req_int(*g, a + "expert_count");
    hp.n_expert_used = req_int(*g, a + "expert_used_count");
    hp.n_expert_shared = req_int(*g, a + "expert_shared_count");
    hp.n_ff = req_int(*g, a + "expert_feed_forward_length");
    hp.n_hash = req_int(*g, a + "hash_layer_count");
    hp.window = req_int(*g, a + "attention.sliding_window");
    hp.idx_heads = req_int(*g, a + "attention.indexer.head_count");
    hp.idx_dim = req_int(*g, a + "attention.indexer.key_length");
    hp.idx_topk = req_int(*g, a + "attention.indexer.top_k");
    hp.hc_mult = req_int(*g, a + "hyper_connection.count");
    hp.hc_iters = req_int(*g, a + "hyper_connection.sinkhorn_iterations");
    hp.hc_eps = (float)req_float(*g, a + "hyper_connection.epsilon");
    hp.rms_eps = (float)req_float(*g, a + "attention.layer_norm_rms_epsilon");
    hp.expert_scale = (float)req_float(*g, a + "expert_weights_scale");
    hp.rope_base = req_float(*g, a + "rope.freq_base");
    hp.compress_rope_base = req_float(*g, a + "attention.compress_rope_freq_base");
    hp.yarn_factor = req_float(*g, a + "rope.scaling.factor");
    hp.yarn_orig_ctx = req_float(*g, a + "rope.scaling.original_context_length");
    hp.yarn_beta_fast = req_float(*g, a + "rope.scaling.yarn_beta_fast");
    hp.yarn_beta_slow = req_float(*g, a + "rope.scaling.yarn_beta_slow");
    bool norm_w = false;
    if (!g->get_bool(a + "expert_weights_norm", &norm_w))
        fail(DS4_E_MODEL, "GGUF key '%sexpert_weights_norm' is missing or not a bool", A);
    if (!norm_w) fail(DS4_E_MODEL, "%sexpert_weights_norm must be true", A);
    for (const char *k : {"expert_group_count", "expert_group_used_count"}) {
        int64_t v = 0;
        if (g->has(a + k) && (!g->get_i64(a + k, &v) || v != 0))
            fail(DS4_E_MODEL, "%s%s must be 0 or absent (expert groups are not part of DS4)", A, k);
    }

    if (hp.n_layer < 1 || hp.n_embd < 1 || hp.n_vocab < 1 || hp.n_head < 1 || hp.head_dim < 1)
        fail(DS4_E_MODEL, "zero dimension in the metadata (layers/embedding/vocab/heads/head dim)");
    if (n_head_kv != 1) fail(DS4_E_MODEL, "%sattention.head_count_kv = %d; DS4 attention has one shared KV head", A, n_head_kv);
    if (v_len != hp.head_dim)
        fail(DS4_E_MODEL, "%sattention.value_length = %d differs from key_length %d (K and V are one vector)", A, v_len,
             hp.head_dim);
    if (hp.n_rot <= 0 || hp.n_rot % 2 || hp.n_rot > hp.head_dim || hp.n_rot > hp.idx_dim)
        fail(DS4_E_MODEL, "%srope.dimension_count = %d is not an even count <= the head dims", A, hp.n_rot);
    if (hp.o_groups < 1 || hp.n_head % hp.o_groups)
        fail(DS4_E_MODEL, "%sattention.output_group_count = %d does not divide %d heads", A, hp.o_groups, hp.n_head);
    if (hp.n_expert_used < 1 || hp.n_expert_used > hp.n_expert)
        fail(DS4_E_MODEL, "%sexpert_used_count = %d is not in [1, expert_count=%d]", A, hp.n_expert_used, hp.n_expert);
    if (hp.n_expert_shared != 1) fail(DS4_E_MODEL, "%sexpert_shared_count = %d; DS4 has one shared expert", A, hp.n_expert_shared);
    if (hp.n_hash > hp.n_layer) fail(DS4_E_MODEL, "%shash_layer_count = %d exceeds block_count %d", A, hp.n_hash, hp.n_layer);
    if (hp.window < 1) fail(DS4_E_MODEL, "%sattention.sliding_window must be >= 1", A);
    if (hp.idx_dim < 32 || (hp.idx_dim & (hp.idx_dim - 1)) || hp.idx_topk < 1 || hp.idx_heads < 1)
        fail(DS4_E_MODEL, "%sattention.indexer.* invalid (key_length %d must be a power of two >= 32, top_k and "
             "head_count >= 1)", A, hp.idx_dim);
    if (hp.hc_mult < 1 || hp.hc_iters < 1) fail(DS4_E_MODEL, "%shyper_connection.count/sinkhorn_iterations must be >= 1", A);

    // ---- compress-ratio schedule: L0,L1 none; even L>=2 one ratio (overlap + indexer); odd L>=3 another ----
    std::vector<int64_t> ratios;
    if (!g->get_ints(a + "attention.compress_ratios", &ratios))
        fail(DS4_E_MODEL, "GGUF key '%sattention.compress_ratios' is missing or not an integer array", A);
    if ((int)ratios.size() < hp.n_layer)
        fail(DS4_E_MODEL, "%sattention.compress_ratios has %zu entries for %d layers", A, ratios.size(), hp.n_layer);
    hp.ratios.assign(hp.n_layer, 0);
    for (int L = 0; L < hp.n_layer; L++) {
        const int64_t r = ratios[L];
        int *slot = L < 2 ? nullptr : (L % 2 == 0 ? &hp.csa_ratio : &hp.hca_ratio);
        bool ok = slot ? r > 0 && r <= (1 << 20) && (*slot == 0 || *slot == r) : r == 0;
        if (ok && slot) *slot = (int)r;
        if (!ok)
            fail(DS4_E_MODEL, "%sattention.compress_ratios[%d] = %lld breaks the DS4 schedule (layers 0-1: 0; even "
                 "layers >= 2: one ratio with indexer; odd layers >= 3: one other ratio)", A, L, (long long)r);
        hp.ratios[L] = (int)r;
    }
    if (hp.csa_ratio && hp.hca_ratio && hp.csa_ratio >= hp.hca_ratio)
        fail(DS4_E_MODEL, "%sattention.compress_ratios: the even-layer ratio %d must be smaller than the odd-layer "
             "ratio %d", A, hp.csa_ratio, hp.hca_ratio);
    std::vector<float> clamps;
    if (!g->get_floats(a + "swiglu_clamp_exp", &clamps))
        fail(DS4_E_MODEL, "GGUF key '%sswiglu_clamp_exp' is missing or not a float array", A);
    if ((int)clamps.size() < hp.n_layer)
        fail(DS4_E_MODEL, "%sswiglu_clamp_exp has %zu entries for %d layers", A, clamps.size(), hp.n_layer);
    hp.swiglu_limit.assign(clamps.begin(), clamps.begin() + hp.n_layer);

    // ---- the full-size model: every value of facts A ----
    hp.is_full_size = hp.n_embd == 4096 || hp.n_layer == 43;
    if (hp.is_full_size) {
        const struct { const char *key; double got, want; } real[] = {
            {"block_count", (double)hp.n_layer, 43}, {"embedding_length", (double)hp.n_embd, 4096},
            {"vocab_size", (double)hp.n_vocab, 129280}, {"attention.head_count", (double)hp.n_head, 64},
            {"attention.key_length", (double)hp.head_dim, 512}, {"rope.dimension_count", (double)hp.n_rot, 64},
            {"attention.q_lora_rank", (double)hp.q_lora_rank, 1024},
            {"attention.output_group_count", (double)hp.o_groups, 8},
            {"attention.output_lora_rank", (double)hp.o_lora_rank, 1024},
            {"expert_count", (double)hp.n_expert, 256}, {"expert_used_count", (double)hp.n_expert_used, 6},
            {"expert_feed_forward_length", (double)hp.n_ff, 2048}, {"hash_layer_count", (double)hp.n_hash, 3},
            {"attention.sliding_window", (double)hp.window, 128},
            {"attention.indexer.head_count", (double)hp.idx_heads, 64},
            {"attention.indexer.key_length", (double)hp.idx_dim, 128},
            {"attention.indexer.top_k", (double)hp.idx_topk, 512}, {"hyper_connection.count", (double)hp.hc_mult, 4},
            {"hyper_connection.sinkhorn_iterations", (double)hp.hc_iters, 20},
            {"hyper_connection.epsilon", hp.hc_eps, 1e-6}, {"attention.layer_norm_rms_epsilon", hp.rms_eps, 1e-6},
            {"expert_weights_scale", hp.expert_scale, 1.5}, {"rope.freq_base", hp.rope_base, 10000},
            {"attention.compress_rope_freq_base", hp.compress_rope_base, 160000},
            {"rope.scaling.factor", hp.yarn_factor, 16},
            {"rope.scaling.original_context_length", hp.yarn_orig_ctx, 65536},
            {"rope.scaling.yarn_beta_fast", hp.yarn_beta_fast, 32}, {"rope.scaling.yarn_beta_slow", hp.yarn_beta_slow, 1},
        };
        for (const auto &r : real) check_real(r.key, r.got, r.want);
        if (hp.csa_ratio != 4) check_real("attention.compress_ratios (even layers)", hp.csa_ratio, 4);
        if (hp.hca_ratio != 128) check_real("attention.compress_ratios (odd layers)", hp.hca_ratio, 128);
        for (int L = 0; L < hp.n_layer; L++)
            if (hp.swiglu_limit[L] != 10.0f) check_real("swiglu_clamp_exp[i]", hp.swiglu_limit[L], 10);
    }

    // ---- tensors (facts B) ----
    Binder b{*g, hp.is_full_size};
    const int64_t E = hp.n_embd, HC = (int64_t)hp.hc_mult * E, MIX = hp.hc_mix();
    const int64_t in_g = (int64_t)hp.n_head * hp.head_dim / hp.o_groups;
    const auto &MT = MATRIX_TYPES;
    m->tok_embd = b.bind("token_embd.weight", {E, hp.n_vocab}, MT, DS4_TYPE_F16);
    m->out_hc_fn = b.bind("output_hc_fn.weight", {HC, hp.hc_mult}, MT, DS4_TYPE_F16);
    m->out_hc_base = b.bind("output_hc_base.weight", {hp.hc_mult}, F32_ONLY);
    m->out_hc_scale = b.bind("output_hc_scale.weight", {1}, F32_ONLY);
    m->out_norm = b.bind("output_norm.weight", {E}, F32_ONLY);
    m->output = b.bind("output.weight", {E, hp.n_vocab}, MT, DS4_TYPE_Q8_0);
    m->layers.resize(hp.n_layer);
    int exp_gate_type = -1, exp_down_type = -1;  // strict: one recipe for the whole file
    for (int L = 0; L < hp.n_layer; L++) {
        LayerWeights &w = m->layers[L];
        const std::string p = "blk." + std::to_string(L) + ".";
        w.ratio = hp.ratios[L];
        w.csa = hp.is_csa(L);
        w.hc_attn_fn = b.bind(p + "hc_attn_fn.weight", {HC, MIX}, MT, DS4_TYPE_F16);
        w.hc_attn_scale = b.bind(p + "hc_attn_scale.weight", {3}, F32_ONLY);
        w.hc_attn_base = b.bind(p + "hc_attn_base.weight", {MIX}, F32_ONLY);
        w.attn_norm = b.bind(p + "attn_norm.weight", {E}, F32_ONLY);
        w.q_a = b.bind(p + "attn_q_a.weight", {E, hp.q_lora_rank}, MT, DS4_TYPE_Q8_0);
        w.q_a_norm = b.bind(p + "attn_q_a_norm.weight", {hp.q_lora_rank}, F32_ONLY);
        w.q_b = b.bind(p + "attn_q_b.weight", {hp.q_lora_rank, (int64_t)hp.n_head * hp.head_dim}, MT, DS4_TYPE_Q8_0);
        w.kv = b.bind(p + "attn_kv.weight", {E, hp.head_dim}, MT, DS4_TYPE_Q8_0);
        w.kv_norm = b.bind(p + "attn_kv_a_norm.weight", {hp.head_dim}, F32_ONLY);
        w.sinks = b.bind(p + "attn_sinks.weight", {hp.n_head}, F32_ONLY);
        w.out_a = b.bind(p + "attn_output_a.weight", {in_g, (int64_t)hp.o_groups * hp.o_lora_rank}, MT, DS4_TYPE_Q8_0);
        w.out_b = b.bind(p + "attn_output_b.weight", {(int64_t)hp.o_groups * hp.o_lora_rank, E}, MT, DS4_TYPE_Q8_0);
        if (w.ratio) {
            const int64_t W = (w.csa ? 2 : 1) * (int64_t)hp.head_dim;
            w.cmp_ape = b.bind(p + "attn_compressor_ape.weight", {W, w.ratio}, MT, DS4_TYPE_F16);
            w.cmp_kv = b.bind(p + "attn_compressor_kv.weight", {E, W}, MT, DS4_TYPE_F16);
            w.cmp_gate = b.bind(p + "attn_compressor_gate.weight", {E, W}, MT, DS4_TYPE_F16);
            w.cmp_norm = b.bind(p + "attn_compressor_norm.weight", {hp.head_dim}, F32_ONLY);
        }
        if (w.csa) {
            const int64_t IW = 2 * (int64_t)hp.idx_dim;
            w.idx_q_b = b.bind(p + "indexer.attn_q_b.weight", {hp.q_lora_rank, (int64_t)hp.idx_heads * hp.idx_dim}, MT,
                               DS4_TYPE_F16);
            w.idx_proj = b.bind(p + "indexer.proj.weight", {E, hp.idx_heads}, MT, DS4_TYPE_F16);
            w.idx_ape = b.bind(p + "indexer_compressor_ape.weight", {IW, w.ratio}, MT, DS4_TYPE_F16);
            w.idx_kv = b.bind(p + "indexer_compressor_kv.weight", {E, IW}, MT, DS4_TYPE_F16);
            w.idx_gate = b.bind(p + "indexer_compressor_gate.weight", {E, IW}, MT, DS4_TYPE_F16);
            w.idx_norm = b.bind(p + "indexer_compressor_norm.weight", {hp.idx_dim}, F32_ONLY);
        }
        w.hc_ffn_fn = b.bind(p + "hc_ffn_fn.weight", {HC, MIX}, MT, DS4_TYPE_F16);
        w.hc_ffn_scale = b.bind(p + "hc_ffn_scale.weight", {3}, F32_ONLY);
        w.hc_ffn_base = b.bind(p + "hc_ffn_base.weight", {MIX}, F32_ONLY);
        w.ffn_norm = b.bind(p + "ffn_norm.weight", {E}, F32_ONLY);
        w.gate_inp = b.bind(p + "ffn_gate_inp.weight", {E, hp.n_expert}, MT, DS4_TYPE_F16);
        if (L < hp.n_hash) {
            w.tid2eid = b.bind(p + "ffn_gate_tid2eid.weight", {hp.n_expert_used, hp.n_vocab}, {DS4_TYPE_I32});
            const int32_t *ids = w.tid2eid.i32();
            for (int64_t i = 0; i < (int64_t)hp.n_expert_used * hp.n_vocab; i++)
                if (ids[i] < 0 || ids[i] >= hp.n_expert)
                    fail(DS4_E_MODEL, "tensor '%sffn_gate_tid2eid.weight': token %lld maps to expert %d (of %d)",
                         p.c_str(), (long long)(i / hp.n_expert_used), ids[i], hp.n_expert);
        }
        if (g->find(p + "exp_probs_b.bias") || L >= hp.n_hash)
            w.exp_bias = b.bind(p + "exp_probs_b.bias", {hp.n_expert}, F32_ONLY);
        const std::vector<int> EXP_STRICT = {DS4_TYPE_IQ2_XXS, DS4_TYPE_Q2_K, DS4_TYPE_Q4_K};
        const auto &ET = hp.is_full_size ? EXP_STRICT : MT;
        w.gate_exps = b.bind(p + "ffn_gate_exps.weight", {E, hp.n_ff, hp.n_expert}, ET);
        w.up_exps = b.bind(p + "ffn_up_exps.weight", {E, hp.n_ff, hp.n_expert}, ET);
        w.down_exps = b.bind(p + "ffn_down_exps.weight", {hp.n_ff, E, hp.n_expert}, ET);
        if (w.up_exps.type != w.gate_exps.type)
            fail(DS4_E_MODEL, "tensor '%sffn_up_exps.weight' has type %s but ffn_gate_exps has %s (must be equal)",
                 p.c_str(), type_name(w.up_exps.type), type_name(w.gate_exps.type));
        if (hp.is_full_size) {
            const bool q2 = w.gate_exps.type == DS4_TYPE_IQ2_XXS && w.down_exps.type == DS4_TYPE_Q2_K;
            const bool q4 = w.gate_exps.type == DS4_TYPE_Q4_K && w.down_exps.type == DS4_TYPE_Q4_K;
            if (!q2 && !q4)
                fail(DS4_E_MODEL, "layer %d experts are %s/%s; the DS4 files use IQ2_XXS/Q2_K or Q4_K/Q4_K", L,
                     type_name(w.gate_exps.type), type_name(w.down_exps.type));
            if (exp_gate_type >= 0 && (exp_gate_type != w.gate_exps.type || exp_down_type != w.down_exps.type))
                fail(DS4_E_MODEL, "layer %d experts change the quantization recipe of layer 0", L);
            exp_gate_type = w.gate_exps.type;
            exp_down_type = w.down_exps.type;
        }
        w.gate_sh = b.bind(p + "ffn_gate_shexp.weight", {E, hp.n_ff}, MT, DS4_TYPE_Q8_0);
        w.up_sh = b.bind(p + "ffn_up_shexp.weight", {E, hp.n_ff}, MT, DS4_TYPE_Q8_0);
        w.down_sh = b.bind(p + "ffn_down_shexp.weight", {hp.n_ff, E}, MT, DS4_TYPE_Q8_0);
    }
    m->weight_bytes = b.bytes;
    m->rope_main.init(hp.n_rot, hp.rope_base, false, 1, 1, 1, 1);
    m->rope_compress.init(hp.n_rot, hp.compress_rope_base, true, hp.yarn_factor, hp.yarn_orig_ctx,
                          hp.yarn_beta_fast, hp.yarn_beta_slow);
    m->gguf = std::move(g);
    return m;
}

// =========================================================================================================
// Session state

Session::Session(const Model *m, int max_ctx_, bool roundtrip_) : model(m), max_ctx(max_ctx_), roundtrip(roundtrip_) {
    const Hparams &hp = m->hp;
    if (max_ctx < 1) fail(DS4_E_ARG, "max_ctx must be >= 1 (got %d)", max_ctx);
    tokens.reserve(max_ctx);
    layers.resize(hp.n_layer);
    uint64_t state_bytes = 0, row_bytes_total = 0;
    for (int L = 0; L < hp.n_layer; L++) {
        LayerState &s = layers[L];
        const LayerWeights &w = m->layers[L];
        s.ring.assign((size_t)hp.window * hp.head_dim, 0.0f);
        if (w.ratio) {
            const size_t n_rows = (size_t)(max_ctx / w.ratio);
            s.comp.assign(n_rows * hp.head_dim, 0.0f);
            const int slots = w.csa ? 2 * w.ratio : w.ratio;
            const int width = (w.csa ? 2 : 1) * hp.head_dim;
            s.ckv.assign((size_t)slots * width, 0.0f);
            s.csc.assign((size_t)slots * width, NEG_INF);
            if (w.csa) {
                s.idx.assign(n_rows * hp.idx_dim, 0.0f);
                s.ikv.assign((size_t)slots * 2 * hp.idx_dim, 0.0f);
                s.isc.assign((size_t)slots * 2 * hp.idx_dim, NEG_INF);
            }
        }
        row_bytes_total += (s.comp.size() + s.idx.size()) * sizeof(float);
        state_bytes += (s.ring.size() + s.ckv.size() + s.csc.size() + s.ikv.size() + s.isc.size()) * sizeof(float);
    }
    // checkpoints: at most 16, at least every 32 positions
    ckpt_every = std::max(32, (max_ctx + 15) / 16);
    const int n_ckpt = (max_ctx - 1) / ckpt_every;
    // checkpoint buffers: the overwritten parts of every layer's state (ring + compressor buffers)
    auto state_copy = [&] {
        std::vector<LayerState> c(hp.n_layer);
        for (int L = 0; L < hp.n_layer; L++) {
            c[L].ring.resize(layers[L].ring.size());
            c[L].ckv.resize(layers[L].ckv.size());
            c[L].csc.resize(layers[L].csc.size());
            c[L].ikv.resize(layers[L].ikv.size());
            c[L].isc.resize(layers[L].isc.size());
        }
        return c;
    };
    ckpts.resize(n_ckpt);
    for (auto &c : ckpts) c = state_copy();
    tail = state_copy();
    bytes = row_bytes_total + state_bytes * (2 + (uint64_t)n_ckpt) + (uint64_t)max_ctx * sizeof(int32_t);
}

namespace {
// Copy the overwritten parts of a layer's state (not the append-only compressed / indexer rows).
void copy_state(const LayerState &from, LayerState &to) {
    to.ring = from.ring;
    to.ckv = from.ckv;
    to.csc = from.csc;
    to.ikv = from.ikv;
    to.isc = from.isc;
}
}  // namespace

void Session::save_layer_ckpt(int L, int k) { copy_state(layers[L], ckpts[k][L]); }

void Session::truncate(int n) {
    if (n < 0 || n > pos) fail(DS4_E_STATE, "truncate to %d: must be in [0, %d] (tokens evaluated)", n, pos);
    if (n == pos) return;
    const int k = n / ckpt_every;  // checkpoints 0..k-1 describe positions < n
    if (tail_pos > n) tail_pos = -1;  // the tail checkpoint is past the cut: gone
    if (tail_pos >= 0 && tail_pos >= k * ckpt_every) {
        for (size_t L = 0; L < layers.size(); L++) copy_state(tail[L], layers[L]);
        pos = tail_pos;
    } else if (k == 0) {
        for (LayerState &s : layers) {
            std::fill(s.ring.begin(), s.ring.end(), 0.0f);
            std::fill(s.ckv.begin(), s.ckv.end(), 0.0f);
            std::fill(s.csc.begin(), s.csc.end(), NEG_INF);
            std::fill(s.ikv.begin(), s.ikv.end(), 0.0f);
            std::fill(s.isc.begin(), s.isc.end(), NEG_INF);
        }
        pos = 0;
    } else {
        for (size_t L = 0; L < layers.size(); L++) copy_state(ckpts[k - 1][L], layers[L]);
        pos = k * ckpt_every;
    }
    // re-evaluate the kept tokens after the checkpoint (at most ckpt_every - 1 of them)
    std::vector<int32_t> redo(tokens.begin() + pos, tokens.begin() + n);
    tokens.resize(pos);
    if (!redo.empty()) eval(redo.data(), (int)redo.size(), false, nullptr);
}

void Session::eval(const int32_t *toks, int n, bool all_logits, float *logits) {
    if (n < 0) fail(DS4_E_ARG, "token count %d < 0", n);
    if (n == 0) return;
    if ((int64_t)pos + n > max_ctx)
        fail(DS4_E_STATE, "context full: %d tokens evaluated + %d new > max_ctx %d", pos, n, max_ctx);
    for (int i = 0; i < n; i++)
        if (toks[i] < 0 || toks[i] >= model->hp.n_vocab)
            fail(DS4_E_ARG, "token id %d at index %d is outside the vocabulary [0, %d)", toks[i], i, model->hp.n_vocab);
    forward(toks, n, all_logits, logits);
    tokens.insert(tokens.end(), toks, toks + n);
    pos += n;
    if (n > 1) {  // a prompt boundary: the cheapest point to come back to
        for (size_t L = 0; L < layers.size(); L++) copy_state(layers[L], tail[L]);
        tail_pos = pos;
    }
}

// =========================================================================================================
// Forward pass

namespace {

// Hyper-connection weights of one token (step 1): the collapsed input, post and comb.
struct HCWeights {
    std::vector<float> pre, post, comb;  // comb[a * hc + b]
};

// Step 1 / 14: HC pre. H: hc streams of E values (stream-major). Writes x_in (E) and post/comb.
void hc_pre(const Hparams &hp, const Tensor &fn, const Tensor &scale, const Tensor &base, const float *H, float *x_in,
            HCWeights &w) {
    const int hc = hp.hc_mult, E = hp.n_embd, MIX = hp.hc_mix();
    std::vector<float> f((size_t)hc * E), m(MIX);
    cpu::rms_norm(H, (int64_t)hc * E, nullptr, hp.rms_eps, f.data());  // f = RMS(flatten(H)), no weight
    cpu_matvec(fn.type, fn.data, MIX, (int64_t)hc * E, f.data(), m.data());
    const float *sc = scale.f32(), *bs = base.f32();
    w.pre.resize(hc);
    w.post.resize(hc);
    w.comb.resize((size_t)hc * hc);
    for (int i = 0; i < hc; i++) {
        w.pre[i] = cpu::sigmoid(m[i] * sc[0] + bs[i]) + hp.hc_eps;
        w.post[i] = 2.0f * cpu::sigmoid(m[hc + i] * sc[1] + bs[hc + i]);
    }
    float *C = w.comb.data();
    for (int a = 0; a < hc; a++) {  // softmax over b for each a, then + eps
        for (int b = 0; b < hc; b++) C[a * hc + b] = m[2 * hc + a * hc + b] * sc[2] + bs[2 * hc + a * hc + b];
        cpu::softmax(C + a * hc, hc);
        for (int b = 0; b < hc; b++) C[a * hc + b] += hp.hc_eps;
    }
    auto norm_cols = [&] {
        for (int b = 0; b < hc; b++) {
            float s = 0.0f;
            for (int a = 0; a < hc; a++) s += C[a * hc + b];
            for (int a = 0; a < hc; a++) C[a * hc + b] /= (s + hp.hc_eps);
        }
    };
    auto norm_rows = [&] {
        for (int a = 0; a < hc; a++) {
            float s = 0.0f;
            for (int b = 0; b < hc; b++) s += C[a * hc + b];
            for (int b = 0; b < hc; b++) C[a * hc + b] /= (s + hp.hc_eps);
        }
    };
    norm_cols();  // Sinkhorn: columns first, then (iters - 1) x (rows, columns)
    for (int it = 0; it < hp.hc_iters - 1; it++) {
        norm_rows();
        norm_cols();
    }
    for (int d = 0; d < E; d++) {  // x_in = sum_s pre_s * H_s (pre weights not renormalised)
        float acc = 0.0f;
        for (int s = 0; s < hc; s++) acc += w.pre[s] * H[(size_t)s * E + d];
        x_in[d] = acc;
    }
}

// Step 13 / 18: HC post. H'_k = post_k * y + sum_j comb[j][k] * H_j (in place on H).
void hc_post(const Hparams &hp, const HCWeights &w, const float *y, float *H) {
    const int hc = hp.hc_mult, E = hp.n_embd;
    std::vector<float> out((size_t)hc * E);
    for (int k = 0; k < hc; k++)
        for (int d = 0; d < E; d++) {
            float acc = 0.0f;
            for (int j = 0; j < hc; j++) acc += w.comb[j * hc + k] * H[(size_t)j * E + d];
            out[(size_t)k * E + d] = w.post[k] * y[d] + acc;
        }
    std::copy(out.begin(), out.end(), H);
}

// SwiGLU with the DS4 clamp: silu(min(g, lim)) * clamp(u, -lim, lim).
inline float swiglu(float g, float u, float lim) {
    g = std::min(g, lim);
    u = std::min(std::max(u, -lim), lim);
    return cpu::silu(g) * u;
}

// One compressor step (steps 7/8) for position p: store (c, z + ape) in the state; when the window closes,
// pool it into `row_out` (head values, before norm/RoPE) and return true.
//   csa (overlap): state rows [0, r) = previous window, [r, 2r) = current, width 2*head; pooled slots =
//                  previous rows' first half ("Ca") and current rows' second half ("Cb").
//   hca:           state rows [0, r), width head.
bool compressor_step(int ratio, bool csa, int head, const float *c, const float *z, const float *ape, int64_t p,
                     float *kv_state, float *sc_state, float *row_out) {
    const int width = (csa ? 2 : 1) * head;
    const int slot = (int)(p % ratio);
    const int row = csa ? ratio + slot : slot;
    for (int j = 0; j < width; j++) {
        kv_state[(size_t)row * width + j] = c[j];
        sc_state[(size_t)row * width + j] = z[j] + ape[(size_t)slot * width + j];
    }
    if ((p + 1) % ratio != 0) return false;
    const int n_slots = csa ? 2 * ratio : ratio;
    std::vector<float> wts(n_slots), vals(n_slots);
    for (int j = 0; j < head; j++) {
        for (int s = 0; s < n_slots; s++) {
            // csa: rows [0, r) read column j (Ca of the previous window), rows [r, 2r) column head + j (Cb)
            const int col = (csa && s >= ratio) ? head + j : j;
            wts[s] = sc_state[(size_t)s * width + col];
            vals[s] = kv_state[(size_t)s * width + col];
        }
        cpu::softmax(wts.data(), n_slots);
        float acc = 0.0f;
        for (int s = 0; s < n_slots; s++)
            if (wts[s] != 0.0f) acc += wts[s] * vals[s];
        row_out[j] = acc;
    }
    if (csa) {  // the current window becomes the previous one
        std::memcpy(kv_state, kv_state + (size_t)ratio * width, sizeof(float) * ratio * width);
        std::memcpy(sc_state, sc_state + (size_t)ratio * width, sizeof(float) * ratio * width);
    }
    return true;
}

}  // namespace

// Activations of a batch of n tokens at positions pos0 .. pos0+n-1 while it walks through the layers.
struct Batch {
    int n = 0;
    int64_t pos0 = 0;
    const int32_t *toks = nullptr;
    std::vector<float> H;           // n x hc*E: the hyper-connection streams (stream-major per token)
    std::vector<HCWeights> hcw;     // per token: post / comb of the current half-layer
    std::vector<float> x_in, a;     // n x E: collapsed streams, normed block input
    std::vector<float> qr, q, kv;   // n x q_lora_rank, n x heads*head_dim, n x head_dim
    std::vector<float> o, y;        // n x heads*head_dim attention output, n x E block output
};

// The position-independent products of a compressed layer, for the whole batch (steps 7-9).
struct CompressorInputs {
    int width = 0;                    // compressor width: 2*head_dim (csa) or head_dim (hca)
    std::vector<float> c, z, ape;     // n x width kv / gate; ape [ratio x width]
    std::vector<float> ic, iz, iape;  // indexer compressor: n x 2*idx_dim, ape [ratio x 2*idx_dim]
    std::vector<float> qi, wi;        // indexer queries n x idx_heads*idx_dim, head weights n x idx_heads
};

void Session::forward(const int32_t *toks, int n, bool all_logits, float *logits) {
    const Hparams &hp = model->hp;
    const int E = hp.n_embd, HCE = hp.hc_mult * hp.n_embd;
    Batch b;
    b.n = n;
    b.pos0 = pos;
    b.toks = toks;
    b.hcw.resize(n);
    b.x_in.resize((size_t)n * E);
    b.a.resize((size_t)n * E);
    b.y.resize((size_t)n * E);
    b.qr.resize((size_t)n * hp.q_lora_rank);
    b.q.resize((size_t)n * hp.n_head * hp.head_dim);
    b.o.resize(b.q.size());
    b.kv.resize((size_t)n * hp.head_dim);

    // 0. x = token_embd[t]; H = hc copies of x
    b.H.resize((size_t)n * HCE);
    for (int t = 0; t < n; t++) {
        float *Ht = &b.H[(size_t)t * HCE];
        cpu_dequant_rows(model->tok_embd.type, model->tok_embd.data, E, toks[t], toks[t] + 1, Ht);
        for (int s = 1; s < hp.hc_mult; s++) std::copy(Ht, Ht + E, Ht + (size_t)s * E);
    }
    for (int L = 0; L < hp.n_layer; L++) {
        attention_block(L, b);  // steps 1-13
        ffn_block(L, b);        // steps 14-18
    }
    if (logits) head(b, all_logits, logits);  // step 19
}

void Session::attention_block(int L, Batch &b) {
    const Model &M = *model;
    const Hparams &hp = M.hp;
    const LayerWeights &w = M.layers[L];
    const int n = b.n, E = hp.n_embd, HCE = hp.hc_mult * hp.n_embd, D = hp.n_head, hd = hp.head_dim;
    const int QR = hp.q_lora_rank, ID = hp.idx_dim, IH = hp.idx_heads;
    const cpu::Rope &rope = M.rope_for(L);

    for (int t = 0; t < n; t++) {
        // 1. HC pre: x_in, post, comb from the streams
        hc_pre(hp, w.hc_attn_fn, w.hc_attn_scale, w.hc_attn_base, &b.H[(size_t)t * HCE], &b.x_in[(size_t)t * E],
               b.hcw[t]);
        // 2. a = RMS(x_in) * attn_norm
        cpu::rms_norm(&b.x_in[(size_t)t * E], E, w.attn_norm.f32(), hp.rms_eps, &b.a[(size_t)t * E]);
    }
    // 3. qr = RMS(q_a a) * q_a_norm; q = q_b qr, each head RMS-normalised without weight
    matmul(w.q_a, b.a.data(), n, b.qr.data());
    for (int t = 0; t < n; t++) cpu::rms_norm(&b.qr[(size_t)t * QR], QR, w.q_a_norm.f32(), hp.rms_eps, &b.qr[(size_t)t * QR]);
    matmul(w.q_b, b.qr.data(), n, b.q.data());
    // 4. kv = RMS(attn_kv a) * kv_norm
    matmul(w.kv, b.a.data(), n, b.kv.data());
    for (int t = 0; t < n; t++) {
        const int64_t p = b.pos0 + t;
        for (int h = 0; h < D; h++) {
            float *qh = &b.q[((size_t)t * D + h) * hd];
            cpu::rms_norm(qh, hd, nullptr, hp.rms_eps, qh);
            rope.apply(qh, hd, p);  // 5. RoPE on the trailing n_rot dims (YaRN on compressed layers)
        }
        float *kt = &b.kv[(size_t)t * hd];
        cpu::rms_norm(kt, hd, w.kv_norm.f32(), hp.rms_eps, kt);
        rope.apply(kt, hd, p);
    }
    // 7-9, position-independent part: compressor and indexer projections for the whole batch
    CompressorInputs ci;
    if (w.ratio) {
        ci.width = (w.csa ? 2 : 1) * hd;
        ci.c.resize((size_t)n * ci.width);
        ci.z.resize((size_t)n * ci.width);
        matmul(w.cmp_kv, b.a.data(), n, ci.c.data());
        matmul(w.cmp_gate, b.a.data(), n, ci.z.data());
        ci.ape = dequant_all(w.cmp_ape);
    }
    if (w.csa) {
        ci.ic.resize((size_t)n * 2 * ID);
        ci.iz.resize((size_t)n * 2 * ID);
        ci.qi.resize((size_t)n * IH * ID);
        ci.wi.resize((size_t)n * IH);
        matmul(w.idx_kv, b.a.data(), n, ci.ic.data());
        matmul(w.idx_gate, b.a.data(), n, ci.iz.data());
        matmul(w.idx_q_b, b.qr.data(), n, ci.qi.data());
        matmul(w.idx_proj, b.a.data(), n, ci.wi.data());
        ci.iape = dequant_all(w.idx_ape);
    }
    // 6-11: the stateful part, token by token in position order
    for (int t = 0; t < n; t++) attend_one(L, b, t, ci);

    // 12. grouped output projection: low_g = attn_output_a[group g rows] . o[heads of group g];
    //     y = attn_output_b . concat(low_0 .. low_{G-1})
    const int G = hp.o_groups, in_g = D * hd / G, OR = hp.o_lora_rank;
    std::vector<float> grp((size_t)n * in_g), lowg((size_t)n * OR), low((size_t)n * G * OR);
    for (int g = 0; g < G; g++) {
        for (int t = 0; t < n; t++)
            std::memcpy(&grp[(size_t)t * in_g], &b.o[(size_t)t * D * hd + (size_t)g * in_g], sizeof(float) * in_g);
        matmul_rows(w.out_a, (int64_t)g * OR, OR, grp.data(), n, lowg.data());
        for (int t = 0; t < n; t++)
            std::memcpy(&low[(size_t)t * G * OR + (size_t)g * OR], &lowg[(size_t)t * OR], sizeof(float) * OR);
    }
    matmul(w.out_b, low.data(), n, b.y.data());
    // 13. HC post: H'_k = post_k y + sum_j comb[j][k] H_j
    for (int t = 0; t < n; t++) hc_post(hp, b.hcw[t], &b.y[(size_t)t * E], &b.H[(size_t)t * HCE]);
}

void Session::attend_one(int L, Batch &b, int t, const CompressorInputs &ci) {
    const Model &M = *model;
    const Hparams &hp = M.hp;
    const LayerWeights &w = M.layers[L];
    LayerState &st = layers[L];
    const int D = hp.n_head, hd = hp.head_dim, nrot = hp.n_rot, ID = hp.idx_dim, IH = hp.idx_heads;
    const int r = w.ratio;
    const int64_t p = b.pos0 + t;
    if (p > 0 && p % ckpt_every == 0 && (size_t)(p / ckpt_every - 1) < ckpts.size())
        save_layer_ckpt(L, (int)(p / ckpt_every - 1));  // state before position p, for truncate

    // 6. kv: FP8 round-trip on the non-rope dims, F16 (official mode); into the raw window
    float *kt = &b.kv[(size_t)t * hd];
    if (roundtrip) cpu::kv_roundtrip(kt, hd, hd - nrot);
    std::memcpy(&st.ring[(size_t)(p % hp.window) * hd], kt, sizeof(float) * hd);

    // 7. compressor: one row per `ratio` positions = RMS(pooled) * norm, RoPE at the window start p + 1 - r
    std::vector<float> row(std::max(hd, ID));
    if (r && compressor_step(r, w.csa, hd, &ci.c[(size_t)t * ci.width], &ci.z[(size_t)t * ci.width], ci.ape.data(),
                             p, st.ckv.data(), st.csc.data(), row.data())) {
        float *dst = &st.comp[(size_t)(p / r) * hd];
        cpu::rms_norm(row.data(), hd, w.cmp_norm.f32(), hp.rms_eps, dst);
        M.rope_compress.apply(dst, hd, p + 1 - r);
        if (roundtrip) cpu::kv_roundtrip(dst, hd, hd - nrot);
    }
    // 8. indexer compressor (csa): the same pooling at the indexer width; Hadamard + FP4 (official mode)
    if (w.csa && compressor_step(r, true, ID, &ci.ic[(size_t)t * 2 * ID], &ci.iz[(size_t)t * 2 * ID],
                                 ci.iape.data(), p, st.ikv.data(), st.isc.data(), row.data())) {
        float *dst = &st.idx[(size_t)(p / r) * ID];
        cpu::rms_norm(row.data(), ID, w.idx_norm.f32(), hp.rms_eps, dst);
        M.rope_compress.apply(dst, ID, p + 1 - r);
        if (roundtrip) cpu::indexer_roundtrip(dst, ID);
    }

    // visible compressed rows: index < (p + 1) / r
    const int n_comp = r ? (int)((p + 1) / r) : 0;
    std::vector<int> sel;
    if (w.csa && n_comp > hp.idx_topk) {
        // 9. indexer: score_c = sum_h (w_h / sqrt(IH)) * relu(qI_h . kI_c) / sqrt(ID); keep the top-k rows
        //    (equal scores: lower row first)
        std::vector<float> qt(ci.qi.begin() + (size_t)t * IH * ID, ci.qi.begin() + (size_t)(t + 1) * IH * ID);
        for (int h = 0; h < IH; h++) {
            M.rope_compress.apply(&qt[(size_t)h * ID], ID, p);
            if (roundtrip) cpu::indexer_roundtrip(&qt[(size_t)h * ID], ID);
        }
        const float s_scale = 1.0f / std::sqrt((float)ID), w_scale = 1.0f / std::sqrt((float)IH);
        std::vector<float> scores(n_comp);
        for (int c = 0; c < n_comp; c++) {
            const float *kc = &st.idx[(size_t)c * ID];
            float acc = 0.0f;
            for (int h = 0; h < IH; h++) {
                const float *qh = &qt[(size_t)h * ID];
                float dot = 0.0f;
                for (int d = 0; d < ID; d++) dot += qh[d] * kc[d];
                acc += (std::max(dot, 0.0f) * s_scale) * (ci.wi[(size_t)t * IH + h] * w_scale);
            }
            scores[c] = acc;
        }
        sel.resize(hp.idx_topk);
        cpu::topk(scores.data(), n_comp, hp.idx_topk, sel.data());
        std::sort(sel.begin(), sel.end());
    } else {
        sel.resize(n_comp);  // ratio-128 layers, or few rows: every emitted row is visible
        for (int c = 0; c < n_comp; c++) sel[c] = c;
    }

    // 10. attention per head over the raw window and the visible compressed rows; value = key;
    //     softmax with the head's sink logit in the denominator only
    const int64_t w0 = std::max<int64_t>(0, p - hp.window + 1);
    const int n_raw = (int)(p - w0 + 1), n_all = n_raw + (int)sel.size();
    std::vector<const float *> rows(n_all);
    for (int i = 0; i < n_raw; i++) rows[i] = &st.ring[(size_t)((w0 + i) % hp.window) * hd];
    for (size_t i = 0; i < sel.size(); i++) rows[n_raw + i] = &st.comp[(size_t)sel[i] * hd];
    const float scale = 1.0f / std::sqrt((float)hd);
    std::vector<float> probs(n_all + 1);
    for (int h = 0; h < D; h++) {
        const float *qh = &b.q[((size_t)t * D + h) * hd];
        for (int i = 0; i < n_all; i++) {
            float dot = 0.0f;
            for (int d = 0; d < hd; d++) dot += qh[d] * rows[i][d];
            probs[i] = dot * scale;
        }
        probs[n_all] = w.sinks.f32()[h];
        cpu::softmax(probs.data(), n_all + 1);
        float *oh = &b.o[((size_t)t * D + h) * hd];
        std::fill(oh, oh + hd, 0.0f);
        for (int i = 0; i < n_all; i++)
            for (int d = 0; d < hd; d++) oh[d] += probs[i] * rows[i][d];
        // 11. inverse RoPE (angle -p) on the output's rope dims
        M.rope_for(L).apply(oh, hd, p, /*inverse=*/true);
    }
}

void Session::ffn_block(int L, Batch &b) {
    const Model &M = *model;
    const Hparams &hp = M.hp;
    const LayerWeights &w = M.layers[L];
    const int n = b.n, E = hp.n_embd, HCE = hp.hc_mult * hp.n_embd, F = hp.n_ff;
    const int K = hp.n_expert_used, NE = hp.n_expert;

    // 14. HC pre with the ffn weights; x = RMS(x_f) * ffn_norm
    std::vector<float> &x = b.a;
    for (int t = 0; t < n; t++) {
        hc_pre(hp, w.hc_ffn_fn, w.hc_ffn_scale, w.hc_ffn_base, &b.H[(size_t)t * HCE], &b.x_in[(size_t)t * E], b.hcw[t]);
        cpu::rms_norm(&b.x_in[(size_t)t * E], E, w.ffn_norm.f32(), hp.rms_eps, &x[(size_t)t * E]);
    }
    // 15. router: s = sqrt(softplus(ffn_gate_inp x)). Hash layers: experts = tid2eid[token]; others: top-k of
    //     s + exp_probs_b (equal scores: lower expert first). Weights from the unbiased s, normalised, * scale.
    std::vector<float> glog((size_t)n * NE);
    matmul(w.gate_inp, x.data(), n, glog.data());
    std::vector<int> eid((size_t)n * K);
    std::vector<float> ewt((size_t)n * K), s(NE), biased(NE);
    for (int t = 0; t < n; t++) {
        for (int e = 0; e < NE; e++) s[e] = std::sqrt(cpu::softplus(glog[(size_t)t * NE + e]));
        int *sel = &eid[(size_t)t * K];
        if (L < hp.n_hash) {
            for (int k = 0; k < K; k++) sel[k] = w.tid2eid.i32()[(size_t)b.toks[t] * K + k];
        } else {
            for (int e = 0; e < NE; e++) biased[e] = s[e] + (w.exp_bias.present() ? w.exp_bias.f32()[e] : 0.0f);
            cpu::topk(biased.data(), NE, K, sel);
        }
        float sum = 0.0f;
        for (int k = 0; k < K; k++) sum += s[sel[k]];
        // official mode: ds4's floor on the sum; reference mode: transformers' + 1e-20
        const float denom = roundtrip ? std::max(sum, 6.103515625e-5f) : sum + 1e-20f;
        for (int k = 0; k < K; k++) ewt[(size_t)t * K + k] = s[sel[k]] / denom * hp.expert_scale;
    }
    // 16. routed experts: y_e = W_down,e (silu(min(W_gate,e x, lim)) * clamp(W_up,e x, +-lim)) * w_e.
    //     Tokens are grouped per expert (each row of a batched product equals the single-token product) and
    //     summed per token in ascending expert order.
    std::vector<float> moe((size_t)n * E, 0.0f);
    const float lim = hp.swiglu_limit[L];
    for (int e = 0; e < NE; e++) {
        std::vector<int> who;
        std::vector<float> wts;
        for (int t = 0; t < n; t++)
            for (int k = 0; k < K; k++)
                if (eid[(size_t)t * K + k] == e) {
                    who.push_back(t);
                    wts.push_back(ewt[(size_t)t * K + k]);
                }
        if (who.empty()) continue;
        const int m = (int)who.size();
        std::vector<float> X((size_t)m * E), gt((size_t)m * F), up((size_t)m * F), dn((size_t)m * E);
        for (int i = 0; i < m; i++) std::memcpy(&X[(size_t)i * E], &x[(size_t)who[i] * E], sizeof(float) * E);
        matmul_rows(w.gate_exps, (int64_t)e * F, F, X.data(), m, gt.data());
        matmul_rows(w.up_exps, (int64_t)e * F, F, X.data(), m, up.data());
        for (size_t i = 0; i < gt.size(); i++) gt[i] = swiglu(gt[i], up[i], lim);
        matmul_rows(w.down_exps, (int64_t)e * E, E, gt.data(), m, dn.data());
        for (int i = 0; i < m; i++)
            for (int d = 0; d < E; d++) moe[(size_t)who[i] * E + d] += dn[(size_t)i * E + d] * wts[i];
    }
    // 17. shared expert: the same clamped SwiGLU, unweighted; block output = routed + shared
    std::vector<float> gt((size_t)n * F), up((size_t)n * F);
    matmul(w.gate_sh, x.data(), n, gt.data());
    matmul(w.up_sh, x.data(), n, up.data());
    for (size_t i = 0; i < gt.size(); i++) gt[i] = swiglu(gt[i], up[i], lim);
    matmul(w.down_sh, gt.data(), n, b.y.data());
    for (size_t i = 0; i < b.y.size(); i++) b.y[i] = moe[i] + b.y[i];
    // 18. HC post
    for (int t = 0; t < n; t++) hc_post(hp, b.hcw[t], &b.y[(size_t)t * E], &b.H[(size_t)t * HCE]);
}

void Session::head(const Batch &b, bool all_logits, float *logits) {
    const Model &M = *model;
    const Hparams &hp = M.hp;
    const int E = hp.n_embd, hc = hp.hc_mult, HCE = hc * E;
    // 19. f = RMS(flatten(H)); w_s = sigmoid(output_hc_fn f * scale + base) + eps; z = sum_s w_s H_s;
    //     logits = output . (RMS(z) * output_norm)
    std::vector<float> f(HCE), mix(hc), z(E);
    for (int t = all_logits ? 0 : b.n - 1; t < b.n; t++) {
        const float *Ht = &b.H[(size_t)t * HCE];
        cpu::rms_norm(Ht, HCE, nullptr, hp.rms_eps, f.data());
        cpu_matvec(M.out_hc_fn.type, M.out_hc_fn.data, hc, HCE, f.data(), mix.data());
        std::fill(z.begin(), z.end(), 0.0f);
        for (int s = 0; s < hc; s++) {
            const float ws = cpu::sigmoid(mix[s] * M.out_hc_scale.f32()[0] + M.out_hc_base.f32()[s]) + hp.hc_eps;
            for (int d = 0; d < E; d++) z[d] += ws * Ht[(size_t)s * E + d];
        }
        cpu::rms_norm(z.data(), E, M.out_norm.f32(), hp.rms_eps, z.data());
        float *out = logits + (all_logits ? (size_t)t * hp.n_vocab : 0);
        cpu_matvec(M.output.type, M.output.data, hp.n_vocab, E, z.data(), out);
    }
}

}  // namespace ds4
