"""`inspect` and gguf_info: real-layout tensor tables, small real GGUF files, corrupt files through the CLI."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from spark_setup.engine import gguf_info as gi
from spark_setup.errors import UserError

ROOT = Path(__file__).resolve().parents[1]

# ds4-model-facts.md §G / §B (numbers derived there by hand from the shapes and types)
Q2_TENSOR_BYTES = 86_714_775_900
Q2_BPT_16K = 9_641_693_604
Q2_BPT_16K_F16_KV = 9_600_405_924
INDEXER_QUERY_BYTES = 21 * 17_301_504  # idle below ~2k context
KV_16K_F32 = 82_575_360


def _synthetic_tool():
    spec = importlib.util.spec_from_file_location("synthetic_q2_gguf", ROOT / "tools" / "synthetic_q2_gguf.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def _facts_table():
    """The real Q2 file's tensor table (names, dims, types) as the facts-derived generator lists it; no data."""
    tool = _synthetic_tool()
    return [gi.Tensor.make(name, dims, typ) for name, dims, typ, _kind, _kw in tool.tensor_list()]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spark_setup", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "200"})


# ---- bytes per token on the real table ---------------------------------------------------------------------

def test_bytes_per_token_reproduces_the_real_q2_numbers():
    table = _facts_table()
    assert len(table) == 1328
    total = sum(t.nbytes for t in table)
    assert abs(total - Q2_TENSOR_BYTES) <= 0.001 * Q2_TENSOR_BYTES
    b = gi.bytes_per_token(table, 16384)
    assert abs(b.total - Q2_BPT_16K) <= 0.001 * Q2_BPT_16K
    assert b.kv == KV_16K_F32 and b.indexer_active
    assert b.routed == 43 * 6 * (2 * 2_162_688 + 2_752_512)
    f16 = gi.bytes_per_token(table, 16384, kv_bytes=2)
    assert abs(f16.total - Q2_BPT_16K_F16_KV) <= 0.001 * Q2_BPT_16K_F16_KV
    # short context: no KV and the indexer query projections are idle (every compressed row is visible)
    b0 = gi.bytes_per_token(table, 0)
    assert b0.kv == 0 and not b0.indexer_active
    assert b0.total == Q2_BPT_16K - KV_16K_F32 - INDEXER_QUERY_BYTES
    # bytes grow with context
    totals = [gi.bytes_per_token(table, c).total for c in (0, 1024, 4096, 16384, 65536)]
    assert totals == sorted(totals) and len(set(totals)) == len(totals)


def test_bytes_per_token_q4_routed_experts():
    table = [t if "_exps." not in t.name else gi.Tensor.make(t.name, t.dims, gi.Q4_K) for t in _facts_table()]
    b = gi.bytes_per_token(table, 16384)
    assert b.routed == 3_652_190_208
    assert abs(b.total - 11_467_788_708) <= 0.001 * 11_467_788_708


def test_reference_table_matches_the_generator():
    ref = {t.name: t for t in gi.reference_tensors("q2")}
    facts = {t.name: t for t in _facts_table()}
    assert ref == facts


# ---- a real-layout header (sparse 80 GiB file, no data written) ---------------------------------------------

@pytest.fixture(scope="module")
def q2_header_file(tmp_path_factory):
    tool = _synthetic_tool()
    path = tmp_path_factory.mktemp("q2") / "q2-layout.gguf"

    def write(tensors, out):
        toks = [f"<t{i}>" for i in range(tool.N_VOCAB)]  # metadata shape only; the vocab is not inspected
        hdr, data_pos, layout, total = tool.build_header(tensors, toks, ["a b"])
        with open(out, "wb") as fh:
            fh.truncate(total)  # sparse: the tensor data is a hole
            fh.write(hdr)
        return total

    write(tool.tensor_list(), path)
    return path, tool, write


