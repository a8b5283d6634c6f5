"""The server's real lifecycle under a real systemd (booted in a container, see tests/nspawn.py):
`serve --enable` installs and starts the unit with the demo model; READY=1 only after the model loaded; /health
200; kill -9 -> systemd restarts it; re-enable restarts in place (never a second server); `stop` -> clean exit;
a missing model file -> ExecStartPre fails with a clear journal line; a foreign process on the port is reported
with its PID; `uninstall` removes the unit and the service user.

Needs root, systemd-nspawn and debootstrap (tools/test.sh installs them); the Debian root is cached under
/var/cache/spark-setup (first run: about a minute of debootstrap)."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

import nspawn

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

UNIT = "spark-setup.service"
PORT = 8000
URL = f"http://127.0.0.1:{PORT}"
CLI = str(Path(sys.executable).parent / "spark-setup")

_why = nspawn.unavailable()
if _why:
    pytestmark.append(pytest.mark.skip(reason=_why))


@pytest.fixture(scope="module")
def box(engine_build):
    root = nspawn.prepare_root()
    why = nspawn.venv_mismatch(root)
    if why:
        pytest.skip(why)
    # Not under /tmp or /var/tmp: the unit's PrivateTmp would hide it (service.private_tmp turns it off then).
    base = Path("/var/cache/spark-setup")
    base.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="run-", dir=base))
    scratch.chmod(0o755)
    c = nspawn.Container(root, [nspawn.REPO, *nspawn.python_home_binds()], [scratch], scratch / "boot.log")
    c.scratch = scratch
    c.prefix = scratch / "prefix"
    c.env = {"DS4_ENGINE_LIB": str(engine_build.lib_path), "SPARK_SETUP_CONFIG": str(scratch / "none.toml")}
    with c:
        yield c
    shutil.rmtree(scratch, ignore_errors=True)


# The demo model; SPARK_SETUP_TEST_NSPAWN_MODEL=FILE serves another GGUF instead (for debugging the harness).
MODEL_ARGS = (["--model", os.environ["SPARK_SETUP_TEST_NSPAWN_MODEL"]] if os.environ.get("SPARK_SETUP_TEST_NSPAWN_MODEL")
              else ["--demo"])


def enable(box, timeout=300):
    return box.run([CLI, "serve", "--enable", "--system", *MODEL_ARGS, "--prefix", str(box.prefix)], env=box.env,
                   timeout=timeout)


def wait_for(pred, timeout_s: float, what: str, poll_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what} (last: {last!r})")


def listeners(box, port: int) -> list[int]:
    """PIDs listening on `port` inside the container."""
    cp = box.run([sys.executable, "-c",
                  "import psutil, json; print(json.dumps(sorted({c.pid for c in psutil.net_connections('inet') "
                  f"if c.status == 'LISTEN' and c.laddr.port == {port}}})))"], check=True)
    return json.loads(cp.stdout)


def test_enable_ready_restart_stop(box):
    # 1. serve --enable installs, starts and follows readiness to /health 200, then prints the URL.
    cp = enable(box)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert f"ready: {URL}" in cp.stdout and "curl" in cp.stdout, cp.stdout
    assert "created the system user spark-setup" in cp.stdout
    props = box.show(UNIT, "ActiveState", "SubState", "MainPID", "StatusText", "NRestarts", "UnitFileState")
    assert props["ActiveState"] == "active" and props["UnitFileState"] == "enabled", props
    assert props["StatusText"].startswith("ready"), props  # the server's STATUS= reached systemd
    pid = int(props["MainPID"])
    assert box.run(["ps", "-o", "user=", "-p", str(pid)]).stdout.strip() == "spark-setup"
    assert box.http_status(URL + "/health") == 200
    rec = json.loads(box.run(["cat", f"{box.prefix}/state/receipt.json"], check=True).stdout)
    assert rec["service"]["units"] == ["/etc/systemd/system/spark-setup.service", "/etc/spark-setup/server.env"]

    # 2. READY=1 only after the model loaded: systemd logs "Started" after the server's "ready" line, and a
    #    blocking restart returns only when /health already answers 200 (no retry).
    journal = box.journal(UNIT)
    ready_at = journal.find("ready: model")
    started_at = journal.find("Started spark-setup.service")
    assert 0 <= ready_at < started_at, journal[-3000:]
    assert box.run(["systemctl", "restart", UNIT], timeout=300).returncode == 0
    assert box.http_status(URL + "/health") == 200

    # 3. kill -9 of the server: Restart=on-failure starts it again (after RestartSec=10).
    pid = int(box.show(UNIT, "MainPID")["MainPID"])
    restarts = int(box.show(UNIT, "NRestarts")["NRestarts"])
    box.run(["kill", "-9", str(pid)], check=True)
    props = wait_for(lambda: (p := box.show(UNIT, "ActiveState", "MainPID", "NRestarts"))
                     and p["ActiveState"] == "active" and int(p["NRestarts"]) > restarts
                     and int(p["MainPID"]) not in (0, pid) and p, 60, "the restart after kill -9")
    assert wait_for(lambda: box.http_status(URL + "/health") == 200, 60, "/health 200 after the restart")
    assert "Scheduled restart job" in box.journal(UNIT)

    # 4. status sees it.
    cp = box.run([CLI, "status", "--json", "--prefix", str(box.prefix)], env=box.env)
    st = json.loads(cp.stdout)
    assert st["mode"] == "system" and st["healthy"] and st["pid"] == int(props["MainPID"]), st
    assert st["uptime_s"] is not None and st["model"]
    logs = box.run([CLI, "logs", "-n", "200", "--prefix", str(box.prefix)], env=box.env)
    assert logs.returncode == 0 and "ready: model" in logs.stdout and "spark-setup[" in logs.stdout, logs.stdout

    # 5. enabling again restarts in place: unchanged files, still exactly one listener on the port.
    cp = enable(box)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert "unchanged" in cp.stdout and "restarted the system unit" in cp.stdout, cp.stdout
    assert len(listeners(box, PORT)) == 1

    # 6. stop: a clean exit (no failure recorded).
    cp = box.run([CLI, "stop", "--prefix", str(box.prefix)], env=box.env)
    assert cp.returncode == 0 and "stopped system unit" in cp.stdout, cp.stdout + cp.stderr
    props = box.show(UNIT, "ActiveState", "Result", "ExecMainStatus")
    assert props["ActiveState"] == "inactive" and props["Result"] == "success", props
    assert box.http_status(URL + "/health") is None


def test_missing_model_fails_in_execstartpre_with_a_clear_line(box):
    env_file = Path("/etc/spark-setup/server.env")
    cp = box.run(["sed", "-i", "s|^SPARK_SETUP_MODEL=.*|SPARK_SETUP_MODEL=/nonexistent/gone.gguf|", str(env_file)])
    assert cp.returncode == 0, cp.stderr
    box.run(["systemctl", "reset-failed", UNIT])
    cp = box.run(["systemctl", "start", UNIT], timeout=120)
    assert cp.returncode != 0
    journal = box.journal(UNIT)
    assert "spark-setup: model file /nonexistent/gone.gguf is missing or unreadable" in journal, journal[-2000:]
    assert "run spark-setup download" in journal
    assert box.show(UNIT, "ActiveState")["ActiveState"] in ("failed", "activating")  # activating = auto-restart
    box.run(["systemctl", "stop", UNIT])
    box.run(["systemctl", "reset-failed", UNIT])


def test_foreign_process_on_the_port_is_reported_not_killed(box):
    squatter = box.popen([sys.executable, "-m", "http.server", str(PORT), "--bind", "127.0.0.1"])
    pids: list[int] = []
    try:
        pids = wait_for(lambda: listeners(box, PORT), 20, "the squatter to listen")
        cp = enable(box)
        assert cp.returncode == 1, cp.stdout + cp.stderr
        msg = cp.stdout + cp.stderr
        assert re.search(rf"port {PORT} is in use by PID {pids[0]}\b", msg), msg
        assert squatter.poll() is None and listeners(box, PORT) == pids  # left alone
    finally:
        for pid in pids:  # nsenter forked it into the container's PID namespace: kill it there
            box.run(["kill", str(pid)])
        squatter.kill()
        squatter.wait(10)
        wait_for(lambda: not listeners(box, PORT), 20, "the squatter to go")


def test_uninstall_removes_unit_and_user(box):
    cp = enable(box)  # back to a running, healthy unit first
    assert cp.returncode == 0, cp.stdout + cp.stderr
    cp = box.run([CLI, "uninstall", "--yes", "--prefix", str(box.prefix)], env=box.env, timeout=300)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert "/etc/systemd/system/spark-setup.service" in cp.stdout and "system user spark-setup" in cp.stdout
    assert box.show(UNIT, "LoadState")["LoadState"] == "not-found"
    assert box.run(["getent", "passwd", "spark-setup"]).returncode != 0
    assert box.run(["test", "-e", "/etc/spark-setup/server.env"]).returncode != 0
    assert box.http_status(URL + "/health") is None


def test_user_scope_under_a_lingering_user_manager(box):
    """`serve --enable --user` for a user without sudo: a user unit under that user's systemd (linger on)."""
    assert box.run(["useradd", "-m", "-s", "/bin/bash", "alice"]).returncode == 0
    assert box.run(["loginctl", "enable-linger", "alice"]).returncode == 0
    uid = box.run(["id", "-u", "alice"], check=True).stdout.strip()
    wait_for(lambda: box.run(["systemctl", "is-active", f"user@{uid}.service"]).stdout.strip() == "active", 60,
             "alice's user manager")
    prefix = box.scratch / "alice"
    box.run(["install", "-d", "-o", "alice", str(prefix)], check=True)
    env = {**box.env, "HOME": "/home/alice", "USER": "alice", "XDG_RUNTIME_DIR": f"/run/user/{uid}"}

    def as_alice(*argv, timeout=300):
        return box.run(["runuser", "-u", "alice", "--", *argv], env=env, timeout=timeout)

    cp = as_alice(CLI, "serve", "--enable", "--user", *MODEL_ARGS, "--prefix", str(prefix))
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert "started the user unit" in cp.stdout and f"ready: {URL}" in cp.stdout
    props = as_alice("systemctl", "--user", "show", UNIT, "--property=ActiveState", "--property=MainPID").stdout
    assert "ActiveState=active" in props, props
    pid = re.search(r"MainPID=(\d+)", props).group(1)
    assert box.run(["ps", "-o", "user=", "-p", pid]).stdout.strip() == "alice"
    assert box.http_status(URL + "/health") == 200
    cp = as_alice(CLI, "uninstall", "--yes", "--prefix", str(prefix))
    assert cp.returncode == 0 and "/home/alice/.config/systemd/user/spark-setup.service" in cp.stdout, cp.stdout
    assert box.http_status(URL + "/health") is None
    assert box.run(["test", "-e", "/home/alice/.config/systemd/user/spark-setup.service"]).returncode != 0


