"""`spark-setup build` / build_engine: keyed cache, manifest, reuse, clear errors, CUDA compiles for both archs."""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from spark_setup.engine import _lib, build
from spark_setup.errors import UsageError, UserError
from spark_setup.settings import load_settings

from conftest import ENGINE_CACHE, has_gpu

REPO = Path(__file__).resolve().parents[1]


def settings_at(prefix: Path):
    return load_settings({"prefix": prefix}, env={}, config_file=prefix / "no-config.toml")


def cli(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "spark_setup", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def test_manifest_records_key_arch_compilers_and_artifact_hashes(engine_build):
    m = engine_build.manifest
    assert m["key"] == engine_build.key == engine_build.build_dir.name and len(m["key"]) == 16
    assert m["arch"] == "cpu" and m["cuda"] is False
    assert m["compiler"]["cxx_version"] and m["compiler"]["cmake_version"].startswith("cmake version")
    assert m["build_seconds"] >= 0
    assert set(m["artifacts"]) >= {"libds4engine.so", "gguf_check"}
    for name, art in m["artifacts"].items():
        data = (engine_build.build_dir / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == art["sha256"] and len(data) == art["size"]
    assert json.loads((engine_build.build_dir / "manifest.json").read_text()) == m
    lib = _lib.load(engine_build.lib_path)
    assert lib.ds4_abi_version() == 1 and lib.ds4_has_cuda() == 0
    assert lib.ds4_version_string() == b"0.1.0 (cpu)"


def test_rebuild_with_same_key_is_reused_quickly(engine_build):
    t0 = time.monotonic()
    again = build.build_engine(settings_at(ENGINE_CACHE), arch="cpu", progress=False)
    assert time.monotonic() - t0 < 1.0
    assert again.up_to_date and again.key == engine_build.key and again.lib_path == engine_build.lib_path
    assert build.find_engine(settings_at(ENGINE_CACHE)) == engine_build.lib_path
    assert build.find_engine(settings_at(ENGINE_CACHE), arch="cpu") == engine_build.lib_path
    assert build.find_engine(settings_at(ENGINE_CACHE), arch="sm_90") is None


def test_cli_says_up_to_date(engine_build):
    res = cli("build", "--arch", "cpu", "--prefix", str(ENGINE_CACHE))
    assert res.returncode == 0, res.stderr
    assert "up to date" in res.stdout and str(engine_build.lib_path) in res.stdout
    res = cli("build", "--arch", "cpu", "--prefix", str(ENGINE_CACHE), "--json")
    doc = json.loads(res.stdout)
    assert doc["up_to_date"] is True and doc["key"] == engine_build.key and doc["manifest"]["arch"] == "cpu"


def test_corrupted_artifact_is_not_reused(engine_build, tmp_path):
    # a copy of the finished build whose library was altered must not count as "up to date"
    fake = tmp_path / "engine" / engine_build.key
    shutil.copytree(engine_build.build_dir, fake)
    with open(fake / "libds4engine.so", "ab") as f:
        f.write(b"junk")
    assert build._valid_build(fake) is None
    assert build._valid_build(engine_build.build_dir) is not None


def test_load_without_a_build_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.delenv("DS4_ENGINE_LIB", raising=False)
    monkeypatch.setenv("SPARK_SETUP_PREFIX", str(tmp_path / "empty"))
    monkeypatch.setenv("SPARK_SETUP_CONFIG", str(tmp_path / "none.toml"))
    with pytest.raises(_lib.EngineError, match="engine not built: run spark-setup build"):
        _lib.load()
    with pytest.raises(_lib.EngineError, match="does not exist"):
        _lib.load(tmp_path / "nope.so")
    (tmp_path / "not-a-lib.so").write_bytes(b"\x7fELF garbage")
    with pytest.raises(_lib.EngineError, match="cannot load engine library"):
        _lib.load(tmp_path / "not-a-lib.so")


def test_env_var_selects_the_library(engine_lib, monkeypatch):
    monkeypatch.setenv("DS4_ENGINE_LIB", str(engine_lib))
    assert _lib.load()._name == str(Path(engine_lib).resolve())


def _copy_engine(tmp_path: Path) -> Path:
    src = build.ENGINE_DIR
    dst = tmp_path / "engine-src"
    dst.mkdir()
    shutil.copy2(src / "CMakeLists.txt", dst / "CMakeLists.txt")
    shutil.copytree(src / "csrc", dst / "csrc")
    return dst


def test_key_covers_sources_and_arch(tmp_path, monkeypatch):
    tc = build.toolchain(need_cuda=False)
    k_cpu = build.build_key("cpu", tc)
    assert build.build_key("cpu", tc) == k_cpu
    assert build.build_key("sm_90", tc) != k_cpu
    monkeypatch.setattr(build, "ENGINE_DIR", _copy_engine(tmp_path))
    assert build.build_key("cpu", tc) == k_cpu  # same bytes, same key
    with open(build.ENGINE_DIR / "csrc" / "common.h", "a") as f:
        f.write("\n// changed\n")
    assert build.build_key("cpu", tc) != k_cpu
    (build.ENGINE_DIR / "csrc" / "cpu" / "extra.cpp").write_text("// new file\n")
    k2 = build.build_key("cpu", tc)
    (build.ENGINE_DIR / "csrc" / "cpu" / "extra.cpp").unlink()
    assert build.build_key("cpu", tc) != k2


@pytest.mark.slow
def test_build_failure_points_at_the_kept_log(tmp_path, monkeypatch):
    monkeypatch.setattr(build, "ENGINE_DIR", _copy_engine(tmp_path))
    with open(build.ENGINE_DIR / "csrc" / "common.cpp", "a") as f:
        f.write("\nint ds4_broken_on_purpose( {\n")
    with pytest.raises(UserError) as ei:
        build.build_engine(settings_at(tmp_path / "p"), arch="cpu", jobs=2, progress=False)
    msg = ei.value.message
    assert msg.startswith("engine build failed") and "\n" not in msg
    log = Path(msg.rsplit("full log: ", 1)[1])
    assert log.exists() and "ds4_broken_on_purpose" in log.read_text()
    assert "common.cpp" in msg  # the first compiler error line names the file
    assert not list((tmp_path / "p" / "engine").glob("*/manifest.json"))  # nothing half-built is published


def test_no_cxx_compiler_is_a_one_line_error(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("CXX",)}
    env["PATH"] = str(empty)
    res = cli("build", "--arch", "cpu", "--prefix", str(tmp_path / "p"), env=env)
    assert res.returncode == 1
    assert "no C++ compiler found" in res.stderr and "Traceback" not in res.stderr


def test_nvcc_too_old_names_the_needed_version(tmp_path):
    fake = tmp_path / "nvcc"
    fake.write_text("#!/bin/sh\n"
                    "case \"$1\" in\n"
                    "  --version) echo 'Cuda compilation tools, release 11.8, V11.8.89';;\n"
                    "  --list-gpu-code) echo 'sm_50 sm_60 sm_70 sm_75 sm_80 sm_86 sm_89 sm_90';;\n"
                    "esac\n")
    fake.chmod(0o755)
    env = dict(os.environ, CUDACXX=str(fake))
    res = cli("build", "--arch", "sm_121", "--prefix", str(tmp_path / "p"), env=env)
    assert res.returncode == 1, res.stdout
    assert "nvcc 11.8" in res.stderr and "CUDA >= 12.9 is needed" in res.stderr
    assert "Traceback" not in res.stderr


def test_missing_nvcc_for_a_gpu_arch(monkeypatch, tmp_path):
    monkeypatch.setattr(build, "find_nvcc", lambda: None)
    with pytest.raises(UserError, match="--arch sm_90 needs nvcc"):
        build.build_engine(settings_at(tmp_path), arch="sm_90", progress=False)


@pytest.mark.parametrize("bad", ["sm_x", "gpu", "90a", ""])
def test_bad_arch_is_a_usage_error(bad, tmp_path):
    with pytest.raises(UsageError):
        build.normalize_arch(bad)
    res = cli("build", "--arch", bad or "''", "--prefix", str(tmp_path))
    assert res.returncode == 2 and "--arch must be" in res.stderr


def test_arch_names():
    assert build.normalize_arch("SM_121") == "sm_121"
    assert build.normalize_arch("90") == "sm_90"
    assert build.normalize_arch("auto") == "auto"


@pytest.mark.skipif(has_gpu(), reason="this machine has a GPU")
def test_auto_without_gpu_builds_cpu_and_says_why():
    arch, note = build.resolve_arch("auto")
    assert arch == "cpu" and "no NVIDIA GPU" in note


@pytest.mark.slow
@pytest.mark.skipif(build.find_nvcc() is None, reason="nvcc not installed")
@pytest.mark.parametrize("arch", ["sm_121", "sm_90"])
def test_cuda_backend_compiles_warning_free(arch, tmp_path_factory):
    """The CUDA backend (and bench_matvec) builds with -Werror for the Spark and the H200 with this nvcc."""
    prefix = tmp_path_factory.mktemp(f"cuda-{arch}")
    res = build.build_engine(settings_at(prefix), arch=arch, jobs=2, progress=False)
    m = res.manifest
    assert m["cuda"] is True and m["arch"] == arch and m["compiler"]["nvcc_version"]
    assert "bench_matvec" in m["artifacts"]
    log = (res.build_dir / "build.log").read_text()
    assert "warning" not in log.lower()
    lib = _lib.load(res.lib_path)
    assert lib.ds4_has_cuda() == 1 and f"cuda {arch}".encode() in lib.ds4_version_string()
    if not has_gpu():  # without a GPU the CUDA path must fail cleanly, not crash
        w = np.zeros((2, 34), np.uint8)
        x = np.zeros(32, np.float32)
        y = np.zeros(2, np.float32)
        P = ctypes.POINTER(ctypes.c_float)
        rc = lib.ds4_matvec(_lib.BACKEND_CUDA, _lib.TYPE_Q8_0, w.ctypes.data, 2, 32, x.ctypes.data_as(P),
                            y.ctypes.data_as(P))
        assert rc == _lib.DS4_E_BACKEND and b"no CUDA device" in lib.ds4_last_error()


def test_old_builds_are_pruned(tmp_path):
    eng = tmp_path / "engine"
    for i, (key, arch) in enumerate([("a1", "cpu"), ("a2", "cpu"), ("a3", "cpu"), ("a4", "cpu"), ("g1", "sm_90")]):
        d = eng / key
        d.mkdir(parents=True)
        (d / "manifest.json").write_text(json.dumps({"arch": arch}))
        os.utime(d / "manifest.json", (1000 + i, 1000 + i))
    removed = build.prune_builds(eng, "cpu", keep="a1")
    assert sorted(p.name for p in removed) == ["a2"]  # keep a1 (current) + the two newest others (a4, a3)
    assert sorted(p.name for p in eng.iterdir()) == ["a1", "a3", "a4", "g1"]
