"""Host probes against the real machine and real processes: never raise, failures become facts."""

from __future__ import annotations

import os
import platform
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support import nvml_available

from spark_setup import host
from spark_setup.host import GPU, HostFacts, Tool


def _fake_exe(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def test_probe_real_host_never_raises_and_round_trips(tmp_path):
    models = tmp_path / "a" / "b" / "models"
    facts = host.probe(models_dir=models, host="127.0.0.1", port=_free_port())
    assert facts.arch == platform.machine()
    assert facts.mem_total and facts.mem_total > facts.mem_available > 0
    assert facts.disk_path == str(tmp_path)  # nearest existing parent of a missing models dir
    assert facts.disk_free and facts.disk_free > 0
    assert facts.models_dir_bytes == 0
    assert facts.port_free is True
    assert facts.cxx.path and facts.cxx.version  # the machines we test on have a C++ compiler
    back = HostFacts.from_json(facts.to_json())
    assert back == facts


@pytest.mark.skipif(nvml_available(), reason="this host has a working NVML")
def test_missing_nvml_is_a_fact_not_an_exception():
    facts = host.probe(models_dir=Path("/nonexistent/models"), port=_free_port())
    assert facts.nvml_error is not None and facts.nvml_error.startswith("nvml: ")
    assert facts.gpus == [] and facts.gpu_processes is None
    assert facts.errors["nvml"] == facts.nvml_error


def test_nvml_error_text_is_short_and_lowercase():
    class LibraryNotFound(Exception):
        pass

    assert host._nvml_error_text(LibraryNotFound("NVML Shared Library Not Found")) == "nvml: library not found"
    assert host._nvml_error_text(RuntimeError("Not Supported")) == "nvml: not Supported"


def test_guard_turns_exceptions_and_hangs_into_facts():
    errors: dict[str, str] = {}
    assert host._guarded("boom", lambda: 1 / 0, 5, errors) is None
    assert errors["boom"].startswith("boom: ZeroDivisionError")
    t0 = time.monotonic()
    assert host._guarded("hang", lambda: time.sleep(30), 0.3, errors) is None
    assert time.monotonic() - t0 < 5
    assert errors["hang"] == "hang: timed out after 0.3 s"
    assert host._guarded("ok", lambda: 42, 5, errors) == 42 and "ok" not in errors


def test_port_probe_names_the_listening_process():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    try:
        out = host.probe_port("127.0.0.1", port)
    finally:
        srv.close()
    assert out["port_free"] is False
    assert out["port_owner_pid"] == os.getpid()
    assert out["port_owner_name"]
    assert host.probe_port("127.0.0.1", port)["port_free"] is True  # closed again


def test_models_dir_bytes_counts_allocated_not_apparent(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.gguf").write_bytes(os.urandom(1 << 20))
    with open(tmp_path / "b.gguf.part", "wb") as fh:  # a sparse partial: 1 GiB apparent, 64 KiB written
        fh.truncate(1 << 30)
        fh.write(b"x" * 65536)
    (tmp_path / "link.gguf").symlink_to(tmp_path / "sub" / "a.gguf")
    n = host.probe_models_dir_bytes(tmp_path)
    assert (1 << 20) + 65536 <= n < (1 << 20) + (1 << 24)
    assert host.probe_models_dir_bytes(tmp_path / "missing") == 0


def test_os_release_and_dgx_release(tmp_path):
    (tmp_path / "os-release").write_text('ID=ubuntu\nVERSION_ID="24.04"\nPRETTY_NAME="Ubuntu 24.04.3 LTS"\nX=1\n')
    (tmp_path / "dgx-release").write_text('DGX_NAME="DGX Spark"\nDGX_PRETTY_NAME="NVIDIA DGX Spark"\n'
                                          "DGX_SWBUILD_VERSION=7.2.3\n")
    osr, dgx = host.probe_os(tmp_path)
    assert osr == {"ID": "ubuntu", "VERSION_ID": "24.04", "PRETTY_NAME": "Ubuntu 24.04.3 LTS"}
    assert dgx["DGX_NAME"] == "DGX Spark" and dgx["DGX_SWBUILD_VERSION"] == "7.2.3"
    (tmp_path / "dgx-release").unlink()
    assert host.probe_os(tmp_path)[1] is None


def test_nvcc_found_via_cuda_home_and_parsed(tmp_path, monkeypatch):
    bindir = tmp_path / "cuda" / "bin"
    bindir.mkdir(parents=True)
    _fake_exe(bindir / "nvcc", 'case "$1" in\n'
              '  --version) echo "Cuda compilation tools, release 12.8, V12.8.93";;\n'
              '  --list-gpu-arch) printf "compute_90\\ncompute_100\\ncompute_120\\ncompute_75\\n";;\n'
              "esac")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no nvcc on PATH
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "cuda"))
    monkeypatch.delenv("CUDACXX", raising=False)
    if host.shutil.which("nvcc", path="/usr/bin:/bin"):
        pytest.skip("nvcc in /usr/bin")
    tool, archs = host.probe_nvcc()
    assert tool == Tool(str(bindir / "nvcc"), "12.8", None)
    assert archs == ["compute_75", "compute_90", "compute_100", "compute_120"]


