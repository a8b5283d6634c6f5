"""CPU quant kernels (csrc/cpu/quant.cpp) against the `gguf` package's dequantizers and a float64 reference.

Also the random *valid* block generator shared with the GPU tests (tests/test_quant_cuda.py, tools/gpu_check.sh).

Valid = every f16 scale is finite (NaN/inf scales are not something a quantizer writes). Extreme scales (largest
f16, smallest subnormal, zero, negative zero, negative values) are mixed in; IQ2_XXS blocks cover every grid index,
every sign pattern and every 4-bit scale.
"""

from __future__ import annotations

import numpy as np

import gguf
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T

TYPES = {"F32": T.F32, "F16": T.F16, "BF16": T.BF16, "Q8_0": T.Q8_0, "Q2_K": T.Q2_K, "Q4_K": T.Q4_K,
         "IQ2_XXS": T.IQ2_XXS}
EXTREME_F16 = np.array([65504.0, -65504.0, 6e-8, -6e-8, 0.0, -0.0, 6.1e-5, 1.0, -1.0, 1e-3], dtype=np.float16)


def _scales(rng: np.random.Generator, n: int) -> np.ndarray:
    """n finite f16 scales as raw uint16: mostly ordinary magnitudes, some extremes."""
    s = (rng.standard_normal(n) * np.exp(rng.uniform(-8, 3, n))).astype(np.float16)
    pick = rng.random(n) < 0.2
    s[pick] = rng.choice(EXTREME_F16, size=int(pick.sum()))
    s[:len(EXTREME_F16)][: n] = EXTREME_F16[: n]
    assert np.isfinite(s).all()
    return s.view(np.uint16)


def _finite_halfwords(rng: np.random.Generator, n: int, bf16: bool) -> np.ndarray:
    v = rng.integers(0, 1 << 16, size=n, dtype=np.uint32).astype(np.uint16)
    exp_mask = 0x7F80 if bf16 else 0x7C00
    bad = (v & exp_mask) == exp_mask
    v[bad] &= ~np.uint16(0x4000)  # clear one exponent bit: finite
    return v


def random_matrix(type_name: str, n_rows: int, n_cols: int, seed: int = 0, bounded: bool = False) -> np.ndarray:
    """Raw bytes (uint8 [n_rows, row_bytes]) of a random valid matrix of the given type.

    bounded=True keeps F32/BF16 magnitudes moderate so that a matvec cannot overflow (the quant types' values are
    bounded by their format)."""
    rng = np.random.default_rng(seed)
    qt = TYPES[type_name]
    bs, ts = GGML_QUANT_SIZES[qt]
    assert n_cols % bs == 0
    nb = n_rows * n_cols // bs
    if bounded and type_name in ("F32", "BF16"):
        v = (rng.standard_normal(n_rows * n_cols) * np.exp(rng.uniform(-6, 6, n_rows * n_cols))).astype(np.float32)
        if type_name == "BF16":
            return (v.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(n_rows, -1)
        return v.view(np.uint8).reshape(n_rows, -1)
    if type_name == "F32":
        v = (rng.standard_normal(n_rows * n_cols) * np.exp(rng.uniform(-20, 20, n_rows * n_cols))).astype(np.float32)
        v[:4] = [3.4e38, -3.4e38, 1e-45, -0.0]
        return v.view(np.uint8).reshape(n_rows, -1)
    if type_name in ("F16", "BF16"):
        return _finite_halfwords(rng, n_rows * n_cols, type_name == "BF16").view(np.uint8).reshape(n_rows, -1)
    blocks = rng.integers(0, 256, size=(nb, ts), dtype=np.uint8)
    if type_name == "Q8_0":
        blocks[:, 0:2] = _scales(rng, nb).view(np.uint8).reshape(nb, 2)
        blocks[0, 2:34] = np.array([-128, 127] * 16, dtype=np.int8).view(np.uint8)
    elif type_name == "Q2_K":
        blocks[:, 80:82] = _scales(rng, nb).view(np.uint8).reshape(nb, 2)
        blocks[:, 82:84] = _scales(rng, nb).view(np.uint8).reshape(nb, 2)
    elif type_name == "Q4_K":
        blocks[:, 0:2] = _scales(rng, nb).view(np.uint8).reshape(nb, 2)
        blocks[:, 2:4] = _scales(rng, nb).view(np.uint8).reshape(nb, 2)
    elif type_name == "IQ2_XXS":
        blocks[:, 0:2] = _scales(rng, nb).view(np.uint8).reshape(nb, 2)
        groups = blocks[:, 2:].reshape(nb * 8, 8)
        n_groups = nb * 8
        # grid indices 0..255 in order (4 per group), then random
        idx = np.concatenate([np.arange(256), rng.integers(0, 256, size=max(0, 4 * n_groups - 256))])[: 4 * n_groups]
        groups[:, 0:4] = idx.reshape(n_groups, 4).astype(np.uint8)
        # sign indices 0..127 in order (4 per group), scales 0..15 cycling
        sidx = np.concatenate([np.arange(128), rng.integers(0, 128, size=max(0, 4 * n_groups - 128))])[: 4 * n_groups]
        sidx = sidx.reshape(n_groups, 4).astype(np.uint32)
        word = sidx[:, 0] | (sidx[:, 1] << 7) | (sidx[:, 2] << 14) | (sidx[:, 3] << 21)
        word |= (np.arange(n_groups, dtype=np.uint32) % 16) << 28
        groups[:, 4:8] = word.astype("<u4").view(np.uint8).reshape(n_groups, 4)
        blocks[:, 2:] = groups.reshape(nb, 64)
    return blocks.reshape(n_rows, -1)


def reference_dequant(type_name: str, raw: np.ndarray, n_cols: int) -> np.ndarray:
    """gguf-py's dequantization as float32 [n_rows, n_cols]."""
    out = gguf.quants.dequantize(raw, TYPES[type_name])
    return np.asarray(out, dtype=np.float32).reshape(raw.shape[0], n_cols)


# ---- tests --------------------------------------------------------------------------------------------------------

import ctypes  # noqa: E402

import pytest  # noqa: E402

from spark_setup.engine import _lib  # noqa: E402

P_float = ctypes.POINTER(ctypes.c_float)
SHAPES = {"F32": 96, "F16": 96, "BF16": 96, "Q8_0": 256, "Q2_K": 512, "Q4_K": 512, "IQ2_XXS": 512}


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


def matvec_error(raw_f32: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    """max |y - y64| / (|W| @ |x|): error relative to the magnitude of the products being summed."""
    w64 = raw_f32.astype(np.float64)
    x64 = x.astype(np.float64)
    ref = w64 @ x64
    scale = np.abs(w64) @ np.abs(x64)
    return float(np.max(np.abs(y.astype(np.float64) - ref) / np.maximum(scale, 1e-300)))


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


def test_cuda_backend_missing_is_a_clean_error(lib):
    if lib.ds4_has_cuda():
        pytest.skip("this engine has CUDA")
    raw = random_matrix("Q8_0", 2, 32)
    x = np.zeros(32, np.float32)
    with pytest.raises(_lib.EngineError, match="built without CUDA") as ei:
        engine_matvec(lib, "Q8_0", raw, 32, x, backend=_lib.BACKEND_CUDA)
    assert ei.value.code == _lib.DS4_E_BACKEND