def test_read_info_on_the_real_layout(q2_header_file):
    path, _tool, _ = q2_header_file
    info = gi.read_info(path)
    assert info.kind == "main" and info.variant == "q2"
    assert info.mismatches == []
    assert len(info.tensors) == 1328
    assert info.tensor_bytes == Q2_TENSOR_BYTES
    assert info.bytes_per_token(16384).total == Q2_BPT_16K
    assert info.file_size == path.stat().st_size
    groups = {g.pattern: g for g in info.groups()}
    assert groups["blk.*.attn_q_a.weight"].count == 43 and groups["blk.*.attn_q_a.weight"].layers == "0-42"
    assert groups["blk.*.indexer.attn_q_b.weight"].count == 21
    assert groups["blk.*.indexer.attn_q_b.weight"].layers == "2-42/2"
    assert groups["blk.*.ffn_gate_tid2eid.weight"].layers == "0-2"
    assert groups["blk.*.attn_compressor_ape.weight"].dims == ["[1024,4]", "[512,128]"]
    assert sum(g.nbytes for g in groups.values()) == Q2_TENSOR_BYTES


def test_layout_mismatches_are_listed(q2_header_file, tmp_path):
    _path, tool, write = q2_header_file
    tensors = []
    for name, dims, typ, kind, kw in tool.tensor_list():
        if name == "blk.7.ffn_norm.weight":
            continue  # missing
        if name == "blk.5.attn_q_b.weight":
            typ = tool.F16  # wrong type
        if name == "blk.9.attn_kv.weight":
            dims = (4096, 256)  # wrong shape
        tensors.append((name, dims, typ, kind, kw))
    tensors.append(("blk.3.surprise.weight", (16,), tool.F32, "const", {}))
    bad = tmp_path / "bad.gguf"
    write(tensors, bad)
    info = gi.read_info(bad)
    found = {(m.name, m.expected, m.found) for m in info.mismatches}
    assert found == {
        ("blk.7.ffn_norm.weight", "F32 [4096]", "missing"),
        ("blk.5.attn_q_b.weight", "type Q8_0", "type F16"),
        ("blk.9.attn_kv.weight", "dims [4096,512]", "dims [4096,256]"),
        ("blk.3.surprise.weight", "absent", "F32 [16]"),
    }
    r = run_cli("inspect", str(bad), "--json", "--strict")
    assert r.returncode == 1
    data = json.loads(r.stdout)
    assert len(data["mismatches"]) == 4 and data["valid"] is False


def test_cli_json_on_the_real_layout(q2_header_file):
    path, _tool, _ = q2_header_file
    r = run_cli("inspect", str(path), "--json", "--ctx", "16384")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["bytes_per_token"]["total"] == Q2_BPT_16K
    assert data["tensor_bytes"] == Q2_TENSOR_BYTES and data["valid"] is True
    assert data["metadata"]["deepseek4.expert_used_count"] == 6
    assert data["metadata"]["tokenizer.ggml.tokens"] == {"array": "STRING", "len": 129280}
    r = run_cli("inspect", str(path), "--ctx", "0")
    assert r.returncode == 0, r.stderr
    assert "blk.*.attn_q_a.weight" in r.stdout and "matches the DS4 main layout" in r.stdout
    assert "9,195,786,660" in r.stdout  # 0-context total: Q2_BPT_16K - KV - idle indexer queries


# ---- small GGUF written by the gguf package ------------------------------------------------------------------

def _write_small(path: Path) -> dict[str, np.ndarray]:
    w = gguf.GGUFWriter(str(path), "deepseek4")
    w.add_uint32("deepseek4.block_count", 2)
    w.add_uint32("deepseek4.expert_used_count", 2)
    w.add_float32("deepseek4.expert_weights_scale", 1.5)
    w.add_bool("deepseek4.expert_weights_norm", True)
    w.add_array("deepseek4.attention.compress_ratios", [0, 0])
    w.add_string("general.name", "tiny test file")
    rng = np.random.default_rng(0)
    arrays = {
        "token_embd.weight": rng.standard_normal((10, 8)).astype(np.float16),  # dims [8, 10]
        "blk.0.attn_norm.weight": np.ones(8, np.float32),
        "blk.1.attn_norm.weight": np.ones(8, np.float32),
        "blk.0.ffn_gate_exps.weight": rng.standard_normal((4, 3, 8)).astype(np.float32),  # 4 experts
        "output.weight": rng.standard_normal((10, 8)).astype(np.float32),
    }
    for name, a in arrays.items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return arrays