def test_install_demo_serves_through_the_unit_and_reruns_skip(box):
    """`install --demo` where systemd is PID 1: doctor -> demo model -> CPU engine build (in the container) ->
    smoke -> the system unit; a re-run skips every step; uninstall --purge leaves nothing in the prefix."""
    if box.run(["sh", "-c", "command -v c++"]).returncode != 0:
        pytest.skip("the cached container root has no C++ compiler (rebuild it: tools/nspawn_root.sh)")
    prefix = box.scratch / "inst"
    env = {k: v for k, v in box.env.items() if k != "DS4_ENGINE_LIB"}  # install builds and uses its own engine
    cp = box.run([CLI, "install", "--demo", "--yes", "--prefix", str(prefix)], env=env, timeout=600)
    out = cp.stdout + cp.stderr
    assert cp.returncode == 0, out[-4000:]
    for step in ("doctor", "download", "build", "smoke", "serve"):
        assert re.search(rf"done {step} \(", cp.stdout), (step, out[-4000:])
    assert "serving via the system unit" in cp.stdout and f"ready: {URL}" in cp.stdout
    props = box.show(UNIT, "ActiveState", "MainPID")
    assert props["ActiveState"] == "active" and box.http_status(URL + "/health") == 200
    env_file = box.run(["cat", "/etc/spark-setup/server.env"], check=True).stdout
    assert f"DS4_ENGINE_LIB={prefix}/engine/" in env_file  # the unit runs the engine install just built

    again = box.run([CLI, "install", "--demo", "--yes", "--prefix", str(prefix)], env=env, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    for step in ("doctor", "download", "build", "smoke", "serve"):
        m = re.search(rf"skipped {step} \((\d+\.\d+) s\)", again.stdout)
        assert m and float(m.group(1)) < 1.0, (step, again.stdout)
    assert box.show(UNIT, "MainPID")["MainPID"] == props["MainPID"]  # the same server, untouched

    # A smoke test that must run again (here: its record dropped) first stops the running server (one model in
    # memory at a time), then the serve step starts it again.
    rpath = f"{prefix}/state/receipt.json"
    rec = json.loads(box.run(["cat", rpath], check=True).stdout)
    del rec["smoke"]
    box.run([sys.executable, "-c", f"import json,sys; open({rpath!r},'w').write(sys.argv[1])", json.dumps(rec)],
            check=True)
    third = box.run([CLI, "install", "--demo", "--yes", "--prefix", str(prefix)], env=env, timeout=300)
    assert third.returncode == 0, third.stdout + third.stderr
    assert re.search(r"done smoke \(", third.stdout) and re.search(r"done serve \(", third.stdout), third.stdout
    assert "stopped the running server (system) for the smoke test" in third.stdout
    props = box.show(UNIT, "ActiveState", "MainPID")
    assert props["ActiveState"] == "active" and box.http_status(URL + "/health") == 200

    un = box.run([CLI, "uninstall", "--purge", "--yes", "--prefix", str(prefix)], env=env, timeout=300)
    assert un.returncode == 0, un.stdout + un.stderr
    assert box.show(UNIT, "LoadState")["LoadState"] == "not-found"
    assert box.run(["test", "-e", str(prefix)]).returncode != 0
