"""CPU quant kernels (csrc/cpu/quant.cpp) against the `gguf` package's dequantizers and a float64 reference.

The random valid block generator lives in tools/gpu_check.py (it also runs on the GPU machine without pytest).
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import numpy as np
import pytest

import gguf
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T
from spark_setup.engine import _lib

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from gpu_check import QUANT_SIZES, SHAPES, TYPES, matvec_error, random_matrix, reference_dequant  # noqa: E402

P_float = ctypes.POINTER(ctypes.c_float)


def test_local_type_table_matches_gguf():
    for name, tid in TYPES.items():
        assert T[name] == tid
        assert tuple(GGML_QUANT_SIZES[T(tid)]) == QUANT_SIZES[tid]


def test_iq2xxs_grid_header_matches_gguf():
    from gguf.quants import IQ2_XXS

    IQ2_XXS.init_grid()
    grid = IQ2_XXS.grid.reshape(256, 8).astype(np.uint8)
    text = (Path(_lib.__file__).parent / "csrc" / "iq2xxs_grid.h").read_text()
    import re

    vals = [int(v, 16) for v in re.findall(r"0x([0-9a-f]{16})ull", text)]
    assert vals == [int.from_bytes(bytes(r), "little") for r in grid]
    ks = IQ2_XXS.ksigns
    assert all(ks[i] == (i | ((bin(i).count("1") & 1) << 7)) for i in range(128))  # the parity rule in the header

@pytest.fixture(scope="module")
def lib(engine_lib):
    return _lib.load(engine_lib)


def _f32p(a: np.ndarray):
    return a.ctypes.data_as(P_float)


def engine_dequant(lib, type_name, raw, n_cols, r0=0, r1=None):
    n_rows = raw.shape[0]
    r1 = n_rows if r1 is None else r1
    out = np.full((r1 - r0, n_cols), np.nan, dtype=np.float32)
    raw = np.ascontiguousarray(raw)
    _lib.check(lib, lib.ds4_dequantize(int(TYPES[type_name]), raw.ctypes.data, n_rows, n_cols, r0, r1, _f32p(out)))
    return out


def engine_matvec(lib, type_name, raw, n_cols, x, backend=_lib.BACKEND_CPU):
    raw = np.ascontiguousarray(raw)
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.full(raw.shape[0], np.nan, dtype=np.float32)
    _lib.check(lib, lib.ds4_matvec(backend, int(TYPES[type_name]), raw.ctypes.data, raw.shape[0], n_cols, _f32p(x),
                                   _f32p(y)))
    return y


@pytest.mark.parametrize("type_name", list(TYPES))
def test_dequantize_is_bit_identical_to_gguf(lib, type_name):
    n_cols = SHAPES[type_name]
    n_rows = 40 if type_name != "IQ2_XXS" else 24  # IQ2_XXS: 24*2 blocks*8 groups*4 >= 256 grid indices
    raw = random_matrix(type_name, n_rows, n_cols, seed=7)
    ref = reference_dequant(type_name, raw, n_cols)
    got = engine_dequant(lib, type_name, raw, n_cols)
    assert got.shape == ref.shape
    mism = np.nonzero(got.view(np.uint32) != ref.view(np.uint32))
    assert mism[0].size == 0, f"{mism[0].size} values differ, first at {mism[0][0]},{mism[1][0]}: " \
                              f"{got[mism][0]!r} vs {ref[mism][0]!r}"
    # a row range dequantizes exactly those rows
    part = engine_dequant(lib, type_name, raw, n_cols, 5, 11)
    assert np.array_equal(part.view(np.uint32), ref[5:11].view(np.uint32))


def test_iq2_xxs_blocks_cover_every_grid_index_sign_pattern_and_scale():
    raw = random_matrix("IQ2_XXS", 24, 512, seed=7)
    groups = raw.reshape(-1, 66)[:, 2:].reshape(-1, 8)
    assert set(groups[:, 0:4].ravel().tolist()) == set(range(256))
    words = groups[:, 4:8].copy().view("<u4").ravel()
    signs = {int(w >> s) & 127 for w in words for s in (0, 7, 14, 21)}
    assert signs == set(range(128))
    assert {int(w >> 28) for w in words} == set(range(16))


@pytest.mark.parametrize("type_name", list(TYPES))
def test_matvec_matches_float64_reference(lib, type_name):
    n_cols = SHAPES[type_name] * 4
    raw = random_matrix(type_name, 67, n_cols, seed=11, bounded=True)
    x = np.random.default_rng(3).standard_normal(n_cols).astype(np.float32)
    y = engine_matvec(lib, type_name, raw, n_cols, x)
    w = reference_dequant(type_name, raw, n_cols)
    assert np.isfinite(y).all()
    assert matvec_error(w, x, y) <= 1e-5


def test_matvec_is_deterministic_and_independent_of_threading(lib):
    # 2048 x 4096 Q8_0 (8.9 MB) runs multi-threaded; 16-row slices run single-threaded: results must be identical.
    n_rows, n_cols = 2048, 4096
    raw = random_matrix("Q8_0", n_rows, n_cols, seed=5)
    x = np.random.default_rng(9).standard_normal(n_cols).astype(np.float32)
    y1 = engine_matvec(lib, "Q8_0", raw, n_cols, x)
    y2 = engine_matvec(lib, "Q8_0", raw, n_cols, x)
    assert np.array_equal(y1.view(np.uint32), y2.view(np.uint32))
    parts = np.concatenate([engine_matvec(lib, "Q8_0", raw[r: r + 16], n_cols, x) for r in range(0, n_rows, 256)])
    assert np.array_equal(parts.view(np.uint32), y1[np.concatenate([np.arange(r, r + 16) for r in range(0, n_rows, 256)])].view(np.uint32))


def test_row_bytes(lib):
    assert lib.ds4_row_bytes(int(T.Q8_0), 4096) == 4352
    assert lib.ds4_row_bytes(int(T.IQ2_XXS), 4096) == 1056
    assert lib.ds4_row_bytes(int(T.Q2_K), 2048) == 672
    assert lib.ds4_row_bytes(int(T.Q4_K), 4096) == 2304
    assert lib.ds4_row_bytes(int(T.Q8_0), 100) == 0  # not a multiple of 32
    assert lib.ds4_row_bytes(999, 256) == 0


@pytest.mark.parametrize("args,code,needle", [
    ((int(T.Q4_0), 32), _lib.DS4_E_ARG, "do not support type 2 (Q4_0)"),
    ((int(T.Q2_K), 128), _lib.DS4_E_ARG, "not a positive multiple of the Q2_K block size 256"),
    ((12345, 32), _lib.DS4_E_ARG, "type 12345"),
])
def test_kernel_errors_have_messages(lib, args, code, needle):
    type_id, n_cols = args
    buf = np.zeros(4096, dtype=np.uint8)
    x = np.zeros(n_cols, dtype=np.float32)
    y = np.zeros(2, dtype=np.float32)
    assert lib.ds4_matvec(0, type_id, buf.ctypes.data, 2, n_cols, _f32p(x), _f32p(y)) == code
    assert needle in _lib.last_error(lib)
    assert lib.ds4_dequantize(type_id, buf.ctypes.data, 2, n_cols, 0, 2, _f32p(np.zeros(2 * n_cols, np.float32))) == code
    assert lib.ds4_dequantize(int(T.Q8_0), buf.ctypes.data, 2, 32, 1, 3, _f32p(np.zeros(64, np.float32))) == _lib.DS4_E_ARG
    assert "row range" in _lib.last_error(lib)


def engine_matmul(lib, type_name, raw, n_experts, n_cols, X, x_idx, off, n_tok, backend=_lib.BACKEND_CPU):
    raw, X = np.ascontiguousarray(raw), np.ascontiguousarray(X, dtype=np.float32)
    Y = np.full((n_tok, raw.shape[0] // n_experts), np.nan, dtype=np.float32)
    xi = None if x_idx is None else np.ascontiguousarray(x_idx, dtype=np.int32)
    of = None if off is None else np.ascontiguousarray(off, dtype=np.int32)
    P_i = _lib.P_int32
    _lib.check(lib, lib.ds4_matmul(backend, int(TYPES[type_name]), raw.ctypes.data, n_experts, Y.shape[1], n_cols,
                                   _f32p(X), X.shape[0], None if xi is None else xi.ctypes.data_as(P_i),
                                   None if of is None else of.ctypes.data_as(P_i), n_tok, _f32p(Y)))
    return Y


def test_matmul_slots_use_their_expert_and_x_row(lib):
    """ds4_matmul (the batched product's test entry; CUDA runs cuda_mm6, tools/gpu_check.py): slot j of expert e
    equals the matvec of expert e's matrix with X row x_idx[j], bit for bit, and bad slot maps are clean errors."""
    rng = np.random.default_rng(3)
    raw = random_matrix("Q2_K", 3 * 8, 512, seed=4)
    X = rng.standard_normal((5, 512)).astype(np.float32)
    x_idx, off = [4, 0, 1, 2, 3, 3, 1], [0, 2, 2, 7]
    Y = engine_matmul(lib, "Q2_K", raw, 3, 512, X, x_idx, off, 7)
    experts = [0, 0, 2, 2, 2, 2, 2]
    for j in range(7):
        want = engine_matvec(lib, "Q2_K", raw[8 * experts[j]:8 * experts[j] + 8], 512, X[x_idx[j]])
        assert np.array_equal(Y[j].view(np.uint32), want.view(np.uint32)), j
    for xi, of, needle in (([4, 0, 1, 2, 3, 3, 5], off, "slot 6 reads no X row"), (x_idx, [0, 2, 2, 6], "off must run"),
                           (x_idx, [0, 3, 2, 7], "off decreases"), (x_idx, None, "several experts need off")):
        with pytest.raises(_lib.EngineError, match=needle):
            engine_matmul(lib, "Q2_K", raw, 3, 512, X, xi, of, 7)


def test_cuda_backend_missing_is_a_clean_error(lib):
    if lib.ds4_has_cuda():
        pytest.skip("this engine has CUDA")
    raw = random_matrix("Q8_0", 2, 32)
    x = np.zeros(32, np.float32)
    with pytest.raises(_lib.EngineError, match="built without CUDA") as ei:
        engine_matvec(lib, "Q8_0", raw, 32, x, backend=_lib.BACKEND_CUDA)
    assert ei.value.code == _lib.DS4_E_BACKEND
    with pytest.raises(_lib.EngineError, match="built without CUDA"):
        engine_matmul(lib, "Q8_0", raw, 1, 32, x[None], None, None, 1, backend=_lib.BACKEND_CUDA)


def test_internal_kernel_checks(engine_build):
    """csrc/tests/quant_check.cpp: cpu_matmul == cpu_matvec bit for bit (1/2/8 threads), fp16/bf16 rounding."""
    import subprocess

    exe = engine_build.build_dir / "quant_check"
    res = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stdout + res.stderr
