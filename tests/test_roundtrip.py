"""The official model's numeric round-trips (ds4-model-facts.md D/I): FP8 E4M3 on KV rows, Hadamard + FP4 E2M1 on
the indexer, F16 storage. The engine's functions (exported test entry `ds4_test_roundtrip`) are checked against
an independent numpy implementation over every representable value, every rounding midpoint and its
neighbours, clamping, subnormals and the scale edge cases; then end to end against transformers (which has no
round-trips): the logits stay close and greedy choices mostly agree."""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

KIND_E4M3, KIND_E2M1, KIND_F16, KIND_KV, KIND_INDEXER = range(5)


@pytest.fixture(scope="module")
def lib(engine_lib):
    from spark_setup.engine import _lib

    lib = _lib.load(engine_lib)
    fn = lib.ds4_test_roundtrip
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int, _lib.P_float, ctypes.c_int64, ctypes.c_int64, _lib.P_float]
    return lib


def engine(lib, kind, x, aux=0):
    from spark_setup.engine import _lib

    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty_like(x)
    _lib.check(lib, lib.ds4_test_roundtrip(kind, x.ctypes.data_as(_lib.P_float), x.size, aux,
                                           out.ctypes.data_as(_lib.P_float)))
    return out


# ---- independent reference ----------------------------------------------------------------------------

def e4m3_table():
    """(values, codes) of the non-negative finite E4M3 (fn) codes, ascending."""
    vals, codes = [], []
    for code in range(128):
        e, m = code >> 3, code & 7
        if e == 15 and m == 7:
            continue  # NaN
        vals.append(m * 2.0 ** -9 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))
        codes.append(code)
    return np.array(vals), np.array(codes)


E2M1 = (np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]), np.arange(8))


def nearest(x, table):
    """Round to the nearest table value (|x| clamped to the max), ties to the even code; sign kept."""
    vals, codes = table
    a = np.minimum(np.abs(x.astype(np.float64)), vals[-1])
    hi = np.clip(np.searchsorted(vals, a), 1, len(vals) - 1)
    lo = hi - 1
    dlo, dhi = a - vals[lo], vals[hi] - a
    pick_hi = (dhi < dlo) | ((dhi == dlo) & (codes[hi] % 2 == 0))
    q = np.where(pick_hi, vals[hi], vals[lo])
    return (np.sign(x) * q).astype(np.float32) + np.float32(0.0)


def pow2_ceil(v):
    m, e = np.frexp(np.float64(v))
    return np.float32(2.0 ** (e - 1) if m == 0.5 else 2.0 ** e)


def ref_kv(x, n_nope):
    x = x.astype(np.float32).copy()
    for b0 in range(0, n_nope, 64):
        blk = x[b0:min(n_nope, b0 + 64)]
        amax = max(np.float32(np.abs(blk).max()), np.float32(1e-4))
        s = pow2_ceil(np.float32(amax) / np.float32(448))
        x[b0:b0 + len(blk)] = nearest(blk / s, e4m3_table()) * s
    with np.errstate(over="ignore"):
        return x.astype(np.float16).astype(np.float32)


def sylvester(n):
    h = np.array([[1.0]])
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def ref_indexer(x):
    n = x.size
    y = (sylvester(n) @ x.astype(np.float64)).astype(np.float32)   # exact for the integer-valued inputs used
    y = y * (np.float32(1) / np.sqrt(np.float32(n)))
    for b0 in range(0, n, 32):
        blk = y[b0:b0 + 32]
        amax = max(np.float32(np.abs(blk).max()), np.float32(7.052966e-38))
        s = pow2_ceil(np.float32(amax) / np.float32(6))
        y[b0:b0 + 32] = nearest(blk / s, E2M1) * s
    return y.astype(np.float16).astype(np.float32)


def edge_inputs(table, top):
    vals = table[0].astype(np.float32)
    mids = ((table[0][1:] + table[0][:-1]) / 2).astype(np.float32)
    assert np.array_equal(mids.astype(np.float64), (table[0][1:] + table[0][:-1]) / 2)  # exact midpoints
    up = np.nextafter(mids, np.float32(np.inf))
    down = np.nextafter(mids, np.float32(0))
    rng = np.random.default_rng(0)
    rnd = (rng.standard_normal(4000) * np.exp(rng.uniform(-12, 7, 4000))).astype(np.float32)
    big = np.array([top, top * 1.01, top * 2, 1e9, 3.4e38, np.float32(top) + 1], dtype=np.float32)
    tiny = np.array([0.0, 1e-30, 1e-10, 2.0 ** -10, 2.0 ** -9, 3 * 2.0 ** -10, 2.0 ** -11], dtype=np.float32)
    x = np.concatenate([vals, mids, up, down, rnd, big, tiny])
    return np.concatenate([x, -x])


def test_e4m3_every_value_midpoint_and_neighbour(lib):
    x = edge_inputs(e4m3_table(), 448.0)
    got, want = engine(lib, KIND_E4M3, x), nearest(x, e4m3_table())
    bad = np.nonzero(got != want)[0]
    assert len(bad) == 0, [(float(x[i]), float(got[i]), float(want[i])) for i in bad[:5]]
    # every representable value is a fixed point; midpoints go to the even code (spot-check the rule)
    assert engine(lib, KIND_E4M3, np.array([1.0625], np.float32))[0] == 1.0       # between 1 (even) and 1.125
    assert engine(lib, KIND_E4M3, np.array([1.1875], np.float32))[0] == 1.25      # between 1.125 and 1.25 (even)
    assert engine(lib, KIND_E4M3, np.array([1000.0], np.float32))[0] == 448.0


