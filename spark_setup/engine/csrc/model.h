// model.h: the DeepSeek-V4-Flash layout bound from a GGUF (hyper-parameters + tensor views into the mmap),
// the per-session state (ds4-model-facts.md D, "KV state per layer") and the forward pass.
//
// Every dimension comes from the GGUF metadata, so tiny test models load; a file that claims the real model
// (4096 hidden or 43 layers) is also checked against the real values and types (facts A, B).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "cpu/ops.h"
#include "gguf.h"

namespace ds4 {

struct Batch;
struct CompressorInputs;

struct Hparams {
    int n_layer = 0, n_embd = 0, n_vocab = 0;
    int n_head = 0, head_dim = 0, n_rot = 0;
    int q_lora_rank = 0, o_groups = 0, o_lora_rank = 0;
    int n_expert = 0, n_expert_used = 0, n_expert_shared = 0, n_ff = 0, n_hash = 0;
    int window = 0;
    int idx_heads = 0, idx_dim = 0, idx_topk = 0;
    int hc_mult = 0, hc_iters = 0;
    int csa_ratio = 0, hca_ratio = 0;  // ratio of even layers >= 2 (with indexer) and of odd layers >= 3
    std::vector<int> ratios;           // per layer: 0, csa_ratio or hca_ratio
    std::vector<float> swiglu_limit;   // per layer
    float rms_eps = 1e-6f, hc_eps = 1e-6f;
    float expert_scale = 1.5f;
    double rope_base = 10000.0, compress_rope_base = 160000.0;
    double yarn_factor = 16.0, yarn_orig_ctx = 65536.0, yarn_beta_fast = 32.0, yarn_beta_slow = 1.0;
    bool is_full_size = false;
    int hc_mix() const { return (2 + hc_mult) * hc_mult; }
    bool is_csa(int layer) const { return ratios[layer] != 0 && layer % 2 == 0; }
};

// A tensor as stored: data in the mmap, GGML type, dims innermost first.
struct Tensor {
    const uint8_t *data = nullptr;
    int type = -1;
    int64_t ne[4] = {1, 1, 1, 1};
    std::string name;
    bool present() const { return data != nullptr; }
    const float *f32() const { return reinterpret_cast<const float *>(data); }
    const int32_t *i32() const { return reinterpret_cast<const int32_t *>(data); }
};

struct LayerWeights {
    int ratio = 0;
    bool csa = false;  // ratio-"4" layer: overlapping compressor + indexer
    Tensor hc_attn_fn, hc_attn_scale, hc_attn_base, attn_norm;
    Tensor q_a, q_a_norm, q_b, kv, kv_norm, sinks, out_a, out_b;
    Tensor cmp_ape, cmp_kv, cmp_gate, cmp_norm;                     // ratio != 0
    Tensor idx_q_b, idx_proj, idx_ape, idx_kv, idx_gate, idx_norm;  // csa
    Tensor hc_ffn_fn, hc_ffn_scale, hc_ffn_base, ffn_norm;
    Tensor gate_inp, exp_bias, tid2eid;                             // tid2eid: hash layers; exp_bias: others
    Tensor gate_exps, up_exps, down_exps, gate_sh, up_sh, down_sh;
};

struct Model {
    std::unique_ptr<GGUF> gguf;
    Hparams hp;
    Tensor tok_embd, out_hc_fn, out_hc_base, out_hc_scale, out_norm, output;
    std::vector<LayerWeights> layers;
    cpu::Rope rope_main, rope_compress;
    uint64_t weight_bytes = 0;

    // Open and validate; throws ds4::Error (DS4_E_IO / DS4_E_FORMAT / DS4_E_MODEL) with a message naming the
    // offending key or tensor.
    static std::unique_ptr<Model> load(const std::string &path);
    const cpu::Rope &rope_for(int layer) const { return hp.ratios[layer] ? rope_compress : rope_main; }
};

// Per-layer state of one session (facts D, "KV state per layer").
struct LayerState {
    std::vector<float> ring;   // window x head_dim raw rows; row of position p at slot p % window
    std::vector<float> comp;   // (max_ctx / ratio) x head_dim compressed rows
    std::vector<float> idx;    // (max_ctx / ratio) x idx_dim indexer rows (csa)
    // compressor state: csa: 2*ratio rows (previous window, current window) x 2*head_dim; hca: ratio x head_dim
    std::vector<float> ckv, csc;
    std::vector<float> ikv, isc;  // indexer compressor (csa): 2*ratio x 2*idx_dim
};

struct Session {
    const Model *model = nullptr;
    int max_ctx = 0;
    bool roundtrip = true;  // official FP8 / Hadamard+FP4 / F16 round-trips
    int pos = 0;
    std::vector<int32_t> tokens;  // every evaluated token (to recompute after truncate)
    std::vector<LayerState> layers;
    // Checkpoints of the small, overwritten parts of the state (ring + compressor buffers) every
    // `ckpt_every` positions: truncate restores the last one <= n and re-evaluates the tokens after it.
    // Compressed / indexer rows are append-only and need no checkpoint.
    // Truncate cost: re-evaluating at most ckpt_every - 1 tokens (ckpt_every = max(32, max_ctx / 16)), or none
    // when cutting back to the end of the last multi-token eval (a prompt boundary, the usual prefix-reuse point),
    // which has its own checkpoint (`tail`).
    int ckpt_every = 0;
    std::vector<std::vector<LayerState>> ckpts;  // ckpts[k]: state before position (k+1)*ckpt_every
    std::vector<LayerState> tail;                // state after the last multi-token eval, at position tail_pos
    int tail_pos = -1;                           // -1: none
    uint64_t bytes = 0;

    Session(const Model *m, int max_ctx, bool roundtrip);
    // Evaluate n tokens at positions pos..pos+n-1; logits: nullptr, n_vocab (last) or n*n_vocab (all).
    void eval(const int32_t *toks, int n, bool all_logits, float *logits);
    void truncate(int n);

private:
    // The forward pass (ds4-model-facts.md D): embeddings, then per layer the attention half (steps 1-13) and
    // the FFN half (14-18), then the head (19).
    void forward(const int32_t *toks, int n, bool all_logits, float *logits);
    void attention_block(int layer, Batch &b);
    void attend_one(int layer, Batch &b, int t, const CompressorInputs &ci);  // steps 6-11 for one token
    void ffn_block(int layer, Batch &b);
    void head(const Batch &b, bool all_logits, float *logits);
    void save_layer_ckpt(int layer, int k);
};

}  // namespace ds4
