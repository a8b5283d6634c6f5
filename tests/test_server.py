"""The server as clients see it: the real `openai` client against `spark-setup serve --foreground --demo`, a real
uvicorn process on a free loopback port, running the CPU engine on the bundled demo model."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from spark_setup.demo import demo_model_path
from spark_setup.engine import chat
from spark_setup.engine.tokenizer import Tokenizer

openai = pytest.importorskip("openai")

KEY = "sk-test-123"
Q = "What is the capital of France? Answer in one word."
Q_PLAIN = "What is the capital of France?"
UNTRAINED = "Write a long story about a dragon who learns to paint."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, tmp: Path, *args: str, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.state = tmp / "state"
        self.out = tmp / "stdout.log"
        e = dict(os.environ, SPARK_SETUP_STATE_DIR=str(self.state), SPARK_SETUP_PREFIX=str(tmp / "prefix"))
        e.update(env or {})
        cmd = [sys.executable, "-m", "spark_setup", "serve", "--foreground", "--port", str(self.port), *args]
        with open(self.out, "wb") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=e)

    def wait_ready(self, timeout=120.0) -> dict:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            assert self.proc.poll() is None, self.out.read_text()
            try:
                r = httpx.get(self.url + "/health", timeout=2)
                if r.status_code == 200:
                    return r.json()
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError("server not ready: " + self.out.read_text()[-2000:])

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        return self.proc.returncode

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=5).json()


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_gguf(demo_model_path())


@pytest.fixture(scope="module")
def server(engine_lib, tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("srv"), "--demo", "--ctx", "1024", "--api-key", KEY, "--max-queue", "1")
    try:
        srv.wait_ready()
        yield srv
    finally:
        assert srv.stop() == 0


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def ask(client, content=Q, thinking=False, **kw):
    extra = {"thinking": {"type": "enabled" if thinking else "disabled"}, **kw.pop("extra_body", {})}
    return client.chat.completions.create(model="ds4-demo", messages=[{"role": "user", "content": content}],
                                          extra_body=extra, temperature=kw.pop("temperature", 0), **kw)


def stream_parts(stream):
    reasoning, content, finish, usage, kinds = [], [], None, None, []
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
            continue
        for ch in chunk.choices:
            d = ch.delta
            r = getattr(d, "reasoning_content", None)
            if r:
                reasoning.append(r)
                kinds.append("r")
            if d.content:
                content.append(d.content)
                kinds.append("c")
            finish = ch.finish_reason or finish
    return "".join(reasoning), "".join(content), finish, usage, kinds


def test_models_lists_the_demo(client):
    assert [m.id for m in client.models.list().data] == ["ds4-demo"]


def test_chat_non_streaming_answers_paris_with_exact_usage(client, tok):
    r = ask(client)
    msg = r.choices[0].message
    assert msg.content == "Paris" and r.choices[0].finish_reason == "stop"
    assert getattr(msg, "reasoning_content", None) is None
    prompt = chat.render([chat.Message("user", Q)], thinking=False)
    assert r.usage.prompt_tokens == len(tok.encode(prompt))
    assert r.usage.completion_tokens == len(tok.encode("Paris"))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_streaming_with_final_usage_chunk(client, tok):
    stream = ask(client, Q_PLAIN, stream=True, stream_options={"include_usage": True})
    reasoning, content, finish, usage, _ = stream_parts(stream)
    assert (reasoning, content, finish) == ("", "The capital of France is Paris.", "stop")
    assert usage.completion_tokens == len(tok.encode(content))
    assert usage.prompt_tokens == len(tok.encode(chat.render([chat.Message("user", Q_PLAIN)], thinking=False)))


def test_thinking_is_the_default_and_comes_as_reasoning_content(client, tok):
    r = client.chat.completions.create(model="x", messages=[{"role": "user", "content": Q}], temperature=0)
    msg = r.choices[0].message
    assert msg.reasoning_content == f"The user asks: {Q_PLAIN} The capital of France is Paris."
    assert msg.content == "Paris"
    # reasoning + </think> + answer are all completion tokens; all but the answer's are reasoning tokens
    assert r.usage.completion_tokens == len(tok.encode(msg.reasoning_content + "</think>" + msg.content))
    assert r.usage.completion_tokens_details.reasoning_tokens == r.usage.completion_tokens - len(tok.encode("Paris"))
    stream = client.chat.completions.create(model="x", messages=[{"role": "user", "content": Q}], temperature=0,
                                            stream=True)
    reasoning, content, _, usage, kinds = stream_parts(stream)
    assert (reasoning, content) == (msg.reasoning_content, "Paris") and usage is None
    assert kinds == sorted(kinds, key=lambda k: k != "r")  # all reasoning deltas before any content


def test_reasoning_effort_none_turns_thinking_off_and_max_adds_think_max(client, tok):
    r = client.chat.completions.create(model="x", messages=[{"role": "user", "content": Q}], temperature=0,
                                       reasoning_effort="none")
    assert r.choices[0].message.content == "Paris" and getattr(r.choices[0].message, "reasoning_content", None) is None
    m = client.chat.completions.create(model="x", messages=[{"role": "user", "content": Q}], temperature=0,
                                       max_tokens=2, extra_body={"reasoning_effort": "max"})
    assert m.usage.prompt_tokens == len(chat.encode(tok, [chat.Message("user", Q)], thinking=True, max_effort=True))
    resp = client.responses.create(model="x", input=Q, max_output_tokens=2, reasoning={"effort": "xhigh"})
    assert resp.usage.input_tokens == m.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError, match="effort"):
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": Q}],
                                       extra_body={"reasoning_effort": 3})


def test_think_false_turns_thinking_off(client):
    r = client.chat.completions.create(model="x", messages=[{"role": "user", "content": Q}], temperature=0,
                                       extra_body={"think": False})
    assert r.choices[0].message.content == "Paris"
    assert getattr(r.choices[0].message, "reasoning_content", None) is None


def test_completions_plain_and_streaming(client, tok):
    prompt = chat.render([chat.Message("user", "What is the capital of Italy?")], thinking=False)
    r = client.completions.create(model="x", prompt=prompt, max_tokens=20, temperature=0)
    assert r.choices[0].text == "The capital of Italy is Rome." and r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == len(tok.encode(prompt))
    parts = [c.choices[0].text for c in client.completions.create(model="x", prompt=prompt, max_tokens=20,
                                                                   temperature=0, stream=True) if c.choices]
    assert "".join(parts) == "The capital of Italy is Rome." and len([p for p in parts if p]) > 2
    short = client.completions.create(model="x", prompt=prompt, temperature=0)  # OpenAI default: 16 tokens
    assert short.usage.completion_tokens <= 16


def test_stop_strings_are_not_emitted_even_across_tokens(client):
    r = ask(client, Q_PLAIN, stop=["France"])
    assert r.choices[0].message.content == "The capital of " and r.choices[0].finish_reason == "stop"
    # " is Par" spans three tokens (" is", " Par", "is"): caught, and nothing of it is streamed
    _, content, finish, _, _ = stream_parts(ask(client, Q_PLAIN, stop=[" is Par"], stream=True))
    assert (content, finish) == ("The capital of France", "stop")


def test_max_tokens_cuts_with_finish_length(client):
    r = ask(client, Q_PLAIN, max_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    assert r.choices[0].message.content == "The capital of"


def test_same_seed_same_text(client):
    # the demo model is sure of itself even on questions it never saw: a hot temperature makes draws differ
    run = lambda seed: ask(client, UNTRAINED, temperature=2.5, top_p=1.0, seed=seed, max_tokens=24,  # noqa: E731
                           extra_body={"min_p": 0.0}).choices[0].message.content
    first = run(11)
    assert run(11) == first
    assert any(run(s) != first for s in (12, 13, 14))


def test_prefix_of_the_live_session_is_reused(client, server):
    ask(client, Q_PLAIN)
    before = server.health()["stats"]
    r = ask(client, Q)  # shares BOS, <｜User｜> and the question's words with the previous prompt
    after = server.health()["stats"]
    assert r.choices[0].message.content == "Paris"
    assert after["reused_tokens"] - before["reused_tokens"] >= 8
    assert r.usage.prompt_tokens_details.cached_tokens == after["reused_tokens"] - before["reused_tokens"]


def reuse_after_a_side_request(srv) -> tuple[int, int, int]:
    """Conversation A's first turn, an unrelated side request B, then A's second turn: (tokens of A's first prompt,
    tokens B reused, tokens A's second turn reused), from /health's counters."""
    sys_msg = {"role": "system", "content": "You are a helpful assistant."}
    turn1 = [sys_msg, {"role": "user", "content": "What is the capital of Italy?"}]
    first = post(srv, {"messages": turn1, "temperature": 0, "think": False}).json()
    b0 = srv.health()["stats"]["reused_tokens"]
    post(srv, {"messages": [{"role": "user", "content": "Hello"}], "temperature": 0, "think": False})
    b1 = srv.health()["stats"]["reused_tokens"]
    turn2 = turn1 + [first["choices"][0]["message"], {"role": "user", "content": Q}]
    second = post(srv, {"messages": turn2, "temperature": 0, "think": False}).json()
    assert second["choices"][0]["message"]["content"] == "Paris"
    return first["usage"]["prompt_tokens"], b1 - b0, srv.health()["stats"]["reused_tokens"] - b1


def test_a_second_session_keeps_a_conversation_through_a_side_request(engine_lib, tmp_path, server):
    srv = Server(tmp_path, "--demo", "--ctx", "512", "--api-key", KEY, "--sessions", "2")
    try:
        assert srv.wait_ready()["stats"]["sessions"] == 2
        n_first, side, again = reuse_after_a_side_request(srv)
        assert side == 0  # the side request went to the empty session...
        assert again >= n_first  # ...so the conversation's whole first turn (and its answer) was still there
    finally:
        assert srv.stop() == 0
    # one session: the side request truncates the conversation to the tokens they share
    n_first, side, again = reuse_after_a_side_request(server)
    assert server.health()["stats"]["sessions"] == 1 and again < n_first // 2


def test_a_session_that_cannot_be_allocated_is_one_error_with_its_fix(engine_lib):
    from spark_setup.engine import server as srvmod

    def loader(path, ctx, backend, progress):
        eng = srvmod.load_engine(path, ctx, backend, progress)
        eng.new_session = lambda: (_ for _ in ()).throw(RuntimeError("out of memory"))  # as a full GPU would
        return eng

    state = srvmod.ServerState(srvmod.ServerConfig(model_path=demo_model_path(), ctx=128, sessions=3), loader)
    try:
        state.load()
        assert state.status == "error"
        assert state.error == "session 2 of 3 (128 tokens) could not be allocated: out of memory"
        assert state.load_exc.hint == "use fewer --sessions or a smaller --ctx"
    finally:
        state.shutdown()  # the engine that did load is freed


def test_pick_slot_prefers_a_session_it_extends_then_the_least_recently_used():
    from spark_setup.engine.server import Slot, pick_slot

    a, b, c = Slot(None, [1, 2, 3, 4], used=3.0), Slot(None, [1, 9, 9], used=1.0), Slot(None, [], used=0.0)
    assert pick_slot([a, b, c], [1, 2, 3, 4, 5]) is a  # extends a
    assert pick_slot([a, b, c], [1, 2, 3, 7]) is a  # shares 3 of a's 4 tokens: little is lost
    assert pick_slot([a, b, c], [1, 7]) is c  # shares too little with a or b: the least recently used (empty) one
    assert pick_slot([a, b], [1, 7]) is b  # ... or the older one
    assert pick_slot([a, b], [1, 9, 9, 5]) is b
    assert pick_slot([a], [5]) is a  # one session: always it


def test_health_reports_the_last_decode_speed(client, server):
    ask(client, Q_PLAIN)  # a multi-token answer: its decode speed is measurable
    speed = server.health()["stats"]["last_decode_tokens_per_s"]
    assert isinstance(speed, (int, float)) and speed > 0


def long_body(content=UNTRAINED, n=150, **kw) -> dict:
    """A request that generates exactly n tokens: greedy, end-of-sentence banned through logit_bias."""
    return {"messages": [{"role": "user", "content": content}], "max_tokens": n, "temperature": 0,
            "think": False, "logit_bias": {"1": -100}, **kw}


def post(server, body, timeout=120) -> httpx.Response:
    return httpx.post(server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=timeout)


def test_presence_and_frequency_penalties_reach_the_sampler(server, tok):
    text = lambda **kw: post(server, long_body(n=40, **kw)).json()["choices"][0]["message"]["content"]  # noqa: E731
    plain = text()
    ids = tok.encode(plain)
    assert len(set(ids)) < len(ids)  # the untrained answer repeats itself: a penalty has something to change
    for kw in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        penalized = tok.encode(text(**kw))
        assert penalized != ids and len(set(penalized)) > len(set(ids))
    r = post(server, long_body(n=4, presence_penalty=3))
    assert r.status_code == 400 and "presence_penalty" in r.json()["error"]["message"]


def test_logit_bias_bans_end_of_sentence(server, tok):
    assert tok.eos_id == 1
    r = post(server, long_body(Q, n=20)).json()
    assert r["choices"][0]["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 20
    assert r["choices"][0]["message"]["content"].startswith("Paris")


def test_two_concurrent_clients_both_correct_and_the_second_waits(server):
    solo = post(server, long_body()).json()
    assert solo["usage"]["completion_tokens"] == 150
    started = server.health()["stats"]["requests"]
    with ThreadPoolExecutor(2) as ex:
        fa = ex.submit(post, server, long_body())
        while server.health()["stats"]["requests"] == started:  # the first one is on the engine now
            time.sleep(0.01)
        fb = ex.submit(post, server, {"messages": [{"role": "user", "content": "What is the capital of Japan?"}],
                                      "temperature": 0, "think": False})
        a, b = fa.result().json(), fb.result().json()
    assert a["choices"][0]["message"]["content"] == solo["choices"][0]["message"]["content"]
    assert b["choices"][0]["message"]["content"] == "The capital of Japan is Tokyo."
    assert b["timings"]["queued_s"] > 0.05 and a["timings"]["queued_s"] < 0.05


def test_disconnect_mid_stream_cancels_and_the_next_request_works(client, server):
    before = server.health()["stats"]["generated_tokens"]
    with httpx.stream("POST", server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json=long_body(n=400, stream=True), timeout=60) as r:
        seen = 0
        for line in r.iter_lines():
            if line.startswith("data:") and '"content"' in line:
                seen += 1
                if seen >= 3:
                    break
    # the client is gone: the server must stop generating for it
    time.sleep(1.0)
    during = server.health()["stats"]["generated_tokens"]
    time.sleep(1.0)
    after = server.health()["stats"]["generated_tokens"]
    assert after == during, "still generating after the client left"
    assert after - before < 400
    assert ask(client).choices[0].message.content == "Paris"


def test_queue_full_gets_429_with_retry_after(server):
    body = long_body(n=200)
    with ThreadPoolExecutor(4) as ex:
        futs = [ex.submit(post, server, body) for _ in range(4)]
        rs = [f.result() for f in futs]
        codes = sorted(r.status_code for r in rs)
    assert codes.count(200) >= 2 and 429 in codes, codes  # one running + one waiting (--max-queue 1)
    r429 = next(r for r in rs if r.status_code == 429)
    assert int(r429.headers["retry-after"]) >= 1 and r429.json()["error"]["code"] == "queue_full"


@pytest.mark.parametrize("payload, param", [
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
])
def test_wrong_types_are_400_with_an_openai_error(client, payload, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.post("/chat/completions", body=payload, cast_to=object)
    err = e.value.body
    assert e.value.status_code == 400 and err["type"] == "invalid_request_error" and err["param"] == param


def test_malformed_json_is_400(server):
    r = httpx.post(server.url + "/v1/chat/completions", content=b'{"messages": [', timeout=10,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


def test_prompt_longer_than_the_context_is_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, "Paris " * 1100)
    assert e.value.body["code"] == "context_length_exceeded" and "1024" in e.value.body["message"]


def test_wrong_or_missing_api_key_is_401(server):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.body["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200  # health stays open for probes


def test_log_file_records_requests(server, client):
    ask(client)
    log = server.state / "logs" / "server.log"
    text = log.read_text()
    assert "ready: model ds4-demo" in text and "generation finish=stop" in text


def test_sigterm_drains_the_running_request_and_exits_0(engine_lib, tmp_path):
    srv = Server(tmp_path, "--demo", "--ctx", "512")
    srv.wait_ready()
    got = {}
    streaming = threading.Event()

    def run():
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        s = c.chat.completions.create(model="x", messages=[{"role": "user", "content": UNTRAINED}], stream=True,
                                      max_tokens=300, temperature=0, logit_bias={"1": -100},
                                      stream_options={"include_usage": True}, extra_body={"think": False})

        def chunks():
            for chunk in s:
                streaming.set()
                yield chunk
        got["parts"] = stream_parts(chunks())

    t = threading.Thread(target=run)
    t.start()
    assert streaming.wait(60)
    srv.proc.send_signal(signal.SIGTERM)
    t.join(60)
    assert srv.proc.wait(60) == 0
    assert got["parts"][2] == "length" and got["parts"][3].completion_tokens == 300  # it ran to its end


def test_systemd_notify_status_and_ready(engine_lib, tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"spark-setup-test-{os.getpid()}"
    sock.bind("\0" + name)  # abstract namespace, announced as @name
    sock.settimeout(60)
    srv = Server(tmp_path, "--demo", "--ctx", "256", env={"NOTIFY_SOCKET": "@" + name})
    msgs = []
    try:
        while not any("READY=1" in m for m in msgs):
            msgs.append(sock.recv(4096).decode())
        assert httpx.get(srv.url + "/health").status_code == 200  # ready was sent only once it can answer
        assert srv.stop() == 0
        sock.settimeout(5)
        while not any("STOPPING=1" in m for m in msgs):
            msgs.append(sock.recv(4096).decode())
    finally:
        srv.stop()
        sock.close()
    statuses = [m for m in msgs if m.startswith("STATUS=loading")]
    assert statuses and any("tokenizer" in m for m in statuses)


def test_health_is_503_with_progress_while_loading(engine_lib, tmp_path):
    """An in-process server whose loader waits on an event: /health must say 503 + progress, then 200."""
    import uvicorn

    from spark_setup.engine import server as srvmod

    gate = threading.Event()

    def slow_loader(path, ctx, backend, progress):
        progress("loading weights on cpu")
        gate.wait(30)
        return srvmod.load_engine(path, ctx, backend, progress)

    app = srvmod.create_app(srvmod.ServerConfig(model_path=demo_model_path(), ctx=128), loader=slow_loader)
    port = free_port()
    userver = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on"))
    th = threading.Thread(target=userver.run, daemon=True)
    th.start()
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                r = httpx.get(url + "/health")
                break
            except httpx.HTTPError:
                time.sleep(0.05)
        assert r.status_code == 503 and r.json()["progress"] == "loading weights on cpu"
        assert r.json()["percent"] == 10
        c = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": Q}]})
        assert c.status_code == 503 and c.json()["error"]["code"] == "model_loading"
        gate.set()
        for _ in range(200):
            if httpx.get(url + "/health").status_code == 200:
                break
            time.sleep(0.05)
        assert httpx.get(url + "/health").json()["status"] == "ok"
    finally:
        gate.set()
        userver.should_exit = True
        th.join(30)


def test_busy_port_is_a_one_line_error(engine_lib, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "spark_setup", "serve", "--foreground", "--demo", "--port",
                            str(port)], capture_output=True, text=True, timeout=60,
                           env=dict(os.environ, SPARK_SETUP_STATE_DIR=str(tmp_path)))
    assert r.returncode == 1
    assert f"127.0.0.1:{port}" in r.stderr and "Traceback" not in r.stderr


def test_accepted_connections_have_nagle_off():
    """serve() hands bind_socket()'s socket to uvicorn, which accepts on it with loop.create_server(sock=...).
    asyncio sets TCP_NODELAY only on accepted sockets whose proto is IPPROTO_TCP; with Nagle on, each response after
    the first on a kept-alive connection (the openai client, llama-benchy) waited ~40 ms for a delayed ACK."""
    import asyncio

    from spark_setup.engine.server import bind_socket

    async def main() -> int:
        seen: asyncio.Future = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport):
                sock = transport.get_extra_info("socket")
                seen.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        server = await asyncio.get_running_loop().create_server(Probe, sock=bind_socket("127.0.0.1", 0))
        port = server.sockets[0].getsockname()[1]
        _r, w = await asyncio.open_connection("127.0.0.1", port)
        try:
            return await asyncio.wait_for(seen, 10)
        finally:
            w.close()
            server.close()

    assert asyncio.run(main()) != 0


def test_a_model_that_cannot_load_exits_1_with_one_line(engine_lib, tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(demo_model_path().read_bytes()[:5000])  # truncated
    r = subprocess.run([sys.executable, "-m", "spark_setup", "serve", "--foreground", "--model", str(bad), "--port",
                        str(free_port())], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, SPARK_SETUP_STATE_DIR=str(tmp_path / "s")))
    assert r.returncode == 1
    err = [ln for ln in r.stderr.splitlines() if ln.startswith(("error:", "fix:"))]
    assert err[0].startswith(f"error: the server could not load {bad}") and "Traceback" not in r.stderr


def test_multi_turn_with_system_text(client, tok):
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "What is the capital of Italy?"},
                {"role": "assistant", "content": "The capital of Italy is Rome.", "reasoning_content": "old"},
                {"role": "user", "content": Q}]
    r = client.chat.completions.create(model="x", messages=messages, temperature=0, extra_body={"think": False})
    assert r.choices[0].message.content == "Paris"
    expected = chat.encode(tok, chat.parse_messages(messages), thinking=False)
    assert r.usage.prompt_tokens == len(expected)


# ---- Anthropic's Messages API (/v1/messages) and OpenAI's Responses API (/v1/responses), by their real clients ----
anthropic = pytest.importorskip("anthropic")
GREEDY = {"temperature": 0}  # anthropic 2.x has no temperature argument; the server still reads the field
REASONING = f"The user asks: {Q_PLAIN} The capital of France is Paris."


@pytest.fixture()
def claude(server):
    return anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0, timeout=120)


def user(text):
    return [{"role": "user", "content": text}]


def test_messages_answers_with_anthropic_usage_and_stop_reason(claude, tok):
    m = claude.messages.create(model="ds4-demo", max_tokens=20, messages=user(Q), thinking={"type": "disabled"},
                               extra_body=GREEDY)
    assert [(b.type, b.text) for b in m.content] == [("text", "Paris")]
    assert (m.role, m.stop_reason, m.stop_sequence) == ("assistant", "end_turn", None)
    assert m.usage.input_tokens == len(tok.encode(chat.render([chat.Message("user", Q)], thinking=False)))
    assert m.usage.output_tokens == len(tok.encode("Paris"))


def test_messages_thinking_comes_as_a_thinking_block_streamed_or_not(claude):
    m = claude.messages.create(model="ds4-demo", max_tokens=60, messages=user(Q), extra_body=GREEDY)
    assert [b.type for b in m.content] == ["thinking", "text"]
    assert (m.content[0].thinking, m.content[1].text) == (REASONING, "Paris")
    with claude.messages.stream(model="ds4-demo", max_tokens=60, messages=user(Q), extra_body=GREEDY) as s:
        kinds = [e.type for e in s if e.type not in ("text", "thinking")]  # the SDK's own derived events
        final = s.get_final_message()
    assert [(b.type, getattr(b, "thinking", None) or b.text) for b in final.content] == \
        [("thinking", REASONING), ("text", "Paris")]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert kinds.count("content_block_start") == kinds.count("content_block_stop") == 2
    assert final.usage.output_tokens == m.usage.output_tokens and final.stop_reason == "end_turn"


def test_messages_stop_sequences_max_tokens_and_system(claude):
    m = claude.messages.create(model="x", max_tokens=30, messages=user(Q_PLAIN), stop_sequences=["Paris", " is Par"],
                               thinking={"type": "disabled"}, extra_body=GREEDY)
    # " is Par" starts first, across three tokens: that is the one reported, and none of it is emitted
    assert (m.content[0].text, m.stop_reason, m.stop_sequence) == ("The capital of France", "stop_sequence", " is Par")
    with claude.messages.stream(model="x", max_tokens=3, messages=user(Q_PLAIN), thinking={"type": "disabled"},
                                extra_body=GREEDY) as s:
        cut = s.get_final_message()
    assert (cut.content[0].text, cut.stop_reason, cut.usage.output_tokens) == ("The capital of", "max_tokens", 3)
    turns = [{"role": "user", "content": "What is the capital of Italy?"},
             {"role": "assistant", "content": [{"type": "text", "text": "The capital of Italy is Rome."}]},
             {"role": "user", "content": [{"type": "text", "text": Q}]}]
    m = claude.messages.create(model="x", max_tokens=20, system="You are a helpful assistant.", messages=turns,
                               thinking={"type": "disabled"}, extra_body=GREEDY)
    assert m.content[0].text == "Paris"


def test_models_listing_serves_anthropic_clients_too(claude):
    page = claude.models.list()
    assert [(m.id, m.type, m.display_name) for m in page.data] == [("ds4-demo", "model", "ds4-demo")]
    assert page.data[0].created_at.year >= 2026 and page.has_more is False


def test_count_tokens_is_the_prompt_the_answer_used(claude, tok):
    kw = dict(model="x", system="You are a helpful assistant.", messages=user(Q), thinking={"type": "disabled"})
    counted = claude.messages.count_tokens(**kw).input_tokens
    assert counted == claude.messages.create(max_tokens=5, extra_body=GREEDY, **kw).usage.input_tokens
    thinking = claude.messages.count_tokens(model="x", messages=user(Q)).input_tokens  # thinking on by default
    assert thinking == len(chat.encode(tok, [chat.Message("user", Q)], thinking=True)) < counted


def test_messages_errors_come_in_anthropic_shape(claude, server):
    with pytest.raises(anthropic.BadRequestError, match="web_search_20250305"):  # a server tool: not ours to run
        claude.messages.create(model="x", max_tokens=5, messages=user("hi"),
                               tools=[{"type": "web_search_20250305", "name": "web_search"}])
    with pytest.raises(anthropic.BadRequestError, match="image"):
        claude.messages.create(model="x", max_tokens=5, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]}])
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0).messages.create(
            model="x", max_tokens=5, messages=user("hi"))
    r = httpx.post(server.url + "/v1/messages", headers={"x-api-key": KEY}, json={"model": "x", "messages": user("hi")})
    assert r.status_code == 400
    assert r.json() == {"type": "error", "error": {"type": "invalid_request_error", "message": "'max_tokens' is required"}}


def test_responses_answers_with_reasoning_item_and_usage(client, tok):
    r = client.responses.create(model="x", input=Q, temperature=0)
    assert [o.type for o in r.output] == ["reasoning", "message"]
    assert r.output[0].content[0].text == REASONING and r.output_text == "Paris" and r.status == "completed"
    assert r.usage.input_tokens == len(tok.encode(chat.render([chat.Message("user", Q)], thinking=True)))
    # the reasoning, its closing </think>, then the answer: all output tokens, all but the answer reasoning
    assert r.usage.output_tokens == len(tok.encode(REASONING + "</think>Paris"))
    assert r.usage.output_tokens_details.reasoning_tokens == r.usage.output_tokens - len(tok.encode("Paris"))
    off = client.responses.create(model="x", input=Q, temperature=0, reasoning={"effort": "none"})
    assert [o.type for o in off.output] == ["message"] and off.output_text == "Paris"
    assert (off.reasoning.effort, off.temperature, r.reasoning.effort, r.top_p) == ("none", 0, None, 1.0)
    assert off.usage.output_tokens_details.reasoning_tokens == 0


def test_responses_stream_matches_the_whole_response(client):
    whole = client.responses.create(model="x", input=Q, temperature=0)
    with client.responses.stream(model="x", input=Q, temperature=0) as s:
        events = list(s)
        final = s.get_final_response()
    assert final.output_text == whole.output_text and final.output[0].content[0].text == REASONING
    assert final.usage.output_tokens == whole.usage.output_tokens
    kinds = [e.type for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds[-1] == "response.completed" and kinds.count("response.output_item.done") == 2
    assert "response.reasoning_text.delta" in kinds and "response.output_text.delta" in kinds
    seqs = [e.sequence_number for e in events if hasattr(e, "sequence_number")]
    assert seqs == list(range(len(seqs)))


def test_responses_max_output_tokens_is_incomplete(client):
    r = client.responses.create(model="x", input=Q_PLAIN, temperature=0, max_output_tokens=3,
                                reasoning={"effort": "none"})
    assert (r.status, r.incomplete_details.reason, r.output_text) == ("incomplete", "max_output_tokens", "The capital of")
    events = list(client.responses.create(model="x", input=Q_PLAIN, temperature=0, max_output_tokens=3,
                                          reasoning={"effort": "none"}, stream=True))
    assert events[-1].type == "response.incomplete" and events[-1].response.status == "incomplete"


def test_responses_instructions_and_turns_equal_the_chat_endpoint(client):
    turns = [{"role": "user", "content": "What is the capital of Italy?"},
             {"role": "assistant", "content": [{"type": "output_text", "text": "The capital of Italy is Rome."}]},
             {"role": "user", "content": [{"type": "input_text", "text": UNTRAINED}]}]
    r = client.responses.create(model="x", instructions="You are a helpful assistant.", input=turns,
                                temperature=0, max_output_tokens=12, reasoning={"effort": "none"})
    c = client.chat.completions.create(
        model="x", temperature=0, max_tokens=12, extra_body={"think": False},
        messages=[{"role": "system", "content": "You are a helpful assistant."},
                  {"role": "user", "content": "What is the capital of Italy?"},
                  {"role": "assistant", "content": "The capital of Italy is Rome."},
                  {"role": "user", "content": UNTRAINED}])
    assert r.output_text == c.choices[0].message.content and r.usage.input_tokens == c.usage.prompt_tokens


def test_responses_refuses_what_it_cannot_do(client):
    for kw, what in ((dict(previous_response_id="resp_1"), "previous_response_id"),
                     (dict(tools=[{"type": "web_search"}]), "web_search"),
                     (dict(input=[{"type": "computer_call_output", "call_id": "c", "output": {}}]), "computer_call"),
                     (dict(max_output_tokens=0), "max_output_tokens")):
        with pytest.raises(openai.BadRequestError, match=what):
            client.responses.create(**{"model": "x", "input": "hi", **kw})


# ---- tool calls: the demo model was trained to call get_weather for "What is the weather in <city>?" (with the
# tool offered) and to answer from the tool's result (tools/make_demo_model.py); each API's real client runs both
# turns, streamed and not.
WEATHER = {"name": "get_weather", "description": "Current weather of a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
RESULTS = {"Paris": ('{"temperature_c": 18, "sky": "sunny"}', "It is 18 °C and sunny in Paris."),
           "Rome": ('{"temperature_c": 24, "sky": "cloudy"}', "It is 24 °C and cloudy in Rome.")}
WHY = "The user wants the weather in {}: I call get_weather."


def test_the_tool_fixture_is_the_one_the_demo_model_learned():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import make_demo_model

    assert make_demo_model.WEATHER_TOOL == WEATHER
    assert [(c, r, a) for c, r, a in make_demo_model.WEATHER] == [(c, *RESULTS[c]) for c in RESULTS]


@pytest.mark.parametrize("city, thinking", [("Paris", False), ("Rome", True)])
def test_chat_completions_tool_call_round_trip(client, city, thinking):
    tools = [{"type": "function", "function": WEATHER}]
    q = [{"role": "user", "content": f"What is the weather in {city}?"}]
    kw = dict(model="x", tools=tools, temperature=0, extra_body={"think": thinking})
    r = client.chat.completions.create(messages=q, **kw)
    msg, finish = r.choices[0].message, r.choices[0].finish_reason
    assert finish == "tool_calls" and msg.content is None
    assert [(c.type, c.function.name, json.loads(c.function.arguments)) for c in msg.tool_calls] == \
        [("function", "get_weather", {"city": city})]
    assert getattr(msg, "reasoning_content", None) == (WHY.format(city) if thinking else None)
    # streamed: the same call in a tool_calls delta, and none of the DSML block in the text
    calls, text = [], []
    for chunk in client.chat.completions.create(messages=q, stream=True, **kw):
        for ch in chunk.choices:
            calls += ch.delta.tool_calls or []
            text.append(ch.delta.content or "")
            finish = ch.finish_reason or finish
    assert [(c.index, c.function.name, c.function.arguments) for c in calls] == \
        [(0, "get_weather", msg.tool_calls[0].function.arguments)]
    assert "".join(text) == "" and finish == "tool_calls"
    # the second turn: the result goes back, the answer uses it
    back = {"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in msg.tool_calls]}
    if thinking:
        back["reasoning_content"] = msg.reasoning_content
    result, answer = RESULTS[city]
    r2 = client.chat.completions.create(
        messages=q + [back, {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": result}], **kw)
    assert (r2.choices[0].message.content, r2.choices[0].finish_reason) == (answer, "stop")


@pytest.mark.parametrize("city, thinking", [("Rome", False), ("Paris", True)])
def test_messages_tool_use_round_trip(claude, city, thinking):
    tools = [{"name": WEATHER["name"], "description": WEATHER["description"], "input_schema": WEATHER["parameters"]}]
    q = user(f"What is the weather in {city}?")
    kw = dict(model="x", max_tokens=100, tools=tools, extra_body=GREEDY,
              thinking={"type": "enabled", "budget_tokens": 64} if thinking else {"type": "disabled"})
    m = claude.messages.create(messages=q, **kw)
    expected = [("tool_use", "get_weather", {"city": city})]
    assert m.stop_reason == "tool_use"
    assert [(b.type, b.name, b.input) for b in m.content if b.type != "thinking"] == expected
    assert [b.thinking for b in m.content if b.type == "thinking"] == ([WHY.format(city)] if thinking else [])
    with claude.messages.stream(messages=q, **kw) as s:
        streamed = s.get_final_message()
    assert [(b.type, b.name, b.input) for b in streamed.content if b.type != "thinking"] == expected
    assert streamed.stop_reason == "tool_use" and streamed.content[-1].id.startswith("toolu_")
    # the second turn sends the whole assistant turn back (its thinking block too: with tools it stays in the prompt)
    turns = q + [{"role": "assistant", "content": [b.model_dump() for b in m.content]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": m.content[-1].id,
                                               "content": RESULTS[city][0]}]}]
    m2 = claude.messages.create(messages=turns, **kw)
    assert ([b.text for b in m2.content if b.type == "text"], m2.stop_reason) == ([RESULTS[city][1]], "end_turn")
    counted = claude.messages.count_tokens(model="x", messages=turns, tools=tools, thinking=kw["thinking"])
    assert counted.input_tokens == m2.usage.input_tokens


def test_responses_function_call_round_trip(client):
    tools = [{"type": "function", **WEATHER}]
    kw = dict(model="x", tools=tools, temperature=0, reasoning={"effort": "none"})
    r = client.responses.create(input="What is the weather in Paris?", **kw)
    assert [(o.type, o.name, json.loads(o.arguments)) for o in r.output] == [("function_call", "get_weather",
                                                                              {"city": "Paris"})]
    with client.responses.stream(input="What is the weather in Paris?", **kw) as s:
        kinds = [e.type for e in s]
        final = s.get_final_response()
    assert [(o.type, o.name, o.arguments) for o in final.output] == [("function_call", "get_weather",
                                                                      r.output[0].arguments)]
    assert "response.function_call_arguments.done" in kinds and kinds[-1] == "response.completed"
    call = r.output[0]
    r2 = client.responses.create(input=[
        {"role": "user", "content": "What is the weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": RESULTS["Paris"][0]}], **kw)
    assert r2.output_text == RESULTS["Paris"][1] and r2.status == "completed"


def test_tool_choice_none_offers_no_tools(client, tok):
    q = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.chat.completions.create(model="x", messages=q, tools=[{"type": "function", "function": WEATHER}],
                                       tool_choice="none", temperature=0, max_tokens=8, extra_body={"think": False})
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(tok.encode(chat.render([chat.Message("user", q[0]["content"])],
                                                               thinking=False)))
