"""Doctor over fabricated host facts (the one seam where a GB10 or an H200 is faked), and the real command here."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from support import nvml_available

from spark_setup.doctor import DEFAULT_MODEL_BYTES, run_checks
from spark_setup.host import GiB, GPU, GPUProcess, HostFacts, Tool

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((ROOT / "docs" / "doctor-schema.json").read_text())
MiB = 1024**2


def validate(report_dict: dict) -> None:
    jsonschema.Draft202012Validator(SCHEMA).validate(report_dict)


def spark(**over) -> HostFacts:
    """A real DGX Spark as measured: GB10 cc 12.1, driver 580.95.05 (CUDA 13.0), NVML memory NOT_SUPPORTED."""
    f = HostFacts(
        arch="aarch64",
        os_release={"ID": "ubuntu", "VERSION_ID": "24.04", "PRETTY_NAME": "Ubuntu 24.04.3 LTS"},
        dgx_release={"DGX_NAME": "DGX Spark", "DGX_PRETTY_NAME": "NVIDIA DGX Spark", "DGX_SWBUILD_VERSION": "7.2.3"},
        kernel="6.11.0-1016-nvidia", python="3.12.3",
        nvml_error=None, driver_version="580.95.05", cuda_driver_version="13.0",
        gpus=[GPU(0, "NVIDIA GB10", "12.1", None, "nvml: not Supported", "GPU-5c1b")],
        gpu_processes=[],
        nvcc=Tool("/usr/local/cuda/bin/nvcc", "13.0"),
        nvcc_archs=["compute_75", "compute_80", "compute_86", "compute_87", "compute_88", "compute_89", "compute_90",
                    "compute_100", "compute_103", "compute_110", "compute_120", "compute_121"],
        mem_total=int(121.7 * GiB), mem_available=int(117 * GiB), mem_free=int(112 * GiB),
        page_cache=int(4 * GiB), swap_total=16 * GiB, earlyoom_installed=False, earlyoom_running=False,
        models_dir="/home/u/.local/share/spark-setup/models", disk_path="/home/u", disk_free=3400 * GiB,
        disk_total=3700 * GiB, models_dir_bytes=0,
        cmake=Tool("/home/u/.local/share/spark-setup/venv/bin/cmake", "4.1.0"),
        cxx=Tool("/usr/bin/c++", "13.3.0"), make=Tool("/usr/bin/make", "4.3"),
        ninja=Tool("/home/u/.local/share/spark-setup/venv/bin/ninja", "1.13.0"),
        systemd_pid1=True, host="127.0.0.1", port=8000, port_free=True,
    )
    return dataclasses.replace(f, **over)


def h200(**over) -> HostFacts:
    f = spark(
        arch="x86_64", dgx_release=None,
        os_release={"ID": "ubuntu", "VERSION_ID": "22.04", "PRETTY_NAME": "Ubuntu 22.04.5 LTS"},
        driver_version="570.133.20", cuda_driver_version="12.8",
        gpus=[GPU(0, "NVIDIA H200", "9.0", 143771 * MiB, None, "GPU-aa")],
        nvcc=Tool("/usr/local/cuda/bin/nvcc", "12.8"),
        nvcc_archs=["compute_50", "compute_75", "compute_80", "compute_86", "compute_89", "compute_90",
                    "compute_100", "compute_120"],
        mem_total=2015 * GiB, mem_available=1900 * GiB, mem_free=1800 * GiB, swap_total=0,
    )
    return dataclasses.replace(f, **over)


def statuses(report) -> dict[str, str]:
    return {c.id: c.status for c in report.checks}


def test_real_spark_passes_everything():
    r = run_checks(spark())
    assert r.ok, [(c.id, c.measured) for c in r.failed]
    assert set(statuses(r).values()) == {"pass"}
    assert {"arch", "os", "gpu", "cuda_driver", "nvcc", "memory", "disk", "cmake", "compiler", "build_tool",
            "port", "systemd", "gpu_processes", "oom_guard", "page_cache"} == set(statuses(r))
    assert "NVIDIA GB10 (cc 12.1)" == r.get("gpu").measured
    assert "13.0 (driver 580.95.05)" == r.get("cuda_driver").measured
    assert all(c.fix is None for c in r.checks)
    validate(r.to_dict())


def test_h200_fails_spark_but_passes_generic():
    r = run_checks(h200(), "spark")
    s = statuses(r)
    assert s["arch"] == "fail" and "--target generic" in r.get("arch").fix
    assert s["gpu"] == "fail" and r.get("gpu").measured == "NVIDIA H200 (cc 9.0)"
    assert "--target generic" in r.get("gpu").fix
    assert s["cuda_driver"] == "fail" and s["nvcc"] == "fail"
    assert not r.ok

    g = run_checks(h200(), "generic")
    assert g.ok, [(c.id, c.measured) for c in g.failed]
    assert statuses(g)["gpu_memory"] == "pass" and "140.4 GiB on NVIDIA H200" == g.get("gpu_memory").measured
    assert "compute_90" in g.get("nvcc").measured
    assert "oom_guard" not in statuses(g) and "page_cache" not in statuses(g)  # GB10 gotchas only on spark
    validate(g.to_dict())


def test_generic_gpu_too_small_for_the_model():
    small = h200(gpus=[GPU(0, "NVIDIA GeForce RTX 4090", "8.9", 24564 * MiB, None, None)],
                 nvcc_archs=["compute_89", "compute_90"])
    r = run_checks(small, "generic")
    assert statuses(r)["gpu_memory"] == "fail" and "smaller model variant" in r.get("gpu_memory").fix
    assert statuses(r)["gpu"] == "pass"
    # a smaller model fits
    assert run_checks(small, "generic", model_bytes=4 * GiB).ok


def test_generic_on_unified_memory_counts_system_memory():
    r = run_checks(spark(), "generic")
    assert r.ok
    assert "unified" in r.get("gpu_memory").measured and "121.7 GiB" in r.get("gpu_memory").measured


def test_generic_nvcc_must_target_the_gpu():
    r = run_checks(h200(nvcc_archs=["compute_80"]), "generic")
    assert statuses(r)["nvcc"] == "fail" and "compute_90 not in --list-gpu-arch" in r.get("nvcc").measured


def test_spark_with_cuda_12_8():
    f = spark(cuda_driver_version="12.8", driver_version="570.86.10", nvcc=Tool("/usr/local/cuda/bin/nvcc", "12.8"),
              nvcc_archs=["compute_75", "compute_80", "compute_90", "compute_100", "compute_120"])
    r = run_checks(f)
    s = statuses(r)
    assert s["cuda_driver"] == "fail" and r.get("cuda_driver").measured == "12.8 (driver 570.86.10)"
    assert "580" in r.get("cuda_driver").fix
    assert s["nvcc"] == "fail" and "too old to build sm_121" in r.get("nvcc").fix
    assert "cuda-toolkit-13" in r.get("nvcc").fix
    assert {k for k, v in s.items() if v != "pass"} == {"cuda_driver", "nvcc"}
    validate(r.to_dict())


def test_spark_nvcc_13_without_sm121_or_missing():
    r = run_checks(spark(nvcc_archs=["compute_90", "compute_120"]))
    assert statuses(r)["nvcc"] == "fail" and "compute_121 not in --list-gpu-arch" in r.get("nvcc").measured
    r = run_checks(spark(nvcc=Tool(None, error="nvcc: not found on PATH or in /usr/local/cuda/bin"), nvcc_archs=[]))
    assert statuses(r)["nvcc"] == "fail" and "/usr/local/cuda/bin to PATH" in r.get("nvcc").fix


def test_spark_with_40_gib_free_disk():
    r = run_checks(spark(disk_free=40 * GiB))
    c = r.get("disk")
    assert c.status == "fail" and not r.ok
    assert c.measured == "40.0 GiB free at /home/u" and c.required == ">= 110.0 GiB free"
    assert "free 70.0 GiB more" in c.fix and "--models-dir" in c.fix
    assert [x.id for x in r.failed] == ["disk"]
    # what is already downloaded counts: 80.76 GiB on disk leaves 29.24 GiB to find
    r2 = run_checks(spark(disk_free=40 * GiB), already_downloaded=int(80.76 * GiB))
    assert r2.get("disk").status == "pass" and "already downloaded" in r2.get("disk").required
    # the chosen model's size sets the need
    r3 = run_checks(spark(disk_free=40 * GiB), model_bytes=int(153.3 * GiB))
    assert r3.get("disk").required == ">= 173.3 GiB free"
    # never below the Spark's 110 GiB (Q2 + draft + builds + headroom), however small the model
    assert run_checks(spark(), model_bytes=int(80.76 * GiB)).get("disk").required == ">= 110.0 GiB free"


def test_spark_whose_nvml_library_is_missing():
    f = spark(nvml_error="nvml: library not found", driver_version=None, cuda_driver_version=None, gpus=[],
              gpu_processes=None, errors={"nvml": "nvml: library not found"})
    r = run_checks(f)
    s = statuses(r)
    assert s["gpu"] == "fail" and r.get("gpu").measured == "no NVIDIA GPU visible (nvml: library not found)"
    assert "nvidia-smi" in r.get("gpu").fix and "driver" in r.get("gpu").fix
    assert s["cuda_driver"] == "fail" and "fix the gpu check first" in r.get("cuda_driver").fix
    assert "gpu_processes" not in s  # unknowable without NVML: not reported as fine
    assert {k for k, v in s.items() if v != "pass"} == {"gpu", "cuda_driver"}
    validate(r.to_dict())


def test_spark_with_too_little_memory_or_busy_memory():
    r = run_checks(spark(mem_total=64 * GiB, mem_available=60 * GiB))
    assert statuses(r)["memory"] == "fail"
    r = run_checks(spark(mem_available=40 * GiB))
    assert statuses(r)["memory"] == "warn" and "close them" in r.get("memory").fix and r.ok


def test_gb10_gotcha_warnings():
    r = run_checks(spark(swap_total=0))
    c = r.get("oom_guard")
    assert c.status == "warn" and "sudo apt install earlyoom" in c.fix and r.ok
    c = run_checks(spark(swap_total=0, earlyoom_installed=True)).get("oom_guard")
    assert c.status == "warn" and "systemctl enable --now earlyoom" in c.fix
    assert run_checks(spark(swap_total=0, earlyoom_installed=True, earlyoom_running=True)).get("oom_guard").status == "pass"

    procs = [GPUProcess(4242, "python3", 0, 30 * GiB, "python3 train.py"),
             GPUProcess(777, "ds4-server", 0, None, "/home/u/.local/share/spark-setup/venv/bin/python -m spark_setup serve")]
    c = run_checks(spark(gpu_processes=procs)).get("gpu_processes")
    assert c.status == "warn" and c.measured == "pid 4242 python3 (30.0 GiB)"  # our own server is not a warning

    c = run_checks(spark(mem_free=20 * GiB, page_cache=90 * GiB)).get("page_cache")
    assert c.status == "warn" and "drop_caches" in c.fix
    assert run_checks(spark(mem_free=100 * GiB, page_cache=15 * GiB)).get("page_cache").status == "pass"


def test_port_busy_by_someone_else_fails_but_ours_passes():
    f = spark(port_free=False, port_owner_pid=999, port_owner_name="nginx", port_owner_cmdline="nginx: master")
    c = run_checks(f).get("port")
    assert c.status == "fail" and "pid 999 (nginx)" in c.measured and "--port" in c.fix
    f = spark(port_free=False, port_owner_pid=1234, port_owner_name="spark-setup",
              port_owner_cmdline="/opt/venv/bin/python /opt/venv/bin/spark-setup serve --foreground")
    assert run_checks(f).get("port").status == "pass"
    f = spark(port_free=False)  # another user's process: busy, owner unknown
    c = run_checks(f).get("port")
    assert c.status == "fail" and "a process this user cannot see" in c.measured


def test_missing_build_tools():
    f = spark(cmake=Tool(None, error="cmake: not found"), cxx=Tool(None, error="c++ compiler: not found"),
              make=Tool(None), ninja=Tool(None))
    s = statuses(run_checks(f))
    assert s["cmake"] == s["compiler"] == s["build_tool"] == "fail"
    s = statuses(run_checks(spark(cmake=Tool("/usr/bin/cmake", "3.22.1"))))
    assert s["cmake"] == "fail"


def test_cpu_target_needs_no_gpu():
    f = spark(arch="x86_64", dgx_release=None, nvml_error="nvml: library not found", gpus=[], gpu_processes=None,
              cuda_driver_version=None, driver_version=None, nvcc=Tool(None), mem_total=24 * GiB,
              mem_available=22 * GiB, disk_free=60 * GiB, systemd_pid1=False)
    r = run_checks(f, "cpu")
    assert r.ok and {"gpu", "cuda_driver", "nvcc", "os"}.isdisjoint(statuses(r))
    assert statuses(r)["systemd"] == "warn" and "--foreground" in r.get("systemd").fix
    r = run_checks(dataclasses.replace(f, disk_free=1 * GiB), "cpu")
    assert statuses(r)["disk"] == "fail"


def test_non_spark_dgx_and_plain_ubuntu_warn_on_os():
    assert run_checks(spark(dgx_release=None)).get("os").status == "warn"
    c = run_checks(spark(dgx_release={"DGX_NAME": "DGX Station"})).get("os")
    assert c.status == "warn" and "--target generic" in c.fix


def test_unknown_target_is_rejected():
    with pytest.raises(ValueError):
        run_checks(spark(), "tpu")


def test_default_model_bytes_matches_catalog():
    from spark_setup import catalog

    assert abs(catalog.VARIANTS[catalog.DEFAULT_VARIANT].approx_bytes - DEFAULT_MODEL_BYTES) < GiB


# --- the real command, on this host ---------------------------------------------------------------------------


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _cli(args: list[str], tmp_path: Path, **env_over: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPARK_SETUP_")}
    env.update(HOME=str(tmp_path), SPARK_SETUP_CONFIG=str(tmp_path / "no-config.toml"), COLUMNS="200", **env_over)
    return subprocess.run([sys.executable, "-m", "spark_setup", *args], capture_output=True, text=True, env=env,
                          timeout=120)


@pytest.mark.skipif(platform.machine() == "aarch64", reason="checks the non-Spark verdict")
def test_doctor_here_exits_1_and_says_why(tmp_path):
    port = str(_free_port())
    out = _cli(["doctor", "--port", port], tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert any(line.startswith("│ arch") and "FAIL" in line and platform.machine() in line for line in lines)
    assert "fail arch: this is not a DGX Spark" in out.stdout
    if not nvml_available():
        assert any(line.startswith("│ gpu ") and "FAIL" in line and "library not found" in line for line in lines)
        assert "nvidia-smi" in out.stdout
    assert "not ready for target spark" in out.stdout

    js = _cli(["doctor", "--json", "--port", port], tmp_path)
    assert js.returncode == 1
    data = json.loads(js.stdout)
    validate(data)
    assert data["ok"] is False and data["target"] == "spark"
    assert {c["id"]: c["status"] for c in data["checks"]}["arch"] == "fail"
    assert data["summary"]["fail"] == sum(c["status"] == "fail" for c in data["checks"])


def test_doctor_cpu_target_passes_here(tmp_path):
    port = str(_free_port())
    out = _cli(["doctor", "--target", "cpu", "--json", "--port", port], tmp_path,
               SPARK_SETUP_MODELS_DIR=str(tmp_path / "models"))
    data = json.loads(out.stdout)
    validate(data)
    assert out.returncode == 0, [c for c in data["checks"] if c["status"] == "fail"]
    assert data["ok"] and data["host"]["port"] == int(port) and data["host"]["disk_path"] == str(tmp_path)


def test_doctor_port_busy_here_fails_and_names_us(tmp_path):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    try:
        out = _cli(["doctor", "--target", "cpu", "--json", "--port", str(port)], tmp_path)
    finally:
        srv.close()
    assert out.returncode == 1
    port_check = next(c for c in json.loads(out.stdout)["checks"] if c["id"] == "port")
    assert port_check["status"] == "fail" and f"pid {os.getpid()}" in port_check["measured"]


def test_doctor_on_saved_facts_of_a_spark(tmp_path):
    (tmp_path / "spark.json").write_text(spark().to_json())
    out = _cli(["doctor", "--facts", str(tmp_path / "spark.json")], tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ready for target spark" in out.stdout and "NVIDIA GB10 (cc 12.1)" in out.stdout
    # a whole --json report is accepted too
    (tmp_path / "report.json").write_text(run_checks(spark(disk_free=40 * GiB)).to_json())
    out = _cli(["doctor", "--facts", str(tmp_path / "report.json"), "--json"], tmp_path)
    assert out.returncode == 1 and [c["id"] for c in json.loads(out.stdout)["checks"] if c["status"] == "fail"] == ["disk"]


def test_doctor_bad_facts_file_is_a_usage_error(tmp_path):
    (tmp_path / "bad.json").write_text("[1, 2]")
    out = _cli(["doctor", "--facts", str(tmp_path / "bad.json")], tmp_path)
    assert out.returncode == 2 and out.stderr.startswith("error: facts file") and "Traceback" not in out.stderr
    out = _cli(["doctor", "--facts", str(tmp_path / "missing.json")], tmp_path)
    assert out.returncode == 2 and "cannot read facts file" in out.stderr


def test_doctor_variant_sizes_the_disk_check(tmp_path):
    (tmp_path / "spark.json").write_text(spark(disk_free=120 * GiB).to_json())
    ok = _cli(["doctor", "--facts", str(tmp_path / "spark.json"), "--variant", "q2-imatrix", "--with-mtp"], tmp_path)
    assert ok.returncode == 0, ok.stdout
    big = _cli(["doctor", "--facts", str(tmp_path / "spark.json"), "--variant", "q4", "--json"], tmp_path)
    assert big.returncode == 1
    disk = next(c for c in json.loads(big.stdout)["checks"] if c["id"] == "disk")
    assert disk["status"] == "fail" and disk["required"] == ">= 173.3 GiB free"
    bad = _cli(["doctor", "--variant", "q9"], tmp_path)
    assert bad.returncode == 2 and "unknown variant" in bad.stderr


@pytest.mark.parametrize("target", ["spark", "generic", "cpu"])
def test_every_probe_failed_still_gives_a_report(target):
    # HostFacts() is "nothing could be measured": every check must still answer, and never raise
    f = HostFacts(errors={"memory": "memory: timed out after 10 s", "disk": "disk: PermissionError: denied",
                          "port": "port: OSError: bad address"},
                  gpus=[GPU(0, "NVIDIA ???", None, None, None, None)])
    r = run_checks(f, target)
    validate(r.to_dict())
    s = statuses(r)
    assert s["memory"] == "fail" and "timed out" in r.get("memory").measured
    assert s["disk"] == "fail" and "PermissionError" in r.get("disk").measured
    assert s["port"] == "warn" and s["arch"] == "fail"
    assert not r.ok and all(c.fix for c in r.checks if c.status != "pass")