def test_small_gguf_from_the_gguf_writer(tmp_path):
    path = tmp_path / "small.gguf"
    arrays = _write_small(path)
    info = gi.read_info(path)
    assert info.version == 3 and info.kind == "main"
    assert info.metadata["general.name"] == "tiny test file"
    assert info.metadata["deepseek4.attention.compress_ratios"] == [0, 0]
    assert info.metadata["deepseek4.expert_weights_norm"] is True
    by_name = {t.name: t for t in info.tensors}
    assert set(by_name) == set(arrays)
    assert by_name["token_embd.weight"].dims == (8, 10) and by_name["token_embd.weight"].type_name == "F16"
    assert by_name["blk.0.ffn_gate_exps.weight"].dims == (8, 3, 4)
    assert info.tensor_bytes == sum(a.nbytes for a in arrays.values())
    # the offsets point at the tensors' bytes
    raw = path.read_bytes()
    t = by_name["blk.0.ffn_gate_exps.weight"]
    start = info.data_offset + t.offset
    assert raw[start:start + t.nbytes] == arrays["blk.0.ffn_gate_exps.weight"].tobytes()
    mism = {m.name: m for m in info.mismatches}
    assert mism["deepseek4.block_count"].expected == "43" and mism["deepseek4.block_count"].found == "2"
    assert mism["deepseek4.embedding_length"].found == "missing"
    assert mism["token_embd.weight"].found == "dims [8,10]"
    assert mism["blk.0.attn_q_a.weight"].found == "missing"
    assert mism["deepseek4.attention.compress_ratios"].found == "[0, 0]"
    # bytes per token on this table: one embedding row (8 f16), two expert slices of 3x8 f32, norms, head
    b = info.bytes_per_token(5)
    assert b.head == 8 * 2 + 10 * 8 * 4
    assert b.routed == 2 * 3 * 8 * 4
    assert b.layers == 2 * 8 * 4


def test_not_a_ds4_file(tmp_path):
    path = tmp_path / "other.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("weird", np.zeros(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    info = gi.read_info(path)
    assert info.kind == "other" and not info.valid


@pytest.mark.parametrize("cut", ["empty", "magic", "header", "tensor_infos", "data"])
def test_truncated_or_corrupt_file_is_one_line_error(tmp_path, cut):
    good = tmp_path / "good.gguf"
    _write_small(good)
    raw = good.read_bytes()
    info = gi.read_info(good)
    bad = tmp_path / f"bad-{cut}.gguf"
    if cut == "empty":
        data = b""
    elif cut == "magic":
        data = b"GGML" + raw[4:]
    elif cut == "header":
        data = raw[:40]
    elif cut == "tensor_infos":
        data = raw[:info.data_offset - 20]
    else:
        data = raw[:len(raw) - 7]
    bad.write_bytes(data)
    with pytest.raises(UserError):
        gi.read_info(bad)
    r = run_cli("inspect", str(bad))
    assert r.returncode == 1
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines[0].startswith("error:") and str(bad.name) in lines[0]
    assert len(lines) == 2 and lines[1].startswith("fix:")


def test_random_corruption_never_escapes_as_a_crash(tmp_path):
    good = tmp_path / "good.gguf"
    _write_small(good)
    raw = bytearray(good.read_bytes())
    info = gi.read_info(good)
    rng = np.random.default_rng(7)
    for i in range(60):
        data = bytearray(raw)
        for pos in rng.integers(0, info.data_offset, size=3):
            data[pos] ^= int(rng.integers(1, 256))
        p = tmp_path / f"flip{i}.gguf"
        p.write_bytes(bytes(data))
        try:
            gi.read_info(p)
        except UserError:
            pass  # a clean error is fine; anything else fails the test


