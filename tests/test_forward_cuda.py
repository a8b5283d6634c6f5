"""CUDA forward pass vs the CPU engine (which matches transformers to ~2e-6) on the tiny DS4 models.

Needs a GPU and an engine built with CUDA: run through tools/gpu_model_check.sh, which builds it and sets
DS4_ENGINE_LIB. The tiny GGUFs come from $DS4_GPU_MODELS (default .cache/gpu-models/, written here by
`tools/gpu_model_files.py`), or are generated with tools/make_tiny_model.py when the gguf package is importable.
Only numpy + the engine are needed on the GPU machine.

Every test feeds the CPU engine's greedy tokens to both backends (teacher forcing), so the two see the same
sequence: a prefill longer than the raw window, past many compressed rows and past the indexer's top-k, then 16
greedy decode steps. The measured errors are printed (pytest -s) and written to $DS4_CUDA_REPORT when set.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
MODELS = ("s6", "m8", "k7")
# The prompts of tests/test_forward_parity.py: seeds whose sequences (72 prompt tokens + 16 greedy steps) have no
# router / indexer near-tie (margin >= 1e-3 in transformers), so f32 summation-order differences cannot flip a
# discrete choice; 72 tokens pass the raw window, several compressions and the indexer's top-k.
PROMPT_SEED = {"s6": 3, "m8": 7, "k7": 1}
PREFILL = 72
DECODE = 16

def _lib():
    from spark_setup.engine import _lib

    lib = _lib.load()
    if not _lib.has(lib, "ds4_has_cuda") or not lib.ds4_has_cuda():
        pytest.skip("the engine library was built without CUDA (set DS4_ENGINE_LIB to a CUDA build)")
    return lib


def tiny_model(name: str) -> Path:
    d = Path(os.environ.get("DS4_GPU_MODELS", REPO / ".cache" / "gpu-models"))
    p = d / f"{name}.gguf"
    if p.exists():
        return p
    try:
        sys.path.insert(0, str(REPO / "tools"))
        import make_tiny_model  # needs the gguf package
    except ImportError:
        pytest.fail(f"{p} is missing and the gguf package is not importable to generate it "
                    "(run tools/gpu_model_files.py where gguf is installed and carry .cache/gpu-models)")
    return make_tiny_model.ensure_gguf(name)


def _report(key: str, value) -> None:
    print(f"{key}: {value}")
    path = os.environ.get("DS4_CUDA_REPORT")
    if path:
        data = json.loads(Path(path).read_text()) if Path(path).exists() else {}
        data[key] = value
        Path(path).write_text(json.dumps(data, indent=1))


def _prompt(n_vocab: int, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n_vocab, size=n).astype(np.int32)  # as test_forward_parity


def _cpu_run(path: Path, prompt: np.ndarray, roundtrip: bool, lib):
    """CPU logits of every prefill position and of DECODE greedy steps, and the full token sequence."""
    from spark_setup.engine.runtime import Model

    with Model(path, backend="cpu", lib=lib) as m, m.new_session(len(prompt) + DECODE + 8, roundtrip) as s:
        rows = [s.eval(prompt, all_logits=True)]
        toks = list(prompt)
        for _ in range(DECODE):
            nxt = int(np.argmax(rows[-1][-1]))
            toks.append(nxt)
            rows.append(s.eval([nxt], all_logits=True))
    return np.concatenate(rows), np.array(toks, dtype=np.int32)


def _cuda_run(path: Path, toks: np.ndarray, n_prompt: int, roundtrip: bool, lib) -> np.ndarray:
    from spark_setup.engine.runtime import Model

    with Model(path, backend="cuda", lib=lib) as m, m.new_session(len(toks) + 8, roundtrip) as s:
        rows = [s.eval(toks[:n_prompt], all_logits=True)]
        for t in toks[n_prompt:]:  # the CPU run evaluated every token of toks, the last greedy one included
            rows.append(s.eval([int(t)], all_logits=True))
        assert s.pos == len(toks)
    return np.concatenate(rows)


def _rel_err(a: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Per position: max |a - ref| / max |ref|."""
    return np.abs(a - ref).max(axis=1) / np.maximum(np.abs(ref).max(axis=1), 1e-30)


@pytest.mark.gpu
@pytest.mark.parametrize("name", MODELS)
def test_cuda_matches_cpu_without_roundtrips(name):
    lib = _lib()
    path = tiny_model(name)
    prompt = _prompt(_n_vocab(path, lib), PREFILL, seed=PROMPT_SEED[name])
    ref, toks = _cpu_run(path, prompt, False, lib)
    got = _cuda_run(path, toks, PREFILL, False, lib)
    assert got.shape == ref.shape and np.isfinite(got).all()
    err = _rel_err(got, ref)
    agree = float((got.argmax(1) == ref.argmax(1)).mean())
    _report(f"{name} roundtrip=off max rel err", float(err.max()))
    bad = np.nonzero(err >= 1e-4)[0]
    _report(f"{name} roundtrip=off first position over 1e-4", int(bad[0]) if len(bad) else None)
    _report(f"{name} roundtrip=off rel err at positions 0..7", [float(e) for e in err[:8]])
    _report(f"{name} roundtrip=off argmax agreement", agree)
    assert err.max() < 1e-4, f"worst position {int(err.argmax())}: {err.max():.3g}"
    assert agree == 1.0


