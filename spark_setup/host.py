"""Host probes: what this machine is, measured, never assumed.

`probe(settings) -> HostFacts` runs every probe with a timeout and never raises: a probe that fails records its
failure as a fact (e.g. ``nvml: library not found``) in the field it would have filled and in ``errors``.
`HostFacts` is a plain dataclass: tests build it from fabricated values (the one seam where a GB10 is faked) and it
round-trips through JSON.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

GiB = 1024**3
T = TypeVar("T")

# Seconds each probe may take before it is recorded as timed out.
NVML_TIMEOUT = 10.0
CMD_TIMEOUT = 10.0
FS_TIMEOUT = 10.0


@dataclass
class GPU:
    index: int
    name: str
    compute_capability: str | None  # "12.1"
    memory_total: int | None = None  # bytes; None when NVML cannot tell (GB10: NOT_SUPPORTED)
    memory_note: str | None = None  # why memory_total is None
    uuid: str | None = None


@dataclass
class GPUProcess:
    pid: int
    name: str | None
    gpu_index: int
    used_memory: int | None = None  # bytes; None when NVML does not report it
    cmdline: str | None = None


@dataclass
class Tool:
    path: str | None
    version: str | None = None
    error: str | None = None


@dataclass
class HostFacts:
    """Everything doctor needs, as measured. Defaults describe 'unknown / not found'."""

    arch: str = ""
    os_release: dict[str, str] = field(default_factory=dict)  # /etc/os-release (ID, VERSION_ID, PRETTY_NAME)
    dgx_release: dict[str, str] | None = None  # /etc/dgx-release when present (DGX_NAME, ...)
    kernel: str = ""
    python: str = ""
    # NVML: nvml_error set when the library could not be used at all ("nvml: library not found").
    nvml_error: str | None = None
    driver_version: str | None = None  # "580.95.05"
    cuda_driver_version: str | None = None  # "13.0" (what the driver supports)
    gpus: list[GPU] = field(default_factory=list)
    gpu_processes: list[GPUProcess] | None = None  # None when unknown (NVML unavailable)
    # CUDA toolkit
    nvcc: Tool = field(default_factory=lambda: Tool(None, error="nvcc: not found"))
    nvcc_archs: list[str] = field(default_factory=list)  # ["compute_90", "compute_121", ...]
    # memory (bytes)
    mem_total: int | None = None
    mem_available: int | None = None
    mem_free: int | None = None  # MemFree: what cudaMemGetInfo reports as free on GB10
    page_cache: int | None = None  # Cached + Buffers
    swap_total: int | None = None
    earlyoom_installed: bool = False
    earlyoom_running: bool = False
    # disk
    models_dir: str = ""
    disk_path: str | None = None  # nearest existing parent of models_dir
    disk_free: int | None = None
    disk_total: int | None = None
    models_dir_bytes: int = 0  # bytes allocated by files already in models_dir
    # build tools
    cmake: Tool = field(default_factory=lambda: Tool(None, error="cmake: not found"))
    cxx: Tool = field(default_factory=lambda: Tool(None, error="c++ compiler: not found"))
    make: Tool = field(default_factory=lambda: Tool(None, error="make: not found"))
    ninja: Tool = field(default_factory=lambda: Tool(None, error="ninja: not found"))
    # services and network
    systemd_pid1: bool | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    port_free: bool | None = None
    port_owner_pid: int | None = None
    port_owner_name: str | None = None
    port_owner_cmdline: str | None = None
    errors: dict[str, str] = field(default_factory=dict)  # probe name -> what went wrong

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HostFacts":
        d = dict(data)
        d["gpus"] = [GPU(**g) for g in d.get("gpus") or []]
        if d.get("gpu_processes") is not None:
            d["gpu_processes"] = [GPUProcess(**p) for p in d["gpu_processes"]]
        for k in ("nvcc", "cmake", "cxx", "make", "ninja"):
            if isinstance(d.get(k), dict):
                d[k] = Tool(**d[k])
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_json(cls, text: str) -> "HostFacts":
        return cls.from_dict(json.loads(text))


# ---------------------------------------------------------------------------------------------------------------
# the guard every probe runs under


def _guarded(name: str, fn: Callable[[], T], timeout: float, errors: dict[str, str]) -> T | None:
    """Run fn in a daemon thread; return its result, or None with errors[name] set on exception or timeout."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # a probe must never take doctor down
            box["error"] = f"{type(exc).__name__}: {exc}"

    t = threading.Thread(target=target, name=f"probe-{name}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        errors[name] = f"{name}: timed out after {timeout:g} s"
        return None
    if "error" in box:
        errors[name] = f"{name}: {box['error']}"
        return None
    return box.get("value")


def _run(argv: list[str], timeout: float | None = None) -> str:
    """Run a command, return stdout+stderr text; raises on failure or timeout (the guard turns that into a fact)."""
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout or CMD_TIMEOUT,
                         stdin=subprocess.DEVNULL)
    if out.returncode != 0:
        raise RuntimeError(f"{Path(argv[0]).name} exited {out.returncode}: {(out.stderr or out.stdout).strip()[:200]}")
    return out.stdout + out.stderr


