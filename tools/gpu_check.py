#!/usr/bin/env python3
"""GPU kernel check: CUDA quant kernels vs the CPU kernels vs the gguf package's reference, through the C ABI.

Runs with only python3 + numpy (the gguf package is used when importable; without it the GPU is compared with the
CPU kernels, which CI proves bit-identical to gguf). Also the home of the random valid block generator shared with
tests/test_quant_cpu.py and tests/test_quant_cuda.py.

    python3 tools/gpu_check.py --lib build/libds4engine.so
"""

from __future__ import annotations

import argparse
import ctypes
import sys

import numpy as np

# GGML type ids and (values per block, bytes per block) of the kernel types (gguf constants; checked against the
# gguf package in tests/test_quant_cpu.py).
TYPES = {"F32": 0, "F16": 1, "BF16": 30, "Q8_0": 8, "Q2_K": 10, "Q4_K": 12, "IQ2_XXS": 16}
QUANT_SIZES = {0: (1, 4), 1: (1, 2), 30: (1, 2), 8: (32, 34), 10: (256, 84), 12: (256, 144), 16: (256, 66)}
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
    bs, ts = QUANT_SIZES[qt]
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
    """gguf-py's dequantization as float32 [n_rows, n_cols] (needs the gguf package)."""
    import gguf

    out = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(TYPES[type_name]))
    return np.asarray(out, dtype=np.float32).reshape(raw.shape[0], n_cols)


# ---- engine access (plain ctypes: this script must not need the spark_setup package's dependencies) ------------

P_float = ctypes.POINTER(ctypes.c_float)
BACKEND_CPU, BACKEND_CUDA = 0, 1
SHAPES = {"F32": 96, "F16": 96, "BF16": 96, "Q8_0": 256, "Q2_K": 512, "Q4_K": 512, "IQ2_XXS": 512}


def bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    lib.ds4_last_error.restype = ctypes.c_char_p
    lib.ds4_dequantize_backend.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                           ctypes.c_int64, ctypes.c_int64, P_float]
    lib.ds4_matvec.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, P_float,
                               P_float]
    P_int = ctypes.POINTER(ctypes.c_int32)
    lib.ds4_matmul.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                               ctypes.c_int64, P_float, ctypes.c_int64, P_int, P_int, ctypes.c_int64, P_float]
    return lib


def _ok(lib, rc):
    if rc != 0:
        raise RuntimeError(f"engine error {rc}: {lib.ds4_last_error().decode(errors='replace')}")


def dequant(lib, backend, type_name, raw, n_cols):
    raw = np.ascontiguousarray(raw)
    out = np.full((raw.shape[0], n_cols), np.nan, dtype=np.float32)
    _ok(lib, lib.ds4_dequantize_backend(backend, TYPES[type_name], raw.ctypes.data, raw.shape[0], n_cols, 0,
                                        raw.shape[0], out.ctypes.data_as(P_float)))
    return out


def matvec(lib, backend, type_name, raw, n_cols, x):
    raw = np.ascontiguousarray(raw)
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.full(raw.shape[0], np.nan, dtype=np.float32)
    _ok(lib, lib.ds4_matvec(backend, TYPES[type_name], raw.ctypes.data, raw.shape[0], n_cols,
                            x.ctypes.data_as(P_float), y.ctypes.data_as(P_float)))
    return y


def matmul(lib, backend, type_name, raw, n_experts, n_cols, X, x_idx=None, off=None, n_tok=None):
    """ds4_matmul: raw holds n_experts matrices of raw.shape[0] // n_experts rows; returns Y [n_tok x rows]."""
    raw = np.ascontiguousarray(raw)
    X = np.ascontiguousarray(X, dtype=np.float32)
    rows = raw.shape[0] // n_experts
    n_tok = n_tok if n_tok is not None else X.shape[0]
    Y = np.full((n_tok, rows), np.nan, dtype=np.float32)
    P_int = ctypes.POINTER(ctypes.c_int32)
    xi = None if x_idx is None else np.ascontiguousarray(x_idx, dtype=np.int32)
    of = None if off is None else np.ascontiguousarray(off, dtype=np.int32)
    _ok(lib, lib.ds4_matmul(backend, TYPES[type_name], raw.ctypes.data, n_experts, rows, n_cols,
                            X.ctypes.data_as(P_float), X.shape[0], None if xi is None else xi.ctypes.data_as(P_int),
                            None if of is None else of.ctypes.data_as(P_int), n_tok, Y.ctypes.data_as(P_float)))
    return Y


# The batched (prefill) product on the tensor cores: types and column counts it takes (whole 256-column groups,
# 16-byte rows), several chunks each
MM_COLS = {"Q8_0": 1024, "Q2_K": 2048, "IQ2_XXS": 4096}