def test_cudacxx_wins(tmp_path, monkeypatch):
    nvcc = _fake_exe(tmp_path / "my-nvcc", "exit 0")
    monkeypatch.setenv("CUDACXX", str(nvcc))
    assert host.find_nvcc() == str(nvcc)


def test_hanging_or_failing_nvcc_is_recorded(tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    _fake_exe(bindir / "nvcc", "sleep 30")
    monkeypatch.setenv("PATH", f"{bindir}:/usr/bin:/bin")
    monkeypatch.delenv("CUDACXX", raising=False)
    monkeypatch.setattr(host, "CMD_TIMEOUT", 0.5)
    t0 = time.monotonic()
    tool, archs = host.probe_nvcc()
    assert time.monotonic() - t0 < 10
    assert tool.path == str(bindir / "nvcc") and tool.version is None and "timed out" in tool.error
    _fake_exe(bindir / "nvcc", "echo broken >&2; exit 3")
    tool, _ = host.probe_nvcc()
    assert tool.error == "nvcc: nvcc exited 3: broken"


def test_missing_tools_are_facts(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    assert host.probe_cxx().path is None
    t = host.probe_tool(["make", "gmake"])
    assert t.path is None and t.error.startswith("make: not found")


def test_cmake_prefers_the_venv(monkeypatch, tmp_path):
    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    _fake_exe(venv_bin / "cmake", 'echo "cmake version 3.31.6"')
    monkeypatch.setattr(host, "_venv_bin", lambda: venv_bin)
    monkeypatch.setattr(host, "_pypi_tool_dir", lambda name: None)
    t = host.probe_tool(["cmake"], prefer_venv=True)
    assert t == Tool(str(venv_bin / "cmake"), "3.31.6", None)
    # the PyPI package's own bin dir comes first: that is the cmake the engine build runs
    pkg_bin = tmp_path / "cmake-data" / "bin"
    pkg_bin.mkdir(parents=True)
    _fake_exe(pkg_bin / "cmake", 'echo "cmake version 4.1.2"')
    monkeypatch.setattr(host, "_pypi_tool_dir", lambda name: pkg_bin if name == "cmake" else None)
    assert host.probe_tool(["cmake"], prefer_venv=True) == Tool(str(pkg_bin / "cmake"), "4.1.2", None)


def test_facts_from_dict_ignores_unknown_keys_and_rebuilds_nested():
    f = HostFacts(arch="aarch64", gpus=[GPU(0, "NVIDIA GB10", "12.1", None, "nvml: not Supported")])
    d = f.to_dict()
    d["field_from_a_newer_version"] = 1
    back = HostFacts.from_dict(d)
    assert back == f and isinstance(back.gpus[0], GPU) and isinstance(back.nvcc, Tool)


def test_probe_cli_subprocess_is_fast_enough_and_clean(tmp_path):
    # the whole probe runs its parts concurrently, each bounded; a plain run here takes well under the bounds
    env = dict(os.environ, SPARK_SETUP_CONFIG=str(tmp_path / "none.toml"), SPARK_SETUP_PREFIX=str(tmp_path))
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", "from spark_setup.host import probe; print(probe().to_json())"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert time.monotonic() - t0 < 30
    assert HostFacts.from_json(out.stdout).arch == platform.machine()


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port