def test_e2m1_every_value_midpoint_and_neighbour(lib):
    x = edge_inputs(E2M1, 6.0)
    got, want = engine(lib, KIND_E2M1, x), nearest(x, E2M1)
    bad = np.nonzero(got != want)[0]
    assert len(bad) == 0, [(float(x[i]), float(got[i]), float(want[i])) for i in bad[:5]]
    assert list(engine(lib, KIND_E2M1, np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], np.float32))) == \
        [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]


def test_f16_rounding(lib):
    rng = np.random.default_rng(1)
    x = np.concatenate([(rng.standard_normal(5000) * np.exp(rng.uniform(-20, 12, 5000))),
                        [65504, 65520, 70000, 6e-8, 3e-8, 0.0]]).astype(np.float32)
    with np.errstate(over="ignore"):
        want = x.astype(np.float16).astype(np.float32)
    assert np.array_equal(engine(lib, KIND_F16, x), want)


@pytest.mark.parametrize("n,n_nope", [(512, 448), (64, 48), (128, 112), (64, 64)])
def test_kv_roundtrip_rows(lib, n, n_nope):
    rng = np.random.default_rng(n + n_nope)
    for trial in range(200):
        x = (rng.standard_normal(n) * np.exp(rng.uniform(-14, 10))).astype(np.float32)
        if trial % 7 == 0:
            x[: min(64, n_nope)] = 0.0                   # an all-zero block: the amax floor
        if trial % 11 == 0:
            x[3] = 448.0 * 2.0 ** rng.integers(-5, 5)   # amax exactly a power-of-two multiple of 448
        got, want = engine(lib, KIND_KV, x, n_nope), ref_kv(x, n_nope)
        assert np.array_equal(got, want), (trial, np.nonzero(got != want)[0][:5])
        # rope dims only F16-rounded
        assert np.array_equal(got[n_nope:], x[n_nope:].astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("n", [32, 64, 128])
def test_indexer_hadamard_fp4(lib, n):
    rng = np.random.default_rng(n)
    for trial in range(300):
        # integer-valued inputs times a power of two: the Hadamard sums are exact in any order
        x = (rng.integers(-40, 41, n) * 2.0 ** rng.integers(-20, 10)).astype(np.float32)
        if trial % 9 == 0:
            x[:] = 0.0
        if trial % 13 == 0:
            x[:] = 0.0
            x[trial % n] = 2.0 ** rng.integers(-4, 4)       # one spike: every output has the same magnitude
        got, want = engine(lib, KIND_INDEXER, x), ref_indexer(x)
        assert np.array_equal(got, want), (trial, np.nonzero(got != want)[0][:5])
    # the transform is orthonormal: no rounding on inputs whose image is exactly representable
    e0 = np.zeros(n, np.float32)
    e0[0] = 1.0
    out = engine(lib, KIND_INDEXER, e0)
    assert np.allclose(np.abs(out), out[0]) and out[0] > 0


# ---- end to end: round-trips ON vs transformers ---------------------------------------------------------

@pytest.mark.parametrize("name", ["s6", "m8", "k7"])
def test_roundtrip_on_stays_close_to_transformers(engine_lib, name, record_property):
    pytest.importorskip("torch")
    sys.path.insert(0, str(REPO / "tools"))
    import make_tiny_model as mt
    from spark_setup.engine import _lib, runtime

    lib = _lib.load(engine_lib)
    hf, path = mt.build_reference(name, seed=0)
    rng = np.random.default_rng({"s6": 3, "m8": 7, "k7": 1}[name])
    prompt = rng.integers(0, hf.config.vocab_size, size=72).tolist()
    with runtime.Model(path, lib=lib) as m, m.new_session(128) as s:   # default: round-trips ON
        rows = [s.eval(prompt, all_logits=True)]
        toks = list(prompt)
        for _ in range(16):
            toks.append(int(rows[-1][-1].argmax()))
            rows.append(s.eval([toks[-1]], all_logits=True))
    on = np.concatenate(rows)
    ref = mt.discrete_margins(hf, np.array(toks)[None])["logits"]
    err = np.abs(on - ref).max(-1) / np.abs(ref).max(-1)
    agree = float((on.argmax(-1) == ref.argmax(-1)).mean())
    greedy = float(np.mean([toks[72 + j] == ref[71 + j].argmax() for j in range(16)]))
    record_property("median_rel_err", float(np.median(err)))
    record_property("argmax_agreement", agree)
    print(f"{name} round-trips ON: rel err median {np.median(err):.3f} max {err.max():.3f}; "
          f"argmax agreement {agree:.2f} (all {len(toks)} positions), greedy steps {greedy:.2f}")
    assert np.isfinite(on).all()
    assert 1e-4 < np.median(err) < 0.2, "round-trips must perturb the logits a little, not a lot"
    assert agree >= 0.6
