"""roofline: the engine's bandwidth probe (CPU here; CUDA on the GPU machine), the arithmetic, the command."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys

import pytest

from spark_setup import roofline as r
from spark_setup.engine import gguf_info as gi
from spark_setup.errors import UserError

from fake_openai import FakeOpenAI, Script

Q2_BPT_16K = 9_641_693_604


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spark_setup", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "COLUMNS": "200", **(env or {})})


def test_roofline_arithmetic_on_the_reference_layout():
    bw = r.Bandwidth("given", 0, 0, 4400.0, None)
    rl = r.build_roofline([0, 16384], bw)
    p0, p16 = rl.points
    assert p16.bytes_per_token == Q2_BPT_16K
    assert p16.roofline_tps == pytest.approx(4400e9 / Q2_BPT_16K)  # 456 t/s (platform-facts §8)
    assert round(p16.roofline_tps) == 456
    assert p0.roofline_tps > p16.roofline_tps
    q4 = r.build_roofline([16384], r.Bandwidth("given", 0, 0, 273.0, None), variant="q4").points[0]
    assert q4.bytes_per_token == 11_467_788_708


def test_probe_arguments_and_cpu_probe(engine_lib):
    from spark_setup.engine import _lib

    lib = _lib.load(engine_lib)
    bw = r.probe_bandwidth("cpu", 64 << 20, 3, lib=lib)
    assert bw.backend == "cpu" and bw.read_gbs > 0.1 and bw.copy_gbs > 0.1
    rd, cp = ctypes.c_double(-1), ctypes.c_double(-1)
    assert lib.ds4_bandwidth_probe(7, 1 << 20, 1, ctypes.byref(rd), ctypes.byref(cp)) == _lib.DS4_E_ARG
    assert "unknown backend" in _lib.last_error(lib) and rd.value == -1  # outputs untouched on failure
    assert lib.ds4_bandwidth_probe(0, 100, 1, ctypes.byref(rd), ctypes.byref(cp)) == _lib.DS4_E_ARG
    assert "too small" in _lib.last_error(lib)
    assert lib.ds4_bandwidth_probe(0, 1 << 20, 1, None, None) == _lib.DS4_E_ARG
    if not lib.ds4_has_cuda():
        assert lib.ds4_bandwidth_probe(1, 1 << 20, 1, ctypes.byref(rd), ctypes.byref(cp)) == _lib.DS4_E_BACKEND
        assert "without CUDA" in _lib.last_error(lib)
        with pytest.raises(UserError, match="bandwidth probe failed"):
            r.probe_bandwidth("cuda", 1 << 20, 1, lib=lib)


@pytest.mark.gpu
def test_cuda_probe_on_the_gpu(tmp_path_factory):
    """On a GPU machine: build the CUDA engine and probe device memory (HBM / LPDDR5X-class numbers)."""
    from spark_setup.engine import _lib
    from spark_setup.engine.build import build_engine
    from spark_setup.settings import load_settings

    res = build_engine(load_settings({"prefix": tmp_path_factory.mktemp("cuda-engine")}, env={}), arch="auto",
                       progress=False)
    if res.arch == "cpu":
        pytest.skip("no CUDA build possible here")
    lib = _lib.load(res.lib_path)
    bw = r.probe_bandwidth("cuda", 2 << 30, 5, lib=lib)
    assert bw.backend == "cuda" and bw.read_gbs > 100 and bw.copy_gbs > 100
    auto = r.probe_bandwidth("auto", 1 << 30, 3, lib=lib)
    assert auto.backend == "cuda"


def test_cli_probe_cpu(engine_lib):
    res = run_cli("roofline", "--backend", "cpu", "--probe-gib", "0.0625", "--iters", "2", "--ctx", "0", "16384",
                  "--json", env={"DS4_ENGINE_LIB": str(engine_lib)})
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    bw = data["bandwidth"]["read_gbs"]
    assert data["bandwidth"]["backend"] == "cpu" and bw > 0
    p = data["points"][1]
    assert p["ctx"] == 16384 and p["bytes_per_token"] == Q2_BPT_16K
    assert p["roofline_tps"] == pytest.approx(bw * 1e9 / Q2_BPT_16K)


def _tiny_main_gguf(path):
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "deepseek4")
    w.add_uint32("deepseek4.expert_used_count", 2)
    w.add_tensor("token_embd.weight", np.zeros((100, 64), np.float16))  # row: 128 B
    w.add_tensor("blk.0.attn_norm.weight", np.ones(64, np.float32))  # 256 B
    w.add_tensor("blk.0.ffn_up_exps.weight", np.zeros((8, 32, 64), np.float32))  # 8 experts x 8 KiB
    w.add_tensor("output.weight", np.zeros((100, 64), np.float16))  # 12800 B
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return 128 + 256 + 2 * 8192 + 12800


def test_model_and_bench_against_scripted_server(tmp_path):
    model = tmp_path / "tiny.gguf"
    bpt = _tiny_main_gguf(model)
    sc = Script(prefill_tps=50000.0, tg_tps=200.0, base_latency=0.0)
    from spark_setup import bench as b

    tok = b.load_tokenizer(None)[0]
    with FakeOpenAI(lambda t: len(tok.encode(t)), sc) as fake:
        rl = r.build_roofline([0, 200], r.Bandwidth("given", 0, 0, 0.01, None), model)
        r.measure_decode(rl, fake.url, tg=40)  # DeepSeek-V4 tokenizer (the tiny file has none)
        depths = sorted({len(tok.encode(q["messages"][0]["content"])) for q in fake.requests
                         if q["max_tokens"] == 40 and q["messages"][0]["role"] == "system"})
        # the CLI takes the tokenizer from --model by default: this file has none, and the error says so
        res = run_cli("roofline", "--model", str(model), "--bandwidth", "0.01", "--ctx", "0",
                      "--bench", fake.url, "--tg", "8")
    assert res.returncode == 1 and "no tokenizer" in res.stderr
    assert depths == [200 - 64]  # context 200 = 136 tokens of depth + the 64-token prompt
    assert [p.bytes_per_token for p in rl.points] == [bpt, bpt]  # no KV tensors in this file
    for p in rl.points:
        assert p.roofline_tps == pytest.approx(0.01e9 / bpt)
        assert p.measured_tps == pytest.approx(200.0, rel=0.05)
        assert p.fraction == pytest.approx(p.measured_tps / p.roofline_tps)
    d = rl.to_dict()
    assert d["bench_url"] == fake.url and d["points"][0]["fraction"] == pytest.approx(rl.points[0].fraction)


def test_cli_errors(tmp_path):
    res = run_cli("roofline", "--bandwidth", "100", "--plot", str(tmp_path / "x.pdf"))
    assert res.returncode == 2 and ".svg or .png" in res.stderr
    res = run_cli("roofline", "--bandwidth", "-1")
    assert res.returncode == 2
    res = run_cli("roofline", "--bandwidth", "100", "--model", str(tmp_path / "none.gguf"))
    assert res.returncode == 1 and "no such file" in res.stderr
    res = run_cli("roofline", "--bandwidth", "100", "--ctx", "0", "4096", "16384")
    assert res.returncode == 0 and "456" not in res.stdout and "4,096" in res.stdout
    # without --bandwidth the engine probe runs; the model is checked before it, whatever the engine's state
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"garbage")
    for m, msg in ((tmp_path / "none.gguf", "no such file"), (bad, "not a GGUF file")):
        res = run_cli("roofline", "--model", str(m), env={"DS4_ENGINE_LIB": str(tmp_path / "missing.so")})
        assert res.returncode == 1 and msg in res.stderr and "engine" not in res.stderr, res.stderr


def test_plot(tmp_path):
    out = tmp_path / "roof.svg"
    rl = r.build_roofline([0, 4096, 16384], r.Bandwidth("given", 0, 0, 273.0, None))
    rl.points[0].measured_tps = 20.0
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="matplotlib"):
            r.plot(rl, out)
        return
    r.plot(rl, out)
    assert out.read_text().lstrip().startswith("<?xml") and "<svg" in out.read_text()
