"""`spark-setup download` / `models` as real processes against the fake hub: kill/resume, signals, exit codes,
one-line errors, a concurrent second run, and a full disk (tmpfs)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fakehub import FakeHub

from spark_setup import catalog

REPO = catalog.REPO
BASE = catalog.VARIANTS["q2-imatrix"].file
MTP = catalog.VARIANTS["mtp"].file
MiB = 1024 * 1024


def blob(n: int, seed: int) -> bytes:
    return hashlib.shake_256(seed.to_bytes(4, "little")).digest(n)


@pytest.fixture
def hub():
    with FakeHub() as h:
        yield h


@pytest.fixture
def env(hub, tmp_path):
    e = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "SPARK_SETUP_"))}
    e.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf-home"), SPARK_SETUP_PREFIX=str(tmp_path / "prefix"),
             SPARK_SETUP_CONFIG=str(tmp_path / "none.toml"), SPARK_SETUP_READ_TIMEOUT="3",
             SPARK_SETUP_LOG_INTERVAL="0.2")
    return e


def cli(env, *args, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "spark_setup", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def run_cli(env, *args, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spark_setup", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def models_dir(env) -> Path:
    return Path(env["SPARK_SETUP_PREFIX"]) / "models"


def sidecar_done(path: Path) -> int:
    try:
        return sum(b - a for a, b in json.loads(path.read_text())["completed"])
    except (OSError, ValueError, KeyError):
        return 0


def wait_for(pred, timeout=60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return False


def settled(read, quiet=0.6, timeout=20.0):
    """The value of read() once it stopped changing for `quiet` seconds."""
    value, since, end = read(), time.monotonic(), time.monotonic() + timeout
    while time.monotonic() < end:
        time.sleep(0.1)
        now = read()
        if now != value:
            value, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
    return value


def one_line_error(proc) -> None:
    err = proc.stderr
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith(("error:", "fix:"))]
    assert lines and lines[0].startswith("error:"), err


def test_sigkill_then_resume_refetches_at_most_one_range_per_connection(hub, env):
    data = blob(8 * MiB, 1)
    hub.add_file(REPO, BASE, data)
    hub.rate = 1.5 * MiB  # per connection: ~1.4 s for the whole file over 4 connections
    side = models_dir(env) / (BASE + ".part.json")
    p = cli(env, "download", "--connections", "4", "--json")
    try:
        assert wait_for(lambda: sidecar_done(side) >= 3 * MiB, timeout=90), p.poll()
    finally:
        p.kill()
        p.wait()
    assert p.returncode == -signal.SIGKILL
    sent1 = settled(lambda: hub.bytes_sent(REPO, BASE))  # the server's threads notice the dead sockets
    done1 = sidecar_done(side)
    chunk = json.loads(side.read_text())["chunk_size"]
    assert 0 < done1 < len(data)
    hub.rate = None
    r = run_cli(env, "download", "--connections", "4", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    dest = Path(out["files"][0]["path"])
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()
    assert out["files"][0]["status"] == "downloaded" and not side.exists()
    sent2 = hub.bytes_sent(REPO, BASE) - sent1
    assert sent2 == len(data) - done1  # continued from the sidecar: only what it did not vouch for
    assert sent1 + sent2 - len(data) <= 4 * chunk  # bytes fetched twice: at most one range per connection
    assert "resuming at" in r.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_progress_exits_128_plus_signal_and_resumes(hub, env, sig):
    data = blob(6 * MiB, 2)
    hub.add_file(REPO, BASE, data)
    hub.rate = 1 * MiB
    side = models_dir(env) / (BASE + ".part.json")
    p = cli(env, "download", "--connections", "2")
    assert wait_for(lambda: sidecar_done(side) >= MiB)
    p.send_signal(sig)
    _, err = p.communicate(timeout=20)
    assert p.returncode == 128 + sig, err  # 143 for SIGTERM, 130 for Ctrl-C
    assert f"interrupted by {sig.name}" in err and "run the same command again to resume" in err
    assert "Traceback" not in err
    assert sidecar_done(side) >= MiB and (models_dir(env) / (BASE + ".part")).exists()
    hub.rate = None
    r = run_cli(env, "download", "--connections", "2")
    assert r.returncode == 0, r.stderr
    assert (models_dir(env) / BASE).read_bytes() == data
    assert "downloaded and verified" in r.stdout
    again = run_cli(env, "download")
    assert again.returncode == 0 and "verified, nothing to do" in again.stdout


def test_a_concurrent_second_run_refuses_and_the_first_completes(hub, env):
    data = blob(3 * MiB, 3)
    hub.add_file(REPO, BASE, data)
    hub.rate = MiB // 4  # ~6 s: the second run starts while the first holds the lock
    side = models_dir(env) / (BASE + ".part.json")
    first = cli(env, "download", "--connections", "2")
    assert wait_for(side.exists)
    second = run_cli(env, "download", "--connections", "2")
    assert second.returncode == 1
    one_line_error(second)
    assert f"another spark-setup download of {BASE} is running (pid {first.pid})" in second.stderr
    out, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    assert (models_dir(env) / BASE).read_bytes() == data


def test_cli_errors_are_one_line_with_a_fix(hub, env):
    hub.add_file(REPO, BASE, blob(1000, 4), gated=True)
    r = run_cli(env, "download")
    assert r.returncode == 1
    one_line_error(r)
    assert "needs a Hugging Face token" in r.stderr and "HF_TOKEN" in r.stderr
    ok = run_cli({**env, "HF_TOKEN": hub.token}, "download", "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout)["files"][0]["size"] == 1000
    hub.add_file("someone/open", "here.gguf", blob(10, 4))
    r = run_cli(env, "download", "--repo", "someone/open", "--file", "nope.gguf", "--revision", "main")
    assert r.returncode == 1 and "nope.gguf not found" in r.stderr and "'main'" in r.stderr
    for args, needle in ((["download", "--connections", "0"], "--connections must be 1-32"),
                         (["download", "--repo", REPO], "--repo and --file go together"),
                         (["download", "--variant", "q3"], "unknown variant 'q3'"),
                         (["download", "--pins", "/nonexistent.json"], "pins file /nonexistent.json does not exist")):
        r = run_cli(env, *args)
        assert r.returncode == 2, (args, r.stderr)
        one_line_error(r)
        assert needle in r.stderr


def test_models_lists_variants_disk_state_and_pins(hub, env):
    data = blob(2000, 5)
    commit = hub.add_file(REPO, BASE, data)
    assert run_cli(env, "download", "--json").returncode == 0
    r = run_cli(env, "models", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    rows = {v["name"]: v for v in out["variants"]}
    assert rows["q2-imatrix"]["state"] == "verified" and rows["q2-imatrix"]["current"]
    assert rows["q2-imatrix"]["pin"]["commit"] == commit
    assert rows["q2"]["state"] == "missing" and rows["q2"]["pin"] is None
    assert out["pins"][0]["sha256"] == hashlib.sha256(data).hexdigest()
    table = run_cli({**env, "COLUMNS": "200"}, "models")
    assert table.returncode == 0 and commit[:10] in table.stdout and "verified" in table.stdout


@pytest.fixture
def tmpfs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_full_midway_keeps_everything_and_says_how_much(hub, env, tmpfs):
    base, mtp = blob(3 * MiB, 6), blob(2 * MiB, 7)
    hub.add_file(REPO, BASE, base)
    hub.add_file(REPO, MTP, mtp)
    hub.rate = 1 * MiB
    env = {**env, "SPARK_SETUP_MODELS_DIR": str(tmpfs)}
    p = cli(env, "download", "--with-mtp", "--connections", "2")
    assert wait_for((tmpfs / (BASE + ".part")).exists)
    (tmpfs / "filler").write_bytes(b"\0" * (int(2.7 * MiB)))  # someone else fills the disk meanwhile
    _, err = p.communicate(timeout=60)
    assert p.returncode == 1, err
    assert "Traceback" not in err and "disk full at" in err and "more needed" in err
    assert (tmpfs / BASE).read_bytes() == base  # the finished file is intact and verified
    (tmpfs / "filler").unlink()
    hub.rate = None
    r = run_cli(env, "download", "--with-mtp", "--json")
    assert r.returncode == 0, r.stderr
    status = {f["label"]: f["status"] for f in json.loads(r.stdout)["files"]}
    assert status == {"q2-imatrix": "verified", "mtp": "downloaded"}
    assert (tmpfs / MTP).read_bytes() == mtp


def test_disk_too_small_up_front(hub, env, tmpfs):
    hub.add_file(REPO, BASE, blob(7 * MiB, 8))
    r = run_cli({**env, "SPARK_SETUP_MODELS_DIR": str(tmpfs)}, "download")
    assert r.returncode == 1
    one_line_error(r)
    assert f"not enough disk at {tmpfs}" in r.stderr and "7.00 MiB still to fetch" in r.stderr