@pytest.mark.gpu
@pytest.mark.parametrize("name", MODELS)
def test_cuda_matches_cpu_with_roundtrips(name):
    """Official round-trips ON: FP8/FP4 rounding can flip one quantization step where the two backends' inputs
    differ by f32 rounding (a KV value moves by 1/16), so the bounds only catch a wrong round-trip (errors of order
    one); the measured errors are reported. The round-trips must change the logits."""
    lib = _lib()
    path = tiny_model(name)
    prompt = _prompt(_n_vocab(path, lib), PREFILL, seed=PROMPT_SEED[name])
    ref, toks = _cpu_run(path, prompt, True, lib)
    got = _cuda_run(path, toks, PREFILL, True, lib)
    assert np.isfinite(got).all()
    err = _rel_err(got, ref)
    _report(f"{name} roundtrip=on max rel err", float(err.max()))
    _report(f"{name} roundtrip=on median rel err", float(np.median(err)))
    _report(f"{name} roundtrip=on argmax agreement", float((got.argmax(1) == ref.argmax(1)).mean()))
    assert np.median(err) < 1e-2
    assert err.max() < 0.5
    off = _cuda_run(path, toks, PREFILL, False, lib)
    assert _rel_err(off, got).max() > 1e-4, "round-trips ON must change the logits"


def _n_vocab(path: Path, lib) -> int:
    from spark_setup.engine.runtime import Model

    with Model(path, backend="cpu", lib=lib) as m:
        return m.n_vocab


@pytest.mark.gpu
@pytest.mark.parametrize("name", MODELS)
def test_cuda_batched_prefill_matches_cpu(name, monkeypatch):
    """Prefill steps of up to 16 tokens (batched projections, per-token state updates in order) give the CPU
    engine's logits at every position, and the last-logits-only path agrees with the all-logits one."""
    from spark_setup.engine.runtime import Model

    monkeypatch.setenv("DS4_CUDA_PREFILL_BATCH", "16")
    monkeypatch.setenv("DS4_CUDA_PREFILL_GEMM", "0")  # v1 (the default is v2, tested below)
    lib = _lib()
    path = tiny_model(name)
    prompt = _prompt(_n_vocab(path, lib), PREFILL, seed=PROMPT_SEED[name])
    ref, toks = _cpu_run(path, prompt, False, lib)
    got = _cuda_run(path, toks, PREFILL, False, lib)
    err = _rel_err(got, ref)
    _report(f"{name} batched prefill roundtrip=off max rel err", float(err.max()))
    bad = np.nonzero(err >= 1e-4)[0]
    _report(f"{name} batched prefill first position over 1e-4", int(bad[0]) if len(bad) else None)
    assert err.max() < 1e-4, f"worst position {int(err.argmax())}: {err.max():.3g}"
    with Model(path, backend="cuda", lib=lib) as m, m.new_session(PREFILL + 8, False) as s:
        last = s.eval(prompt[:50])
        last2 = s.eval(prompt[50:])
    assert _rel_err(last[None], ref[49][None])[0] < 1e-4
    assert _rel_err(last2[None], ref[PREFILL - 1][None])[0] < 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("batch", ["8", "32"])
@pytest.mark.parametrize("name", MODELS)
def test_cuda_prefill_gemm_matches_cpu(name, batch, monkeypatch):
    """DS4_CUDA_PREFILL_GEMM=1 (batched products for every weight type, routed experts grouped by expert): the
    CPU engine's logits at every position; last-logits-only evals (full batches captured into a graph and
    replayed) agree with them at the end of each call."""
    from spark_setup.engine.runtime import Model

    monkeypatch.setenv("DS4_CUDA_PREFILL_BATCH", batch)
    monkeypatch.setenv("DS4_CUDA_PREFILL_GEMM", "1")
    lib = _lib()
    path = tiny_model(name)
    prompt = _prompt(_n_vocab(path, lib), PREFILL, seed=PROMPT_SEED[name])
    ref, toks = _cpu_run(path, prompt, False, lib)
    got = _cuda_run(path, toks, PREFILL, False, lib)
    err = _rel_err(got, ref)
    _report(f"{name} gemm prefill batch {batch} max rel err", float(err.max()))
    assert err.max() < 1e-4, f"worst position {int(err.argmax())}: {err.max():.3g}"
    with Model(path, backend="cuda", lib=lib) as m, m.new_session(PREFILL + 8, False) as s:
        for a, b in ((0, 40), (40, 50), (50, PREFILL)):
            last = s.eval(prompt[a:b])
            assert _rel_err(last[None], ref[b - 1][None])[0] < 1e-4, f"last logits of [{a}, {b})"