# ---------------------------------------------------------------------------------------------------------------
# individual probes (each returns data or raises; probe() guards them)


def _parse_kv_file(path: Path) -> dict[str, str]:
    result: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        k, v = line.split("=", 1)
        result[k.strip()] = v.strip().strip('"').strip("'")
    return result


def probe_os(etc: Path = Path("/etc")) -> tuple[dict[str, str], dict[str, str] | None]:
    osr: dict[str, str] = {}
    for cand in (etc / "os-release", Path("/usr/lib/os-release")):
        if cand.is_file():
            full = _parse_kv_file(cand)
            osr = {k: full[k] for k in ("ID", "VERSION_ID", "PRETTY_NAME") if k in full}
            break
    dgx_file = etc / "dgx-release"
    dgx = _parse_kv_file(dgx_file) if dgx_file.is_file() else None
    return osr, dgx


def _nvml_error_text(exc: BaseException) -> str:
    """'nvml: library not found' style text from a pynvml error."""
    text = str(exc).strip() or type(exc).__name__
    text = re.sub(r"^NVML\s+", "", text)
    text = text.replace("Shared Library Not Found", "library not found")
    return "nvml: " + text[:1].lower() + text[1:]


def probe_nvml() -> dict[str, Any]:
    """GPUs, driver, CUDA driver version and GPU processes via NVML. Returns a dict of HostFacts fields."""
    out: dict[str, Any] = {"nvml_error": None, "driver_version": None, "cuda_driver_version": None,
                           "gpus": [], "gpu_processes": None}
    try:
        import pynvml
    except ImportError:
        out["nvml_error"] = "nvml: python package nvidia-ml-py not installed"
        return out
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, NoPermission, ...
        out["nvml_error"] = _nvml_error_text(exc)
        return out
    try:
        def text(v: Any) -> str:
            return v.decode() if isinstance(v, bytes) else str(v)

        try:
            out["driver_version"] = text(pynvml.nvmlSystemGetDriverVersion())
        except Exception:
            pass
        try:
            v = int(pynvml.nvmlSystemGetCudaDriverVersion_v2())
            out["cuda_driver_version"] = f"{v // 1000}.{(v % 1000) // 10}"
        except Exception:
            pass
        procs: list[GPUProcess] = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = text(pynvml.nvmlDeviceGetName(h))
            try:
                major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
                cc: str | None = f"{major}.{minor}"
            except Exception:
                cc = None
            mem_total, mem_note = None, None
            try:
                mem_total = int(pynvml.nvmlDeviceGetMemoryInfo(h).total)
            except Exception as exc:  # GB10: NOT_SUPPORTED; the GPU's memory is the system's
                mem_note = _nvml_error_text(exc)
            try:
                uuid = text(pynvml.nvmlDeviceGetUUID(h))
            except Exception:
                uuid = None
            out["gpus"].append(GPU(i, name, cc, mem_total, mem_note, uuid))
            seen: set[int] = set()
            for getter in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
                try:
                    plist = getattr(pynvml, getter)(h)
                except Exception:
                    continue
                for p in plist:
                    pid = int(p.pid)
                    if pid in seen or pid == os.getpid():
                        continue
                    seen.add(pid)
                    used = getattr(p, "usedGpuMemory", None)
                    pname, cmd = _process_name(pid)
                    procs.append(GPUProcess(pid, pname, i, int(used) if isinstance(used, int) else None, cmd))
        out["gpu_processes"] = procs
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
    return out


