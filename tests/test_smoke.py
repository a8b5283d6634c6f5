"""`spark-setup smoke`: the demo model must say Paris, through a real server, whichever way it is reached."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from spark_setup.smoke import run_smoke
from spark_setup.settings import load_settings

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spark_setup", *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, **(env or {})))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def settings(tmp_path):
    return load_settings({"prefix": tmp_path / "prefix"}, env={}, config_file=tmp_path / "none.toml")


def test_smoke_demo_passes_and_reports_timings(engine_lib, tmp_path):
    r = cli("smoke", "--demo", "--prefix", str(tmp_path / "p"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "answer:   'Paris'" in r.stdout and "PASS" in r.stdout
    assert "time to first token:" in r.stdout and " ms" in r.stdout
    assert not (tmp_path / "p" / "state" / "logs" / "server.log").exists()  # throwaway server logs elsewhere


def test_run_smoke_api_against_a_server_url(engine_lib, tmp_path, settings):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "spark_setup", "serve", "--foreground", "--demo", "--port",
                             str(port), "--api-key", "k1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, SPARK_SETUP_STATE_DIR=str(tmp_path / "s")))
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        res = run_smoke(url=url, settings=settings, api_key="k1")
        assert res.passed and res.answer == "Paris" and res.model == "ds4-demo"
        assert res.ttft_s is not None and 0 < res.ttft_s < 30
        assert res.tokens_per_s is not None and res.tokens_per_s > 0
        ok = cli("smoke", "--url", url, "--api-key", "k1", "--json")
        assert ok.returncode == 0 and '"passed": true' in ok.stdout
        denied = cli("smoke", "--url", url, "--api-key", "wrong")
        assert denied.returncode == 1 and "401" in denied.stderr and "Traceback" not in denied.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_smoke_fails_with_the_answer_shown_when_the_model_does_not_know(engine_lib, tmp_path):
    sys.path.insert(0, str(REPO / "tools"))
    import make_tiny_model as mt  # random weights: it cannot know the capital of France

    path = mt.write_random_gguf(mt.CONFIGS["s6"], tmp_path / "random.gguf", seed=1)
    r = cli("smoke", "--model", str(path), "--prefix", str(tmp_path / "p"))
    assert r.returncode == 1
    assert "FAIL" in r.stdout and "answer:" in r.stdout


def test_smoke_url_with_nothing_listening_is_a_one_line_error():
    r = cli("smoke", "--url", f"http://127.0.0.1:{free_port()}")
    assert r.returncode == 1 and "cannot talk to the server" in r.stderr and "Traceback" not in r.stderr


def test_exclusive_options():
    r = cli("smoke", "--demo", "--url", "http://127.0.0.1:1")
    assert r.returncode == 2


def test_smoke_without_an_engine_says_so_in_one_line(tmp_path):
    r = cli("smoke", "--demo", "--prefix", str(tmp_path / "p"), env={"DS4_ENGINE_LIB": str(tmp_path / "none.so")})
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: the server could not load") and "none.so" in r.stderr


@pytest.mark.gpu
def test_smoke_demo_on_the_cuda_backend(tmp_path):
    """On a GPU machine: the demo model through the CUDA engine answers Paris like the CPU one."""
    from spark_setup.engine.build import build_engine

    prefix = REPO / ".cache" / "test-engine-gpu"
    built = build_engine(load_settings({"prefix": prefix}, env={}, config_file=prefix / "none.toml"),
                         arch="auto", progress=False)
    r = cli("smoke", "--demo", "--backend", "cuda", "--prefix", str(tmp_path / "p"),
            env={"DS4_ENGINE_LIB": str(built.lib_path)})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "answer:   'Paris'" in r.stdout
