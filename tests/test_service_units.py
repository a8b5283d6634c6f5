"""The rendered systemd units: every variant passes `systemd-analyze verify` with zero output, the system unit's
hardening scores <= 3.0 offline, the committed systemd/ matches a fresh rendering, and the derived values
(timeout, ProtectHome, loopback firewall, MTP) follow their inputs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from spark_setup import service
from spark_setup.errors import UsageError
from spark_setup.settings import load_settings

ROOT = Path(__file__).resolve().parent.parent
EXE = Path(sys.executable).parent / "spark-setup"  # a real executable: verify exits 1 when ExecStart's is missing

needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")


def _settings(prefix: Path, **kw):
    flags = {"prefix": prefix, **kw}
    return load_settings(flags, env={}, config_file=Path("/nonexistent/spark-setup.toml"))


def _model(path: Path, size: int = 4096) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * size)
    return path


VARIANTS = {
    "system": dict(scope="system", mtp=False, flags={}),
    "system-mtp": dict(scope="system", mtp=True, flags={}),
    "user": dict(scope="user", mtp=False, flags={}),
    "user-mtp": dict(scope="user", mtp=True, flags={}),
    "system-custom": dict(scope="system", mtp=True, flags={"port": 9123, "host": "0.0.0.0"}, custom=True),
    "user-custom": dict(scope="user", mtp=False, flags={"port": 18080, "host": "192.0.2.7"}, custom=True),
}


def _render(tmp_path: Path, name: str) -> tuple[service.UnitSpec, dict[Path, str]]:
    v = VARIANTS[name]
    prefix = tmp_path / "prefix"
    flags = dict(v["flags"])
    if v.get("custom"):
        flags.update(models_dir=tmp_path / "elsewhere" / "models", state_dir=tmp_path / "var" / "state")
    s = _settings(prefix, **flags)
    model = _model(s.models_dir / "base.gguf")
    mtp = _model(s.models_dir / "draft.gguf") if v["mtp"] else None
    spec = service.unit_spec(s, scope=v["scope"], model=model, mtp=mtp, exec_path=EXE, home=tmp_path / "home",
                             engine_lib=tmp_path / "engine" / "libds4engine.so")
    return spec, service.render_units(spec)


def _write_unit(tmp_path: Path, spec: service.UnitSpec, files: dict[Path, str]) -> Path:
    d = tmp_path / "units"
    d.mkdir(exist_ok=True)
    unit = d / service.UNIT_NAME
    unit.write_text(files[spec.unit_path])
    return unit


@needs_analyze
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_variant_verifies_with_zero_output(tmp_path, name):
    spec, files = _render(tmp_path, name)
    unit = _write_unit(tmp_path, spec, files)
    env = dict(os.environ)
    argv = ["systemd-analyze"]
    if spec.scope == "user":
        argv.append("--user")
        rt = tmp_path / "xdg"
        rt.mkdir(mode=0o700)
        env["XDG_RUNTIME_DIR"] = str(rt)
    cp = subprocess.run(argv + ["verify", str(unit)], capture_output=True, text=True, env=env, timeout=60)
    out = (cp.stdout + cp.stderr).strip()
    assert cp.returncode == 0 and out == "", f"systemd-analyze verify on {name}:\n{out}\n--- unit ---\n{unit.read_text()}"


@needs_analyze
def test_verify_catches_a_missing_executable(tmp_path):
    # The check above must be able to fail: a unit whose ExecStart does not exist is rejected.
    spec, files = _render(tmp_path, "system")
    unit = _write_unit(tmp_path, spec, files)
    unit.write_text(unit.read_text().replace(str(EXE), str(tmp_path / "no-such-spark-setup")))
    cp = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert cp.returncode != 0 or (cp.stdout + cp.stderr).strip()


def _exposure(unit: Path) -> float:
    cp = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(unit)],
                        capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", cp.stdout)
    assert m, cp.stdout + cp.stderr
    return float(m.group(1))


@needs_analyze
@pytest.mark.parametrize("name", ["system", "system-mtp", "system-custom"])
def test_system_unit_exposure_at_most_3(tmp_path, name, capsys):
    spec, files = _render(tmp_path, name)
    score = _exposure(_write_unit(tmp_path, spec, files))
    with capsys.disabled():
        print(f"\n[{name}] systemd-analyze security --offline=yes: exposure {score}")
    assert score <= 3.0


@needs_analyze
def test_committed_system_unit_exposure(capsys):
    # The default rendering (prefix /opt/spark-setup: PrivateTmp and ProtectHome fully on).
    score = _exposure(ROOT / "systemd" / "system" / service.UNIT_NAME)
    with capsys.disabled():
        print(f"\n[systemd/system/{service.UNIT_NAME}] systemd-analyze security --offline=yes: exposure {score}")
    assert score <= 3.0


def test_committed_units_match_a_fresh_rendering():
    cp = subprocess.run([sys.executable, str(ROOT / "tools" / "render_units.py"), "--check"], capture_output=True,
                        text=True, timeout=60)
    assert cp.returncode == 0, f"systemd/ is stale; run tools/render_units.py\n{cp.stdout}{cp.stderr}"
    rendered = service.render_canonical()
    assert sorted(rendered) == sorted(str(p.relative_to(ROOT / "systemd")) for p in (ROOT / "systemd").rglob("*")
                                      if p.is_file())


def _directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            k, _, v = line.partition("=")
            out.setdefault(k, []).append(v)
    return out


def test_system_unit_contents(tmp_path):
    spec, files = _render(tmp_path, "system")
    d = _directives(files[spec.unit_path])
    assert d["Type"] == ["notify"] and d["Restart"] == ["on-failure"] and d["RestartSec"] == ["10"]
    assert d["User"] == [service.SERVICE_USER] and d["DevicePolicy"] == ["closed"]
    assert {a.split()[0] for a in d["DeviceAllow"]} >= {"char-nvidiactl", "char-nvidia-uvm", "char-nvidia-frontend"}
    assert "modprobe@nvidia-uvm.service" in d["After"][0] and "network-online.target" in d["Wants"][0]
    assert d["ProtectSystem"] == ["strict"] and d["ReadWritePaths"] == [str(spec.state_dir)]
    assert d["EnvironmentFile"] == [str(service.SYSTEM_ENV_FILE)]
    assert d["ExecStart"][0].startswith(f"{EXE} serve --foreground --model $SPARK_SETUP_MODEL")
    assert d["IPAddressAllow"] == ["localhost"]  # binds 127.0.0.1 by default
    env = _directives(files[spec.env_path])
    assert env["SPARK_SETUP_MODEL"] == [str(spec.model_path)] and env["SPARK_SETUP_PORT"] == ["8000"]
    assert "SPARK_SETUP_MTP_MODEL" not in env
    assert env["DS4_ENGINE_LIB"] == [str(tmp_path / "engine" / "libds4engine.so")]


def test_mtp_and_custom_values_reach_the_files(tmp_path):
    spec, files = _render(tmp_path, "system-custom")
    d, env = _directives(files[spec.unit_path]), _directives(files[spec.env_path])
    assert env["SPARK_SETUP_PORT"] == ["9123"] and env["SPARK_SETUP_HOST"] == ["0.0.0.0"]
    assert env["SPARK_SETUP_MTP_MODEL"] == [str(spec.mtp_path)]
    assert "SPARK_SETUP_MTP_MODEL" in d["ExecStartPre"][0]
    assert "IPAddressDeny" not in d  # listening on all addresses: no loopback-only firewall
    assert d["ReadWritePaths"] == [str(tmp_path / "var" / "state" / "server")]
    assert env["SPARK_SETUP_MODELS_DIR"] == [str(tmp_path / "elsewhere" / "models")]


def test_user_unit_has_no_system_only_settings(tmp_path):
    spec, files = _render(tmp_path, "user")
    d = _directives(files[spec.unit_path])
    assert spec.unit_path == tmp_path / "home" / ".config" / "systemd" / "user" / service.UNIT_NAME
    assert "User" not in d and "DevicePolicy" not in d and "After" not in d
    assert d["WantedBy"] == ["default.target"] and d["Type"] == ["notify"]


def test_start_timeout_follows_model_size():
    small, _ = service.start_timeout(10 * 2**20)
    assert small == service.MIN_START_TIMEOUT_S
    q2, reason = service.start_timeout(int(80.76 * 2**30))
    q4, _ = service.start_timeout(int(153.3 * 2**30))
    assert 600 < q2 < q4
    assert q2 >= 80.76 * 2**30 / service.CONSERVATIVE_DISK_BYTES_PER_S
    assert "80.8 GiB" in reason


def test_protect_home_is_read_only_only_when_needed(tmp_path):
    s = _settings(Path("/home/alice/.local/share/spark-setup"))
    spec = service.unit_spec(s, scope="system", model=s.models_dir / "m.gguf", exec_path=EXE, model_bytes=1)
    d = _directives(service.render_units(spec, python_home=Path("/usr"))[spec.unit_path])
    assert d["ProtectHome"] == ["read-only"]
    s = _settings(Path("/opt/spark-setup"))
    spec = service.unit_spec(s, scope="system", model=s.models_dir / "m.gguf", exec_path=Path("/opt/x/bin/spark-setup"),
                             model_bytes=1)
    d = _directives(service.render_units(spec, python_home=Path("/usr"))[spec.unit_path])
    assert d["ProtectHome"] == ["yes"]
    # ... but a Python that lives in a home (pyenv) must stay readable.
    d = _directives(service.render_units(spec, python_home=Path("/root/.pyenv/versions/3.11.7"))[spec.unit_path])
    assert d["ProtectHome"] == ["read-only"]


def test_paths_a_unit_cannot_carry_are_refused(tmp_path):
    s = _settings(tmp_path / "with space")
    with pytest.raises(UsageError, match="space"):
        service.unit_spec(s, scope="system", model=s.models_dir / "m.gguf", exec_path=EXE, model_bytes=1)


def test_diff_against_installed(tmp_path):
    target = tmp_path / "x.service"
    assert service.diff_text(target, "a\n").startswith("--- /dev/null")
    target.write_text("a\n")
    assert service.diff_text(target, "a\n") == ""
    d = service.diff_text(target, "b\n")
    assert "-a" in d and "+b" in d