def _process_name(pid: int) -> tuple[str | None, str | None]:
    try:
        import psutil

        p = psutil.Process(pid)
        name = p.name()
        try:
            cmd = " ".join(p.cmdline())[:300] or None
        except Exception:
            cmd = None
        return name, cmd
    except Exception:
        return None, None


def find_nvcc(env: Any = None) -> str | None:
    """The nvcc the engine build would use: $CUDACXX, PATH, $CUDA_HOME/$CUDA_PATH, /usr/local/cuda/bin, then the
    newest /usr/local/cuda-X.Y/bin (services often run without the toolkit on PATH)."""
    env = os.environ if env is None else env
    if env.get("CUDACXX"):
        found = shutil.which(env["CUDACXX"], path=env.get("PATH"))
        if found:
            return found
    found = shutil.which("nvcc", path=env.get("PATH"))
    if found:
        return found
    bases = [env.get("CUDA_HOME"), env.get("CUDA_PATH"), "/usr/local/cuda"]
    bases += [str(p) for p in sorted(Path("/usr/local").glob("cuda-*"), reverse=True)]
    for base in bases:
        if base:
            cand = Path(base) / "bin" / "nvcc"
            if cand.is_file() and os.access(cand, os.X_OK):
                return str(cand)
    return None


def probe_nvcc() -> tuple[Tool, list[str]]:
    path = find_nvcc()
    if not path:
        return Tool(None, error="nvcc: not found on PATH or in /usr/local/cuda/bin"), []
    try:
        text = _run([path, "--version"])
    except Exception as exc:
        return Tool(path, error=f"nvcc: {exc}"), []
    m = re.search(r"release (\d+\.\d+)", text)
    tool = Tool(path, m.group(1) if m else None, None if m else "nvcc: version not found in --version output")
    try:
        archs = sorted(set(re.findall(r"compute_\d+[a-z]?", _run([path, "--list-gpu-arch"]))),
                       key=lambda a: int(re.sub(r"\D", "", a)))
    except Exception as exc:
        tool.error = f"nvcc --list-gpu-arch: {exc}"
        archs = []
    return tool, archs


def _tool_version(path: str, pattern: str = r"(\d+\.\d+(?:\.\d+)?)") -> Tool:
    try:
        first = _run([path, "--version"]).strip().splitlines()[0]
    except Exception as exc:
        return Tool(path, error=f"{Path(path).name}: {exc}")
    m = re.search(pattern, first)
    return Tool(path, m.group(1) if m else None)


def _venv_bin() -> Path:
    return Path(sys.executable).parent


def _pypi_tool_dir(name: str) -> Path | None:
    """Where the `cmake` / `ninja` PyPI packages keep their binaries (what the engine build uses first)."""
    try:
        mod = __import__(name)
        d = getattr(mod, "CMAKE_BIN_DIR", None) or getattr(mod, "BIN_DIR", None)
        return Path(d) if d else None
    except Exception:
        return None