def test_missing_file_and_bad_ctx(tmp_path):
    r = run_cli("inspect", str(tmp_path / "nope.gguf"))
    assert r.returncode == 1 and "no such file" in r.stderr
    r = run_cli("inspect", str(tmp_path / "nope.gguf"), "--ctx", "-1")
    assert r.returncode == 2


# ---- the MTP draft file (facts §C) ---------------------------------------------------------------------------

def _mtp_table(tool):
    """§C's table, typed out here: plain tensors as F16, experts Q4_K (the file name says Q4K)."""
    F32, F16, Q8, Q4K = tool.F32, tool.F16, tool.Q8_0, 12
    p = "mtp.0."
    t = [("hc_head_fn.weight", (16384, 4), F16), ("hc_head_base.weight", (4,), F32),
         ("hc_head_scale.weight", (1,), F32), ("e_proj.weight", (4096, 4096), Q8),
         ("h_proj.weight", (4096, 4096), Q8), ("enorm.weight", (4096,), F32), ("hnorm.weight", (4096,), F32),
         ("norm.weight", (4096,), F32), ("hc_attn_fn.weight", (16384, 24), F16),
         ("hc_ffn_fn.weight", (16384, 24), F16), ("hc_attn_scale.weight", (3,), F32),
         ("hc_ffn_scale.weight", (3,), F32), ("hc_attn_base.weight", (24,), F32),
         ("hc_ffn_base.weight", (24,), F32), ("attn_norm.weight", (4096,), F32),
         ("attn_q_a.weight", (4096, 1024), Q8), ("attn_q_a_norm.weight", (1024,), F32),
         ("attn_q_b.weight", (1024, 32768), Q8), ("attn_kv.weight", (4096, 512), Q8),
         ("attn_kv_a_norm.weight", (512,), F32), ("attn_sinks.weight", (64,), F32),
         ("attn_output_a.weight", (4096, 8192), Q8), ("attn_output_b.weight", (8192, 4096), Q8),
         ("ffn_norm.weight", (4096,), F32), ("ffn_gate_inp.weight", (4096, 256), F16),
         ("exp_probs_b.bias", (256,), F32), ("ffn_gate_exps.weight", (4096, 2048, 256), Q4K),
         ("ffn_up_exps.weight", (4096, 2048, 256), Q4K), ("ffn_down_exps.weight", (2048, 4096, 256), Q4K),
         ("ffn_gate_shexp.weight", (4096, 2048), Q8), ("ffn_up_shexp.weight", (4096, 2048), Q8),
         ("ffn_down_shexp.weight", (2048, 4096), Q8)]
    return [(p + n, dims, typ, "const", {}) for n, dims, typ in t]


def test_mtp_layout(tmp_path):
    tool = _synthetic_tool()
    tool.BLOCK[12] = (256, 144)  # Q4_K, which the Q2 generator never writes
    table = _mtp_table(tool)
    hdr, _pos, _layout, total = tool.build_header(table, ["a"], [])
    path = tmp_path / "mtp.gguf"
    with open(path, "wb") as fh:
        fh.truncate(total)
        fh.write(hdr)
    info = gi.read_info(path)
    assert info.kind == "mtp" and info.mismatches == []
    assert info.tensor_bytes == 3_803_799_020  # facts §C: the sum of these tensors
    # a Q2-typed expert set is also accepted by ds4's MTP binder; a wrong shape is not
    table2 = [(n, (2048, 4096) if n.endswith("e_proj.weight") else d, tool.Q2_K if "down_exps" in n else t, k, kw)
              for n, d, t, k, kw in table if not n.endswith("enorm.weight")]
    hdr, _pos, _layout, total = tool.build_header(table2, ["a"], [])
    bad = tmp_path / "mtp-bad.gguf"
    with open(bad, "wb") as fh:
        fh.truncate(total)
        fh.write(hdr)
    found = {(m.name, m.expected, m.found) for m in gi.read_info(bad).mismatches}
    assert found == {("mtp.0.e_proj.weight", "dims [4096,4096]", "dims [2048,4096]"),
                     ("mtp.0.enorm.weight", "F32 [4096]", "missing")}