@pytest.mark.gpu
@pytest.mark.parametrize("batch", ["1", "16"])
@pytest.mark.parametrize("name", ["s6", "k7"])
def test_cuda_truncate_equals_fresh(name, batch, monkeypatch):
    """Truncate (checkpoint restore + re-evaluation on the GPU) continues exactly like a fresh session."""
    from spark_setup.engine.runtime import Model

    monkeypatch.setenv("DS4_CUDA_PREFILL_BATCH", batch)
    monkeypatch.setenv("DS4_CUDA_PREFILL_GEMM", "0")
    lib = _lib()
    path = tiny_model(name)
    with Model(path, backend="cuda", lib=lib) as m:
        rng = np.random.default_rng(3)
        a = rng.integers(0, m.n_vocab, size=90).astype(np.int32)
        b = rng.integers(0, m.n_vocab, size=30).astype(np.int32)
        with m.new_session(128) as s:
            s.eval(a)
            s.truncate(50)
            assert s.pos == 50
            got = s.eval(b, all_logits=True)
            s.truncate(7)  # before the first checkpoint: back to the initial state
            got7 = s.eval(b[:5], all_logits=True)
        with m.new_session(128) as f:
            want = f.eval(np.concatenate([a[:50], b]), all_logits=True)[50:]
        with m.new_session(128) as f:
            want7 = f.eval(np.concatenate([a[:7], b[:5]]), all_logits=True)[7:]
    if batch == "1":  # the same launches on the same data: bit for bit
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got7, want7)
    else:  # the step partition differs (batched vs one-token projections): f32 rounding only
        assert _rel_err(got, want).max() < 1e-4
        assert _rel_err(got7, want7).max() < 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["s6", "k7"])
def test_cuda_prefill_gemm_truncate_equals_fresh(name, monkeypatch):
    """v2 prefill (DS4_CUDA_PREFILL_GEMM=1, steps of 24: checkpoints move to multiples of the batch): truncate
    continues like a fresh session."""
    from spark_setup.engine.runtime import Model

    monkeypatch.setenv("DS4_CUDA_PREFILL_BATCH", "24")
    monkeypatch.setenv("DS4_CUDA_PREFILL_GEMM", "1")
    lib = _lib()
    path = tiny_model(name)
    with Model(path, backend="cuda", lib=lib) as m:
        rng = np.random.default_rng(5)
        a = rng.integers(0, m.n_vocab, size=100).astype(np.int32)
        b = rng.integers(0, m.n_vocab, size=30).astype(np.int32)
        with m.new_session(160) as s:
            s.eval(a)
            s.truncate(60)
            assert s.pos == 60
            got = s.eval(b, all_logits=True)
        with m.new_session(160) as f:
            want = f.eval(np.concatenate([a[:60], b]), all_logits=True)[60:]
    assert _rel_err(got, want).max() < 1e-4


@pytest.mark.gpu
def test_cuda_graphs_equal_direct_launches(monkeypatch):
    """The captured CUDA graphs replay exactly the launches of the direct path."""
    from spark_setup.engine.runtime import Model

    lib = _lib()
    path = tiny_model("s6")
    toks = _prompt(_n_vocab(path, lib), 60, seed=4)
    out = {}
    for graphs in ("1", "0"):
        monkeypatch.setenv("DS4_CUDA_GRAPHS", graphs)
        with Model(path, backend="cuda", lib=lib) as m, m.new_session(64) as s:
            out[graphs] = np.concatenate([s.eval(toks[:40], all_logits=True)] +
                                         [s.eval([int(t)], all_logits=True) for t in toks[40:]])
    np.testing.assert_array_equal(out["1"], out["0"])


@pytest.mark.gpu
def test_cuda_session_errors():
    from spark_setup.engine._lib import DS4_E_ARG, DS4_E_STATE, EngineError
    from spark_setup.engine.runtime import Model

    lib = _lib()
    with Model(tiny_model("s6"), backend="cuda", lib=lib) as m, m.new_session(4) as s:
        assert s.nbytes > 0
        with pytest.raises(EngineError) as e:
            s.eval([m.n_vocab])
        assert e.value.code == DS4_E_ARG
        s.eval([1, 2, 3])
        with pytest.raises(EngineError) as e:
            s.eval([1, 2])
        assert e.value.code == DS4_E_STATE and "context full" in str(e.value)
        assert s.pos == 3
        with pytest.raises(EngineError) as e:
            s.truncate(4)
        assert e.value.code == DS4_E_STATE


def test_cuda_backend_unavailable_without_cuda(engine_lib):
    """A CPU-only engine refuses the cuda backend with DS4_E_BACKEND and says how to fix it (runs in CI)."""
    from spark_setup.engine import _lib
    from spark_setup.engine._lib import DS4_E_BACKEND, EngineError
    from spark_setup.engine.runtime import Model

    lib = _lib.load(engine_lib)
    if lib.ds4_has_cuda():
        pytest.skip("this engine has CUDA")
    sys.path.insert(0, str(REPO / "tools"))
    import make_tiny_model

    with pytest.raises(EngineError) as e:
        Model(make_tiny_model.ensure_gguf("s6"), backend="cuda", lib=lib)
    assert e.value.code == DS4_E_BACKEND
    assert "without CUDA" in str(e.value) and "cpu backend" in str(e.value)
