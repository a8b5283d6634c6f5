"""The engine's DS4 forward pass (CPU, round-trips OFF) against transformers' DeepseekV4ForCausalLM.

Tiny models from tools/make_tiny_model.py: the GGUF holds random valid quant blocks and the transformers model is
loaded from that file through gguf.quants.dequantize, so both sides use the same effective weights. The
reference runs in float64 (transformers keeps the HC and norm math in float32).

Per config: a prefill longer than the sliding window, than 4 periods of both compression ratios and than
(indexer top-k + 1) ratio-4 rows (so the indexer really selects), then 16 greedy decode steps. Logits are
compared at every position up to the first position where a discrete choice (router top-k, indexer top-k)
has a margin below MARGIN (facts J: a near-tie legitimately flips the choice and everything after it).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import make_tiny_model as mt  # noqa: E402

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

CONFIGS = ["s6", "m8", "k7"]
# prompt seeds whose sequences have no discrete-choice margin below MARGIN (found by scanning seeds 1-8; other
# seeds put a near-tie early, e.g. s6 seed 1 at position 24, and the comparison would stop there)
PROMPT_SEED = {"s6": 3, "m8": 7, "k7": 1}
PREFILL = 72
DECODE = 16
MAX_CTX = 128
TOL = 1e-4          # max |engine - reference| / max |reference| per position
MARGIN = 1e-3       # discrete-choice margin below which comparison stops (facts J)


def prefill_length(spec) -> int:
    need = max(spec.window + 1, 4 * spec.hca_ratio + 1, 4 * spec.csa_ratio + 1,
               spec.csa_ratio * (spec.idx_topk + 1) + 1)
    assert PREFILL >= need, (spec.name, need)
    return PREFILL


@pytest.fixture(scope="module")
def runtime(engine_lib):
    from spark_setup.engine import _lib, runtime

    return runtime, _lib.load(engine_lib)


def run_engine(runtime, lib, path, prompt, roundtrip=False):
    """Prefill (all logits) + DECODE greedy steps. Returns (tokens, logits [len(tokens), V])."""
    with runtime.Model(path, lib=lib) as m, m.new_session(MAX_CTX, roundtrip=roundtrip) as s:
        rows = [s.eval(prompt, all_logits=True)]
        toks = list(prompt)
        for _ in range(DECODE):
            nxt = int(np.argmax(rows[-1][-1] if rows[-1].ndim == 2 else rows[-1]))
            toks.append(nxt)
            rows.append(s.eval([nxt], all_logits=True))
        assert s.pos == len(toks)
    return np.array(toks), np.concatenate(rows, axis=0)


@pytest.fixture(scope="module", params=CONFIGS)
def parity(request, runtime):
    rt, lib = runtime
    name = request.param
    hf, path = mt.build_reference(name, seed=0)
    spec = mt.CONFIGS[name]
    rng = np.random.default_rng(PROMPT_SEED[name])
    prompt = rng.integers(0, hf.config.vocab_size, size=prefill_length(spec)).tolist()
    toks, logits = run_engine(rt, lib, path, prompt)
    ref = mt.discrete_margins(hf, toks[None])
    margin = np.minimum(ref["router"], ref["indexer"])
    low = np.nonzero(margin < MARGIN)[0]
    cutoff = int(low[0]) if len(low) else len(toks)
    return dict(name=name, spec=spec, path=path, hf=hf, prompt=prompt, toks=toks, logits=logits, ref=ref,
                cutoff=cutoff, rt=rt, lib=lib)


def rel_err(a, ref):
    return np.abs(a - ref).max(-1) / np.abs(ref).max(-1)


def test_logits_match_transformers(parity, record_property):
    p = parity
    n = p["cutoff"]
    err = rel_err(p["logits"][:n], p["ref"]["logits"][:n])
    worst = float(err.max())
    record_property("max_rel_err", worst)
    record_property("compared_positions", n)
    print(f"{p['name']}: compared {n}/{len(p['toks'])} positions, max rel err {worst:.2e}, "
          f"min router margin {p['ref']['router'].min():.2e}, min indexer margin "
          f"{p['ref']['indexer'][np.isfinite(p['ref']['indexer'])].min():.2e}")
    # the comparison must reach into the region where every mechanism is active
    spec = p["spec"]
    assert n > max(4 * spec.hca_ratio, spec.csa_ratio * (spec.idx_topk + 1), spec.window), \
        f"first near-tie at position {n}: pick another prompt seed"
    assert worst <= TOL, f"{p['name']}: max relative logit error {worst:.3e} at position {int(err.argmax())}"


def test_indexer_and_router_are_exercised(parity):
    """The indexer selects (more visible rows than top-k) and the router has real choices."""
    p = parity
    idx = p["ref"]["indexer"]
    assert np.isfinite(idx).sum() >= 16, "indexer top-k never active"
    assert np.isfinite(p["ref"]["router"]).all()


def test_greedy_tokens_match_transformers(parity):
    p = parity
    start = len(p["prompt"])
    ref_next = p["ref"]["logits"].argmax(-1)
    for j in range(DECODE):
        row = start - 1 + j
        if row >= p["cutoff"]:
            break
        assert p["toks"][start + j] == ref_next[row], f"{p['name']}: decode step {j} differs"


def test_batched_prefill_equals_token_by_token(parity):
    rt, lib = parity["rt"], parity["lib"]
    toks = parity["toks"][:PREFILL + 8].tolist()
    with rt.Model(parity["path"], lib=lib) as m:
        with m.new_session(MAX_CTX, roundtrip=False) as s:
            one = s.eval(toks, all_logits=True)
        with m.new_session(MAX_CTX, roundtrip=False) as s:
            single = np.stack([s.eval([t]) for t in toks])
        with m.new_session(MAX_CTX, roundtrip=True) as s:  # chunks of odd sizes, round-trips on
            chunks, i = [], 0
            for size in (5, 13, 1, 29, 7, 100):
                chunks.append(s.eval(toks[i:i + size], all_logits=True))
                i += size
                if i >= len(toks):
                    break
            chunked_on = np.concatenate(chunks)[:len(toks)]
        with m.new_session(MAX_CTX, roundtrip=True) as s:
            single_on = np.stack([s.eval([t]) for t in toks])
    assert np.abs(one - single).max() <= 1e-5 * np.abs(single).max()
    assert np.abs(chunked_on - single_on).max() <= 1e-5 * np.abs(single_on).max()
    assert np.abs(one - single_on).max() > 1e-4, "round-trips ON must change the logits"


@pytest.mark.parametrize("cut", [0, 5, 31, 32, 50, 70])
def test_truncate_then_continue_equals_fresh(runtime, cut):
    rt, lib = runtime
    path = mt.ensure_gguf("s6", 0)
    rng = np.random.default_rng(7)
    a = rng.integers(0, 3000, size=80).tolist()
    b = rng.integers(0, 3000, size=20).tolist()
    with rt.Model(path, lib=lib) as m:
        for roundtrip in (False, True):
            with m.new_session(MAX_CTX, roundtrip=roundtrip) as s:
                s.eval(a)
                s.truncate(cut)
                assert s.pos == cut
                got = s.eval(b, all_logits=True)
                assert s.pos == cut + len(b)
            with m.new_session(MAX_CTX, roundtrip=roundtrip) as s:
                if cut:
                    s.eval(a[:cut])
                want = s.eval(b, all_logits=True)
            assert np.array_equal(got, want), f"truncate({cut}) roundtrip={roundtrip}"


def test_session_errors(runtime, engine_lib):
    rt, lib = runtime
    path = mt.ensure_gguf("s6", 0)
    with pytest.raises(rt.EngineError, match="unknown backend"):
        rt.Model(path, backend="tpu", lib=lib)
    with pytest.raises(rt.EngineError, match="CUDA"):
        rt.Model(path, backend="cuda", lib=lib)
    with rt.Model(path, lib=engine_lib) as m, m.new_session(16) as s:   # lib given as a path
        assert s.nbytes > 0
        s.eval([1, 2, 3])
        with pytest.raises(rt.EngineError, match="truncate to 4"):
            s.truncate(4)
        with pytest.raises(rt.EngineError, match="truncate to -1"):
            s.truncate(-1)
        with pytest.raises(rt.EngineError, match="context full"):
            s.eval(list(range(14)))
        assert s.pos == 3
        with pytest.raises(rt.EngineError, match="outside the vocabulary"):
            s.eval([m.n_vocab])
        with pytest.raises(rt.EngineError, match="max_ctx"):
            m.new_session(0)
    with pytest.raises(rt.EngineError, match="closed"):
        s.eval([1])


def test_repeated_truncate_and_reuse(runtime):
    """Prefix reuse as a server does it: run, cut back, branch, cut back further, branch again."""
    rt, lib = runtime
    path = mt.ensure_gguf("k7", 0)
    rng = np.random.default_rng(11)
    a, b, c = (rng.integers(0, 3000, size=k).tolist() for k in (90, 20, 15))
    with rt.Model(path, lib=lib) as m:
        with m.new_session(MAX_CTX) as s:
            s.eval(a)
            s.truncate(75)
            s.eval(b)
            s.truncate(40)
            got = s.eval(c, all_logits=True)
        with m.new_session(MAX_CTX) as s:
            s.eval(a[:40])
            want = s.eval(c, all_logits=True)
    assert np.array_equal(got, want)


@pytest.mark.parametrize("types", ["F32", "F16"])
def test_exported_plain_model_matches_transformers(runtime, tmp_path, types):
    """write_ds4_gguf (the demo model's exporter) with plain matrices: the engine's F32/F16 paths and the
    writer's tensor naming/layout against transformers. F32 export is exact, so the reference is the original
    model; for F16 the reference is reloaded from the exported file."""
    rt, lib = runtime
    hf, _ = mt.build_reference("s6", seed=0)
    path = mt.write_ds4_gguf(hf, tmp_path / f"s6-{types}.gguf", types=types)
    ref_model = hf if types == "F32" else mt.hf_from_gguf(path)
    toks = np.random.default_rng(3).integers(0, hf.config.vocab_size, size=40)
    with torch.no_grad():
        ref = ref_model(torch.as_tensor(toks[None]), use_cache=False).logits[0].double().numpy()
    with rt.Model(path, lib=lib) as m, m.new_session(64, roundtrip=False) as s:
        got = s.eval(toks, all_logits=True)
    assert rel_err(got, ref).max() <= TOL


def test_truncate_to_a_prompt_boundary(runtime):
    """The usual prefix reuse: prompt, decode a reply, cut back to the end of the prompt (the tail checkpoint),
    continue; and a cut below that boundary still works after it."""
    rt, lib = runtime
    path = mt.ensure_gguf("s6", 0)
    rng = np.random.default_rng(5)
    prompt, more = rng.integers(0, 3000, size=45).tolist(), rng.integers(0, 3000, size=12).tolist()
    with rt.Model(path, lib=lib) as m:
        with m.new_session(MAX_CTX) as fresh:
            fresh.eval(prompt)
            want = fresh.eval(more, all_logits=True)
        with m.new_session(MAX_CTX) as fresh:
            fresh.eval(prompt[:20])
            want_short = fresh.eval(more, all_logits=True)
        with m.new_session(MAX_CTX) as s:
            lg = s.eval(prompt)
            for _ in range(6):
                lg = s.eval([int(lg.argmax())])
            s.truncate(len(prompt))
            assert np.array_equal(s.eval(more, all_logits=True), want)
            s.truncate(20)
            assert np.array_equal(s.eval(more, all_logits=True), want_short)