def probe_tool(names: list[str], prefer_venv: bool = False) -> Tool:
    """First of `names` found (with prefer_venv: the PyPI package's and the venv's bin first, as the build does)."""
    candidates: list[str] = []
    if prefer_venv:
        dirs = [d for d in (_pypi_tool_dir(names[0]), _venv_bin()) if d is not None]
        for d in dirs:
            for n in names:
                cand = d / n
                if cand.is_file() and os.access(cand, os.X_OK):
                    candidates.append(str(cand))
    for n in names:
        found = shutil.which(n)
        if found:
            candidates.append(found)
    if not candidates:
        return Tool(None, error=f"{names[0]}: not found (looked for {', '.join(names)})")
    return _tool_version(candidates[0])


def probe_cxx() -> Tool:
    names = [os.environ["CXX"]] if os.environ.get("CXX") else []
    names += ["c++", "g++", "clang++"]
    for n in names:
        found = shutil.which(n)
        if found:
            t = _tool_version(found, r"(\d+\.\d+(?:\.\d+)?)\s*(?:$|\()")
            if t.version is None and t.error is None:
                t = _tool_version(found)
            return t
    return Tool(None, error="c++ compiler: not found (looked for $CXX, c++, g++, clang++)")


def probe_memory() -> dict[str, Any]:
    import psutil

    vm = psutil.virtual_memory()
    sw = psutil.swap_memory()
    return {"mem_total": int(vm.total), "mem_available": int(vm.available), "mem_free": int(vm.free),
            "page_cache": int(getattr(vm, "cached", 0) + getattr(vm, "buffers", 0)), "swap_total": int(sw.total)}


def probe_earlyoom() -> tuple[bool, bool]:
    installed = shutil.which("earlyoom") is not None or Path("/usr/bin/earlyoom").exists()
    running = False
    try:
        import psutil

        for p in psutil.process_iter(["name"]):
            if (p.info.get("name") or "") == "earlyoom":
                running = True
                break
    except Exception:
        pass
    return installed or running, running


def nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def probe_disk(models_dir: Path) -> dict[str, Any]:
    where = nearest_existing(models_dir)
    usage = shutil.disk_usage(where)
    return {"disk_path": str(where), "disk_free": int(usage.free), "disk_total": int(usage.total)}


def probe_models_dir_bytes(models_dir: Path) -> int:
    """Bytes allocated (not apparent: partial downloads may be sparse) by regular files under models_dir."""
    total = 0
    if not models_dir.is_dir():
        return 0
    for root, _dirs, files in os.walk(models_dir):
        for f in files:
            try:
                st = os.lstat(os.path.join(root, f))
            except OSError:
                continue
            if not os.path.islink(os.path.join(root, f)):
                total += st.st_blocks * 512 if hasattr(st, "st_blocks") else st.st_size
    return total


def probe_systemd() -> bool:
    # sd_booted(3): systemd is PID 1 iff /run/systemd/system exists
    return Path("/run/systemd/system").is_dir()


def probe_port(host: str, port: int) -> dict[str, Any]:
    """Whether host:port can be bound; when not, who listens there (pid/name when the OS lets us see it)."""
    out: dict[str, Any] = {"port_free": None, "port_owner_pid": None, "port_owner_name": None,
                           "port_owner_cmdline": None}
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # ignore TIME_WAIT leftovers, like a server would
        s.bind((host, port))
        out["port_free"] = True
        return out
    except PermissionError:
        out["port_free"] = False
        out["port_owner_name"] = f"permission denied binding port {port} (ports < 1024 need root)"
        return out
    except OSError as exc:
        if exc.errno != 98:  # EADDRINUSE
            raise
        out["port_free"] = False
    finally:
        s.close()
    try:
        import psutil

        for c in psutil.net_connections(kind="inet"):
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port:
                if c.pid:
                    out["port_owner_pid"] = c.pid
                    out["port_owner_name"], out["port_owner_cmdline"] = _process_name(c.pid)
                break
    except Exception:
        pass  # not permitted to see other users' sockets: the port is still known to be busy
    return out


