"""Doctor: pure checks over HostFacts -> Report. No probing, no printing: fabricated facts test every branch.

Targets:
  spark    a DGX Spark (default): aarch64, GB10 (cc 12.1), CUDA driver >= 13.0, nvcc >= 13.0 listing compute_121,
           >= 110 GiB free disk (less what is already downloaded), >= 110 GiB memory, build tools, a free port.
  generic  any NVIDIA GPU with enough memory for the chosen model (e.g. an H200) and a toolkit that targets it.
  cpu      the demo path: no GPU; a compiler, cmake, make/ninja, a little disk and memory, a free port.
Statuses: "pass", "warn" (works, but a known gotcha is near), "fail" (will not work until fixed).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from .host import GiB, HostFacts

SCHEMA_VERSION = 1
TARGETS = ("spark", "generic", "cpu")

# Requirements, in one place.
DEFAULT_MODEL_BYTES = 86_720_000_000  # the default Q2 imatrix file: 86.7 GB (80.76 GiB)
SPARK_DISK = 110 * GiB  # Q2 + MTP draft + engine builds + headroom
SPARK_MEMORY = 110 * GiB  # a Spark reports MemTotal ~121.7 GiB
SPARK_CC = "12.1"
SPARK_MIN_CUDA = (13, 0)
SPARK_ARCH = "compute_121"
MODEL_DISK_HEADROOM = 20 * GiB  # beyond the model file: builds, logs, a second variant's partial
GPU_MEMORY_HEADROOM = 16 * GiB  # beyond the weights: KV cache at 16k, activations, workspace
GENERIC_MIN_CUDA = (12, 0)
GENERIC_MIN_CC = (7, 5)
CPU_DISK = 2 * GiB  # demo model + CPU engine build
CPU_MEMORY = 4 * GiB
MIN_CMAKE = (3, 24)  # engine/CMakeLists.txt cmake_minimum_required
PAGE_CACHE_WARN = 8 * GiB


@dataclass
class Check:
    id: str
    status: str  # "pass" | "warn" | "fail"
    measured: str
    required: str
    fix: str | None = None
    title: str = ""


@dataclass
class Report:
    target: str
    checks: list[Check] = field(default_factory=list)
    facts: HostFacts | None = None

    @property
    def ok(self) -> bool:
        return not any(c.status == "fail" for c in self.checks)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status == "fail"]

    @property
    def warnings(self) -> list[Check]:
        return [c for c in self.checks if c.status == "warn"]

    def get(self, check_id: str) -> Check | None:
        return next((c for c in self.checks if c.id == check_id), None)

    def to_dict(self) -> dict[str, Any]:
        counts = {s: sum(c.status == s for c in self.checks) for s in ("pass", "warn", "fail")}
        return {
            "schema_version": SCHEMA_VERSION,
            "target": self.target,
            "ok": self.ok,
            "summary": counts,
            "checks": [asdict(c) for c in self.checks],
            "host": self.facts.to_dict() if self.facts is not None else None,
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


# ---------------------------------------------------------------------------------------------------------------
# helpers


def gib(n: int | float | None) -> str:
    return "unknown" if n is None else f"{n / GiB:.1f} GiB"


def parse_version(v: str | None) -> tuple[int, ...] | None:
    if not v:
        return None
    m = re.match(r"(\d+(?:\.\d+)*)", v.strip())
    return tuple(int(x) for x in m.group(1).split(".")) if m else None


def _ver(t: tuple[int, ...]) -> str:
    return ".".join(map(str, t))


def _is_ours(cmdline: str | None, name: str | None) -> bool:
    text = f"{cmdline or ''} {name or ''}"
    return "spark-setup" in text or "spark_setup" in text


# ---------------------------------------------------------------------------------------------------------------
# checks shared by targets


def check_arch(f: HostFacts, target: str) -> Check:
    if target == "spark":
        if f.arch == "aarch64":
            return Check("arch", "pass", f.arch, "aarch64", title="CPU architecture")
        return Check("arch", "fail", f.arch or "unknown", "aarch64 (DGX Spark)",
                     "this is not a DGX Spark: on an NVIDIA GPU host use --target generic; without a GPU use "
                     "--target cpu (the demo)", "CPU architecture")
    if f.arch in ("x86_64", "aarch64", "amd64", "arm64"):
        return Check("arch", "pass", f.arch, "x86_64 or aarch64", title="CPU architecture")
    return Check("arch", "fail", f.arch or "unknown", "x86_64 or aarch64",
                 "spark-setup supports x86_64 and aarch64 Linux hosts only", "CPU architecture")


def check_os(f: HostFacts) -> Check:
    pretty = f.os_release.get("PRETTY_NAME") or f.os_release.get("ID") or "unknown"
    if f.dgx_release:
        name = f.dgx_release.get("DGX_PRETTY_NAME") or f.dgx_release.get("DGX_NAME") or "DGX OS"
        if "spark" in name.lower() or "spark" in (f.dgx_release.get("DGX_NAME") or "").lower():
            return Check("os", "pass", f"{name} ({pretty})", "DGX OS on a DGX Spark", title="operating system")
        return Check("os", "warn", f"{name} ({pretty})", "DGX OS on a DGX Spark",
                     "this DGX is not a Spark: GB10-specific defaults may not fit; consider --target generic",
                     "operating system")
    return Check("os", "warn", f"{pretty}, no /etc/dgx-release", "DGX OS on a DGX Spark",
                 "not DGX OS: spark-setup is tested on DGX OS (Ubuntu 24.04 arm64); other distributions may work",
                 "operating system")


NVML_FIX = ("install the NVIDIA driver (DGX OS ships it; elsewhere e.g. `sudo apt install nvidia-driver-580-open`), "
            "reboot, and check that `nvidia-smi` lists the GPU")


def check_gpu_spark(f: HostFacts) -> Check:
    req = f"NVIDIA GB10 (compute capability {SPARK_CC})"
    if f.nvml_error:
        return Check("gpu", "fail", f"no NVIDIA GPU visible ({f.nvml_error})", req, NVML_FIX, "GPU")
    if not f.gpus:
        return Check("gpu", "fail", "NVML works but lists no GPU", req, NVML_FIX, "GPU")
    for g in f.gpus:
        if g.compute_capability == SPARK_CC:
            return Check("gpu", "pass", f"{g.name} (cc {g.compute_capability})", req, title="GPU")
    found = ", ".join(f"{g.name} (cc {g.compute_capability or '?'})" for g in f.gpus)
    return Check("gpu", "fail", found, req,
                 "this is not a DGX Spark GPU: use --target generic for other NVIDIA GPUs", "GPU")


def _gpu_label(g: Any) -> str:
    return f"{g.name} (cc {g.compute_capability or '?'})"


def _gpu_mem(f: HostFacts, g: Any) -> int:
    """A GPU's memory; unified-memory GPUs (NVML reports none, e.g. GB10) count the system's memory."""
    return g.memory_total if g.memory_total is not None else (f.mem_total or 0)


def best_gpu(f: HostFacts) -> Any:
    """The GPU the engine would use on the generic target: the one with the most memory."""
    if f.nvml_error or not f.gpus:
        return None
    return max(f.gpus, key=lambda g: _gpu_mem(f, g))


def generic_gpu_need(model_bytes: int | None) -> int:
    return (model_bytes or DEFAULT_MODEL_BYTES) + GPU_MEMORY_HEADROOM


def check_gpu_generic(f: HostFacts, model_bytes: int | None) -> list[Check]:
    need = generic_gpu_need(model_bytes)
    req = f"an NVIDIA GPU, cc >= {_ver(GENERIC_MIN_CC)}, >= {gib(need)} GPU memory"
    if f.nvml_error:
        return [Check("gpu", "fail", f"no NVIDIA GPU visible ({f.nvml_error})", req, NVML_FIX, "GPU")]
    if not f.gpus:
        return [Check("gpu", "fail", "NVML works but lists no GPU", req, NVML_FIX, "GPU")]
    best = best_gpu(f)
    assert best is not None
    mem = lambda g: _gpu_mem(f, g)  # noqa: E731
    cc = parse_version(best.compute_capability)
    checks = []
    if cc is None or cc < GENERIC_MIN_CC:
        checks.append(Check("gpu", "fail", _gpu_label(best), req,
                            f"the engine needs compute capability >= {_ver(GENERIC_MIN_CC)}", "GPU"))
    else:
        checks.append(Check("gpu", "pass", _gpu_label(best), req, title="GPU"))
    unified = best.memory_total is None
    measured = (f"{gib(f.mem_total)} system memory (unified; NVML: {best.memory_note or 'n/a'})" if unified
                else f"{gib(best.memory_total)} on {best.name}")
    if mem(best) >= need:
        checks.append(Check("gpu_memory", "pass", measured, f">= {gib(need)}", title="GPU memory for the model"))
    else:
        checks.append(Check("gpu_memory", "fail", measured, f">= {gib(need)} (model + {gib(GPU_MEMORY_HEADROOM)})",
                            "choose a smaller model variant or a GPU with more memory (e.g. an H200, 141 GB)",
                            "GPU memory for the model"))
    return checks


def check_cuda_driver(f: HostFacts, minimum: tuple[int, int]) -> Check:
    req = f"CUDA driver >= {_ver(minimum)}"
    fix = (f"install an NVIDIA driver that supports CUDA {_ver(minimum)} (580 series or newer) and reboot; "
           "DGX OS: `sudo apt update && sudo apt full-upgrade`")
    if f.nvml_error:
        return Check("cuda_driver", "fail", f"unknown ({f.nvml_error})", req,
                     "the driver reports its CUDA version through NVML: fix the gpu check first", "CUDA driver")
    v = parse_version(f.cuda_driver_version)
    measured = f"{f.cuda_driver_version or 'unknown'} (driver {f.driver_version or 'unknown'})"
    if v is None:
        return Check("cuda_driver", "fail", measured, req, fix, "CUDA driver")
    if v >= minimum:
        return Check("cuda_driver", "pass", measured, req, title="CUDA driver")
    return Check("cuda_driver", "fail", measured, req, fix, "CUDA driver")


def check_nvcc(f: HostFacts, minimum: tuple[int, int], arch: str | None) -> Check:
    req = f"nvcc >= {_ver(minimum)}" + (f" listing {arch}" if arch else "")
    install = (f"install the CUDA {_ver(minimum)}+ toolkit (`sudo apt install cuda-toolkit-13`); if it is installed, "
               "add /usr/local/cuda/bin to PATH")
    if not f.nvcc.path:
        return Check("nvcc", "fail", f.nvcc.error or "nvcc: not found", req, install, "CUDA toolkit (nvcc)")
    v = parse_version(f.nvcc.version)
    measured = f"{f.nvcc.version or 'unknown version'} at {f.nvcc.path}"
    if v is None:
        return Check("nvcc", "fail", measured + (f" ({f.nvcc.error})" if f.nvcc.error else ""), req, install,
                     "CUDA toolkit (nvcc)")
    if v < minimum:
        return Check("nvcc", "fail", measured, req,
                     f"nvcc {f.nvcc.version} is too old" + (f" to build {arch.replace('compute_', 'sm_')}" if arch else "")
                     + f": {install}", "CUDA toolkit (nvcc)")
    if arch and arch not in f.nvcc_archs:
        return Check("nvcc", "fail", f"{measured}; {arch} not in --list-gpu-arch", req,
                     f"this nvcc cannot target {arch}: {install}", "CUDA toolkit (nvcc)")
    return Check("nvcc", "pass", measured + (f", {arch}" if arch else ""), req, title="CUDA toolkit (nvcc)")


def check_memory(f: HostFacts, need_total: int, need_available: int | None, what: str) -> Check:
    req = f"MemTotal >= {gib(need_total)}"
    if f.mem_total is None:
        return Check("memory", "fail", "unknown (" + f.errors.get("memory", "probe failed") + ")", req,
                     "could not read /proc/meminfo", "memory")
    measured = f"{gib(f.mem_total)} total, {gib(f.mem_available)} available"
    if f.mem_total < need_total:
        return Check("memory", "fail", measured, req, f"{what} needs a machine with more memory", "memory")
    if need_available is not None and f.mem_available is not None and f.mem_available < need_available:
        return Check("memory", "warn", measured, req + f", MemAvailable >= {gib(need_available)}",
                     "other programs hold memory the model will need: close them before loading", "memory")
    return Check("memory", "pass", measured, req, title="memory")


def disk_need(target: str, model_bytes: int | None) -> int:
    if target == "cpu":
        return CPU_DISK if model_bytes is None else model_bytes + CPU_DISK
    if model_bytes is None:
        return SPARK_DISK
    return max(SPARK_DISK, model_bytes + MODEL_DISK_HEADROOM)


def check_disk(f: HostFacts, target: str, model_bytes: int | None, already_downloaded: int) -> Check:
    full = disk_need(target, model_bytes)
    need = max(full - max(already_downloaded, 0), CPU_DISK)
    req = f">= {gib(need)} free" + (f" ({gib(full)} less {gib(already_downloaded)} already downloaded)"
                                    if already_downloaded > 0 else "")
    where = f.disk_path or f.models_dir or "?"
    if f.disk_free is None:
        return Check("disk", "fail", f"unknown at {where} ({f.errors.get('disk', 'probe failed')})", req,
                     "check that the models directory's filesystem is mounted and readable", "free disk")
    measured = f"{gib(f.disk_free)} free at {where}"
    if f.disk_free >= need:
        return Check("disk", "pass", measured, req, title="free disk at the models dir")
    return Check("disk", "fail", measured, req,
                 f"free {gib(need - f.disk_free)} more on that filesystem, or put the models elsewhere with "
                 "--models-dir DIR (or SPARK_SETUP_MODELS_DIR)", "free disk at the models dir")


def check_tools(f: HostFacts) -> list[Check]:
    out = []
    v = parse_version(f.cmake.version)
    if not f.cmake.path:
        out.append(Check("cmake", "fail", f.cmake.error or "not found", f"cmake >= {_ver(MIN_CMAKE)}",
                         "`pip install cmake` into spark-setup's venv (install.sh does) or `sudo apt install cmake`",
                         "cmake"))
    elif v is None or v < MIN_CMAKE:
        out.append(Check("cmake", "fail", f"{f.cmake.version or 'unknown version'} at {f.cmake.path}",
                         f"cmake >= {_ver(MIN_CMAKE)}", "`pip install -U cmake` into spark-setup's venv", "cmake"))
    else:
        out.append(Check("cmake", "pass", f"{f.cmake.version} at {f.cmake.path}", f"cmake >= {_ver(MIN_CMAKE)}",
                         title="cmake"))
    if f.cxx.path:
        out.append(Check("compiler", "pass", f"{f.cxx.version or 'unknown version'} at {f.cxx.path}",
                         "a C++17 compiler", title="C++ compiler"))
    else:
        out.append(Check("compiler", "fail", f.cxx.error or "not found", "a C++17 compiler",
                         "`sudo apt install build-essential`", "C++ compiler"))
    tools = [t for t in (f.ninja, f.make) if t.path]
    if tools:
        out.append(Check("build_tool", "pass", ", ".join(t.path for t in tools if t.path), "ninja or make",
                         title="build tool"))
    else:
        out.append(Check("build_tool", "fail", "neither ninja nor make found", "ninja or make",
                         "`sudo apt install build-essential` (make) or `pip install ninja`", "build tool"))
    return out


def check_port(f: HostFacts) -> Check:
    req = f"{f.host}:{f.port} free"
    if f.port_free is None:
        return Check("port", "warn", f"unknown ({f.errors.get('port', 'probe failed')})", req,
                     "check the port by hand: `ss -ltnp`", "server port")
    if f.port_free:
        return Check("port", "pass", f"{f.host}:{f.port} free", req, title="server port")
    owner = (f"pid {f.port_owner_pid} ({f.port_owner_name or '?'})" if f.port_owner_pid
             else (f.port_owner_name or "a process this user cannot see"))
    if _is_ours(f.port_owner_cmdline, f.port_owner_name):
        return Check("port", "pass", f"in use by spark-setup's server, {owner}", req + " or ours",
                     title="server port")
    return Check("port", "fail", f"{f.host}:{f.port} in use by {owner}", req,
                 f"stop that process (`ss -ltnp 'sport = :{f.port}'` shows it) or choose another port with --port "
                 "(or SPARK_SETUP_PORT)", "server port")


def check_systemd(f: HostFacts) -> Check:
    if f.systemd_pid1:
        return Check("systemd", "pass", "systemd is PID 1", "systemd as PID 1 (for the service)", title="systemd")
    return Check("systemd", "warn", "systemd is not PID 1" if f.systemd_pid1 is False else "unknown",
                 "systemd as PID 1 (for the service)",
                 "the server can't be installed as a systemd service here; run it with "
                 "`spark-setup serve --foreground` instead", "systemd")


def check_oom_guard(f: HostFacts) -> Check:
    req = "swap or earlyoom, so running out of unified memory kills a process instead of wedging the host"
    measured = f"swap {gib(f.swap_total)}, earlyoom " + (
        "running" if f.earlyoom_running else ("installed, not running" if f.earlyoom_installed else "absent"))
    if f.earlyoom_running or (f.swap_total or 0) > 0:
        return Check("oom_guard", "pass", measured, req, title="out-of-memory guard")
    fix = ("`sudo systemctl enable --now earlyoom`" if f.earlyoom_installed
           else "`sudo apt install earlyoom` (it starts itself)")
    return Check("oom_guard", "warn", measured, req,
                 fix + ": on GB10 exhausting unified memory hangs the machine (no OOM kill, SSH dead)",
                 "out-of-memory guard")


def check_gpu_processes(f: HostFacts) -> Check | None:
    if f.gpu_processes is None:
        return None
    others = [p for p in f.gpu_processes if not _is_ours(p.cmdline, p.name)]
    if not others:
        return Check("gpu_processes", "pass", "none", "no other GPU processes resident", title="other GPU processes")
    desc = ", ".join(f"pid {p.pid} {p.name or '?'}" + (f" ({gib(p.used_memory)})" if p.used_memory else "")
                     for p in others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
    return Check("gpu_processes", "warn", desc, "no other GPU processes resident",
                 "they hold GPU memory the model needs: stop them (`nvidia-smi` lists them)", "other GPU processes")


def check_page_cache(f: HostFacts, model_bytes: int | None) -> Check | None:
    if f.mem_free is None or f.page_cache is None:
        return None
    need = (model_bytes or DEFAULT_MODEL_BYTES) + GPU_MEMORY_HEADROOM
    measured = f"MemFree {gib(f.mem_free)}, page cache {gib(f.page_cache)}"
    req = "page cache small enough that MemFree covers the model (GB10 counts cache as used)"
    if f.page_cache >= PAGE_CACHE_WARN and f.mem_free < need:
        return Check("page_cache", "warn", measured, req,
                     "CUDA on GB10 sees only MemFree: drop the cache before loading "
                     "(`sync && echo 1 | sudo tee /proc/sys/vm/drop_caches`)", "page cache pressure")
    return Check("page_cache", "pass", measured, req, title="page cache pressure")


# ---------------------------------------------------------------------------------------------------------------


def run_checks(facts: HostFacts, target: str = "spark", model_bytes: int | None = None,
               already_downloaded: int = 0) -> Report:
    """All checks for `target` over `facts`. model_bytes: the chosen model's size (None = the default Q2)."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; expected one of {', '.join(TARGETS)}")
    f = facts
    checks: list[Check] = [check_arch(f, target)]
    if target == "spark":
        checks.append(check_os(f))
        checks.append(check_gpu_spark(f))
        checks.append(check_cuda_driver(f, SPARK_MIN_CUDA))
        checks.append(check_nvcc(f, SPARK_MIN_CUDA, SPARK_ARCH))
        checks.append(check_memory(f, SPARK_MEMORY, model_bytes or DEFAULT_MODEL_BYTES, "the Q2 model"))
    elif target == "generic":
        gpu_checks = check_gpu_generic(f, model_bytes)
        checks.extend(gpu_checks)
        checks.append(check_cuda_driver(f, GENERIC_MIN_CUDA))
        gpu = best_gpu(f)
        arch = None
        if gpu is not None and gpu.compute_capability:
            arch = "compute_" + gpu.compute_capability.replace(".", "")
        checks.append(check_nvcc(f, GENERIC_MIN_CUDA, arch))
        checks.append(check_memory(f, 16 * GiB, None, "loading the model"))
    else:
        checks.append(check_memory(f, CPU_MEMORY, None, "the CPU demo"))
    checks.append(check_disk(f, target, model_bytes, already_downloaded))
    checks.extend(check_tools(f))
    checks.append(check_port(f))
    checks.append(check_systemd(f))
    if target in ("spark", "generic"):
        gp = check_gpu_processes(f)
        if gp:
            checks.append(gp)
    if target == "spark":
        checks.append(check_oom_guard(f))
        pc = check_page_cache(f, model_bytes)
        if pc:
            checks.append(pc)
    return Report(target, checks, facts)
