"""Service and install pieces that need no systemd: port owners, the refusal without systemd, the detached
server's pid file, the receipt, and what uninstall removes and keeps (real files, real processes)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spark_setup import install, receipt, service
from spark_setup.errors import UserError
from spark_setup.settings import load_settings


def _settings(prefix: Path, **kw):
    return load_settings({"prefix": prefix, **kw}, env={}, config_file=Path("/nonexistent/spark-setup.toml"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def squatter():
    """A real foreign process listening on a loopback port."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.1)
    yield proc, port
    proc.kill()
    proc.wait(10)


def test_port_owner_names_the_pid(squatter):
    proc, port = squatter
    owner = service.port_owner(port)
    assert owner is not None and owner.pid == proc.pid
    assert f"PID {proc.pid}" in owner.describe() and "http.server" in owner.describe()
    assert service.port_owner(_free_port()) is None


@pytest.mark.skipif(service.systemd_booted(), reason="this host runs systemd as PID 1")
def test_enable_refuses_without_systemd(tmp_path):
    s = _settings(tmp_path / "p")
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    plan = service.plan_enable(s, scope="user", model=model, engine_lib=None, exec_path=Path(sys.executable))
    with pytest.raises(UserError) as ei:
        service.enable(s, plan)
    assert "systemd is not running as PID 1" in ei.value.message
    assert "serve --foreground" in ei.value.hint
    assert not plan.spec.unit_path.exists()  # nothing written


def test_dry_run_plan_diffs_without_writing(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    s = _settings(tmp_path / "p")
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    plan = service.plan_enable(s, scope="user", model=model, exec_path=Path(sys.executable))
    assert plan.changed and all(d.startswith("--- /dev/null") for d in plan.diffs.values())
    assert not any(p.exists() for p in plan.files)
    for p, text in plan.files.items():  # as if installed: the next plan is unchanged
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    again = service.plan_enable(s, scope="user", model=model, exec_path=Path(sys.executable))
    assert not again.changed
    s2 = _settings(tmp_path / "p", port=9001)
    moved = service.plan_enable(s2, scope="user", model=model, exec_path=Path(sys.executable))
    assert moved.changed and "+SPARK_SETUP_PORT=9001" in moved.diffs[moved.spec.env_path]


def test_service_user_falls_back_to_the_owner_of_a_private_home():
    import pwd
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(dir="/var/tmp"))  # /tmp/pytest-of-root is private itself
    try:
        base.chmod(0o755)
        home = base / "home"
        (home / "venv").mkdir(parents=True)
        home.chmod(0o755)
        user, _ = service.choose_service_user([home / "venv"], base)
        assert user == service.SERVICE_USER
        home.chmod(0o700)  # a private home: the dedicated user cannot reach the venv
        with pytest.raises(UserError, match="cannot read"):  # owned by root: no fallback to root
            service.choose_service_user([home / "venv"], base)
        nobody = pwd.getpwnam("nobody")
        os.chown(base, nobody.pw_uid, nobody.pw_gid)
        user, why = service.choose_service_user([home / "venv"], base)
        assert user == "nobody" and "cannot read" in why
    finally:
        shutil.rmtree(base)


def test_receipt_roundtrip_and_damage(tmp_path):
    s = _settings(tmp_path / "p")
    assert receipt.load(s) == {}
    path = receipt.save(s, {"variant": "demo", "files": [{"path": "/x", "sha256": "ab"}]})
    data = json.loads(path.read_text())
    assert data["schema_version"] == receipt.SCHEMA_VERSION and data["versions"]["spark_setup"]
    assert receipt.load(s)["variant"] == "demo"
    path.write_text("{not json")
    assert receipt.load(s) == {}


def _fake_install(prefix: Path, models: Path) -> dict[str, Path]:
    """A prefix laid out the way install.sh and install leave it (real files)."""
    from spark_setup.catalog import VARIANTS

    paths = {
        "venv": prefix / "venv" / "bin" / "python",
        "engine": prefix / "engine" / "abc" / "libds4engine.so",
        "bin": prefix / "bin" / "spark-setup",
        "receipt": prefix / "state" / "receipt.json",
        "pins": prefix / "state" / "pins.json",
        "log": prefix / "state" / "logs" / "server.log",
        "model": models / VARIANTS["q2-imatrix"].file,
        "partial": models / (VARIANTS["mtp"].file + ".part"),
        "mine": models / "my-own-notes.txt",
    }
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x" * 10)
    return paths


def test_uninstall_keeps_models_without_purge(tmp_path):
    prefix = tmp_path / "p"
    s = _settings(prefix)
    paths = _fake_install(prefix, s.models_dir)
    plan = install.plan_uninstall(s, purge=False)
    removed, kept, _ = install.uninstall(s, plan)
    for k in ("venv", "engine", "bin", "receipt", "log"):
        assert not paths[k].exists(), k
    for k in ("model", "partial", "pins", "mine"):
        assert paths[k].exists(), k
    assert any(str(s.models_dir) in k for k in kept)


def test_uninstall_purge_removes_our_models_only(tmp_path):
    prefix = tmp_path / "p"
    s = _settings(prefix, models_dir=tmp_path / "models")
    paths = _fake_install(prefix, s.models_dir)
    install.uninstall(s, install.plan_uninstall(s, purge=True))
    assert not prefix.exists()  # nothing left behind in the prefix
    assert not paths["model"].exists() and not paths["partial"].exists()
    assert paths["mine"].exists()  # not ours: never deleted


def _cli(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "SPARK_SETUP_CONFIG": str(tmp_path / "none.toml"), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "spark_setup", *args], capture_output=True, text=True, env=env,
                          timeout=120, stdin=subprocess.DEVNULL)


@pytest.mark.skipif(service.systemd_booted(), reason="this host runs systemd as PID 1")
def test_cli_serve_enable_refuses_without_systemd(tmp_path):
    out = _cli("serve", "--enable", "--demo", "--prefix", str(tmp_path / "p"), tmp_path=tmp_path)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "systemd is not running as PID 1" in out.stderr and "spark-setup serve --foreground --demo" in out.stderr


def test_cli_usage_errors_and_prompts(tmp_path):
    p = str(tmp_path / "p")
    out = _cli("install", "--system", "--user", "--prefix", p, tmp_path=tmp_path)
    assert out.returncode == 2 and "contradict" in out.stderr
    out = _cli("install", "--demo", "--with-mtp", "--prefix", p, tmp_path=tmp_path)
    assert out.returncode == 2 and "MTP" in out.stderr
    out = _cli("serve", "--enable", "--user", "--system", "--prefix", p, tmp_path=tmp_path)
    assert out.returncode == 2
    # uninstall asks first; without a terminal and without --yes it refuses and removes nothing
    (tmp_path / "p" / "engine").mkdir(parents=True)
    out = _cli("uninstall", "--prefix", p, tmp_path=tmp_path)
    assert out.returncode == 1 and "--yes" in out.stderr and (tmp_path / "p" / "engine").is_dir()