# ---------------------------------------------------------------------------------------------------------------


def probe(settings: Any = None, *, models_dir: Path | None = None, host: str | None = None,
          port: int | None = None) -> HostFacts:
    """Measure this host. Never raises; each failure is recorded in the fact it concerns and in `errors`."""
    models_dir = Path(models_dir or (settings.models_dir if settings is not None else
                                     Path.home() / ".local/share/spark-setup/models"))
    host = host or (settings.host if settings is not None else "127.0.0.1")
    port = int(port or (settings.port if settings is not None else 8000))
    errors: dict[str, str] = {}
    facts = HostFacts(models_dir=str(models_dir), host=host, port=port, errors=errors,
                      kernel=platform.release(), python=platform.python_version())

    # Probes run concurrently; each bounded by its own timeout.
    jobs: dict[str, tuple[Callable[[], Any], float]] = {
        "arch": (platform.machine, FS_TIMEOUT),
        "os": (probe_os, FS_TIMEOUT),
        "nvml": (probe_nvml, NVML_TIMEOUT),
        "nvcc": (probe_nvcc, CMD_TIMEOUT * 2 + 1),
        "memory": (probe_memory, FS_TIMEOUT),
        "earlyoom": (probe_earlyoom, FS_TIMEOUT),
        "disk": (lambda: probe_disk(models_dir), FS_TIMEOUT),
        "models_dir": (lambda: probe_models_dir_bytes(models_dir), FS_TIMEOUT),
        "cmake": (lambda: probe_tool(["cmake"], prefer_venv=True), CMD_TIMEOUT + 1),
        "cxx": (probe_cxx, CMD_TIMEOUT + 1),
        "make": (lambda: probe_tool(["make", "gmake"]), CMD_TIMEOUT + 1),
        "ninja": (lambda: probe_tool(["ninja"], prefer_venv=True), CMD_TIMEOUT + 1),
        "systemd": (probe_systemd, FS_TIMEOUT),
        "port": (lambda: probe_port(host, port), FS_TIMEOUT),
    }
    results: dict[str, Any] = {}
    threads = []
    for name, (fn, timeout) in jobs.items():
        t = threading.Thread(target=lambda n=name, f=fn, to=timeout: results.__setitem__(n, _guarded(n, f, to, errors)),
                             daemon=True)
        t.start()
        threads.append(t)
    for t in threads:
        t.join()

    facts.arch = results.get("arch") or ""
    if results.get("os"):
        facts.os_release, facts.dgx_release = results["os"]
    nv = results.get("nvml")
    if nv is None:
        facts.nvml_error = errors.get("nvml", "nvml: probe failed")
    else:
        for k, v in nv.items():
            setattr(facts, k, v)
        if facts.nvml_error:
            errors["nvml"] = facts.nvml_error
    if results.get("nvcc"):
        facts.nvcc, facts.nvcc_archs = results["nvcc"]
    elif "nvcc" in errors:
        facts.nvcc = Tool(find_nvcc(), error=errors["nvcc"])
    for k, v in (results.get("memory") or {}).items():
        setattr(facts, k, v)
    if results.get("earlyoom"):
        facts.earlyoom_installed, facts.earlyoom_running = results["earlyoom"]
    for k, v in (results.get("disk") or {}).items():
        setattr(facts, k, v)
    facts.models_dir_bytes = results.get("models_dir") or 0
    for k in ("cmake", "cxx", "make", "ninja"):
        if results.get(k) is not None:
            setattr(facts, k, results[k])
        elif k in errors:
            setattr(facts, k, Tool(None, error=errors[k]))
    facts.systemd_pid1 = results.get("systemd")
    for k, v in (results.get("port") or {}).items():
        setattr(facts, k, v)
    return facts