def check_matmul(lib, type_name: str) -> list[str]:
    """CUDA batched product (cuda_mm6) vs float64 and the CPU engine: dense (row count not a multiple of the CTA's
    128 rows, a token count that leaves an odd last tile) and expert mode (3 experts, one of them unused, slots
    reading X rows out of order)."""
    problems = []
    cols = MM_COLS[type_name]
    rng = np.random.default_rng(5)
    cases = []
    w = random_matrix(type_name, 300, cols, seed=21, bounded=True)
    cases.append(("dense 300 rows x 37 tokens", w, 1, rng.standard_normal((37, cols)), None, None, 37))
    w3 = random_matrix(type_name, 3 * 384, cols, seed=22, bounded=True)
    X = rng.standard_normal((11, cols)) * rng.uniform(0.01, 100, size=(11, 1))
    cases.append(("3 experts x 384 rows, 29 slots", w3, 3, X, rng.integers(0, 11, size=29), [0, 13, 13, 29], 29))
    for name, raw, ne, X, x_idx, off, n_tok in cases:
        X = X.astype(np.float32)
        rows = raw.shape[0] // ne
        wd = dequant(lib, BACKEND_CPU, type_name, raw, cols).astype(np.float64)
        ref = np.empty((n_tok, rows))
        scale = np.empty((n_tok, rows))
        e = 0
        for j in range(n_tok):
            while off is not None and j >= off[e + 1]:
                e += 1
            x = X[x_idx[j] if x_idx is not None else j].astype(np.float64)
            ref[j] = wd[e * rows:(e + 1) * rows] @ x
            scale[j] = np.abs(wd[e * rows:(e + 1) * rows]) @ np.abs(x)
        for backend, bname in ((BACKEND_CUDA, "CUDA"), (BACKEND_CPU, "CPU")):
            Y = matmul(lib, backend, type_name, raw, ne, cols, X, x_idx, off, n_tok)
            err = float(np.max(np.abs(Y - ref) / np.maximum(scale, 1e-300)))
            if not (np.isfinite(Y).all() and err <= 1e-5):
                problems.append(f"{type_name} {name}: {bname} batched product error {err:.3g} > 1e-5")
    return problems


def matvec_error(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    """max |y - y64| / (|W| @ |x|): error relative to the magnitude of the products being summed."""
    w64, x64 = w.astype(np.float64), x.astype(np.float64)
    scale = np.abs(w64) @ np.abs(x64)
    return float(np.max(np.abs(y.astype(np.float64) - w64 @ x64) / np.maximum(scale, 1e-300)))


def check_type(lib, type_name: str, have_gguf: bool) -> list[str]:
    """Problems found for one type (empty list = pass)."""
    problems = []
    n_cols = SHAPES[type_name]
    raw = random_matrix(type_name, 24, n_cols, seed=7)
    cpu = dequant(lib, BACKEND_CPU, type_name, raw, n_cols)
    gpu = dequant(lib, BACKEND_CUDA, type_name, raw, n_cols)
    if not np.array_equal(cpu.view(np.uint32), gpu.view(np.uint32)):
        problems.append(f"{type_name}: CUDA dequantize differs from CPU in {int((cpu.view(np.uint32) != gpu.view(np.uint32)).sum())} values")
    if have_gguf:
        ref = reference_dequant(type_name, raw, n_cols)
        if not np.array_equal(ref.view(np.uint32), gpu.view(np.uint32)):
            problems.append(f"{type_name}: CUDA dequantize differs from gguf")
    # matvec: aligned shapes (the fast path) and an odd row count
    # (67, 4x) and (300, 16x): the aligned fast path, several tiles, odd row counts; (7, 3 blocks): rows that are
    # not a multiple of 16 bytes (byte-load path) and partial tiles. Q8_0 also at attn_q_b's shape: the small ones
    # never reach matvec v9, which takes only matrices with at least two 4-warp CTAs' worth of rows per SM.
    shapes = [(67, n_cols * 4), (300, n_cols * 16), (7, QUANT_SIZES[TYPES[type_name]][0] * 3)]
    if type_name == "Q8_0":
        shapes.append((32768, 1024))
    for rows, cols in shapes:
        w_raw = random_matrix(type_name, rows, cols, seed=11 + rows, bounded=True)
        x = np.random.default_rng(rows).standard_normal(cols).astype(np.float32)
        w = dequant(lib, BACKEND_CPU, type_name, w_raw, cols)
        y_gpu = matvec(lib, BACKEND_CUDA, type_name, w_raw, cols, x)
        y_cpu = matvec(lib, BACKEND_CPU, type_name, w_raw, cols, x)
        for name, y in (("CUDA", y_gpu), ("CPU", y_cpu)):
            err = matvec_error(w, x, y)
            if not (np.isfinite(y).all() and err <= 1e-5):
                problems.append(f"{type_name} {rows}x{cols}: {name} matvec error {err:.3g} > 1e-5")
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lib", required=True, help="path of a CUDA-enabled libds4engine.so")
    args = ap.parse_args(argv)
    lib = bind(ctypes.CDLL(args.lib))
    if not lib.ds4_has_cuda():
        print(f"{args.lib} was built without CUDA", file=sys.stderr)
        return 2
    try:
        import gguf  # noqa: F401

        have_gguf = True
    except Exception:
        have_gguf = False
        print("note: the gguf package is not importable here: comparing CUDA with the CPU kernels only")
    failed = 0
    for t in TYPES:
        try:
            problems = check_type(lib, t, have_gguf)
            if t in MM_COLS:
                problems += check_matmul(lib, t)
        except RuntimeError as exc:  # an engine error (e.g. no CUDA device) fails the type, not the script
            problems = [str(exc)]
        print(f"{'PASS' if not problems else 'FAIL'} {t}" + ("" if not problems else ": " + "; ".join(problems)))
        failed += bool(problems)
    print(f"{len(TYPES) - failed}/{len(TYPES)} types pass (dequantize: CUDA == CPU{' == gguf' if have_gguf else ''} "
          "bit for bit; matvec within 1e-5 of float64)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
