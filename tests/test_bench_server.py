"""bench end to end against our real server (`spark-setup serve --foreground`) on the CPU engine.

The model is the bundled demo model when it is present, else a random tiny DS4 model from tools/make_tiny_model.py
(the timings exercise the same server, engine and tokenizer path; only the answers differ).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from spark_setup.demo import demo_model_path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def served_model(tmp_path) -> tuple[Path, str]:
    if demo_model_path().is_file():
        return demo_model_path(), "ds4-demo"
    sys.path.insert(0, str(REPO / "tools"))
    import make_tiny_model as mt

    return mt.write_random_gguf(mt.CONFIGS["s6"], tmp_path / "random-s6.gguf", seed=1), "random-s6"


@pytest.fixture()
def demo_server(engine_lib, tmp_path, served_model):
    model, _name = served_model
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "spark_setup", "serve", "--foreground", "--model", str(model),
                             "--port", str(port), "--ctx", "4096"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=dict(os.environ, SPARK_SETUP_STATE_DIR=str(tmp_path / "s")))
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1200):
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                pytest.fail(f"the server exited with {proc.returncode}")
            time.sleep(0.1)
        else:
            pytest.fail("the demo server did not become ready in 120 s")
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


@pytest.mark.slow
def test_bench_against_our_server(demo_server, served_model, tmp_path):
    model, name = served_model
    out = tmp_path / "bench.md"
    r = subprocess.run([sys.executable, "-m", "spark_setup", "bench", "--url", demo_server, "--pp", "64",
                        # 32 tokens: ~40 ms of SSE chunks, so a slow client cannot read all of them at one instant
                        # (tg t/s needs two distinct arrival times)
                        "--tg", "32", "--depth", "0", "128", "--runs", "2", "--tokenizer", str(model),
                        "--format", "md", "-o", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "| model | test | t/s | peak t/s | ttfr (ms) | est_ppt (ms) | e2e_ttft (ms) |"
    rows = [[c.strip() for c in ln.split("|")[1:-1]] for ln in lines[2:6]]
    assert [row[1] for row in rows] == ["pp64", "tg32", "pp64 @ d128", "tg32 @ d128"]
    assert all(row[0] == name for row in rows)
    for row in rows:
        mean = float(row[2].split("±")[0])
        assert mean > 0
    # prompt tokens the server counted = exactly what we sent (+ the chat template's fixed overhead)
    md = out.read_text()
    assert md == r.stdout or md.rstrip("\n") == r.stdout.rstrip("\n")
    j = subprocess.run([sys.executable, "-m", "spark_setup", "bench", "--url", demo_server, "--pp", "32",
                        "--tg", "4", "--runs", "1", "--tokenizer", str(model), "--format", "json"],
                       capture_output=True, text=True, timeout=600)
    assert j.returncode == 0, j.stderr
    data = json.loads(j.stdout)
    s = data["tests"][0]["runs"][0][0]
    assert s["prompt_tokens"] == 32 + data["prompt_overhead"]["user"]
    assert s["completion_tokens"] == 4  # EOS banned through logit_bias: exactly tg tokens
    assert data["ignore_eos_honoured"] is True
