"""Build the bundled engine (libds4engine.so) for this machine into a versioned, cached prefix.

`build_engine(settings, arch="auto")` picks the architecture (GB10 -> sm_121, H100/H200 -> sm_90, other GPUs ->
their compute capability, no GPU or no nvcc -> cpu), hashes the engine sources together with the arch and the
compiler versions into a key, and builds with CMake + Ninja (both from PyPI) into `<prefix>/engine/<key>/`.
A finished build with the same key is reused. One CMake build tree per arch is kept under
`<prefix>/engine/.build-<arch>` so that a source change rebuilds incrementally.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

from ..errors import UsageError, UserError
from ..settings import Settings

ENGINE_DIR = Path(__file__).resolve().parent
LIB_NAME = "libds4engine.so"
ARTIFACTS = (LIB_NAME, "gguf_check", "quant_check", "bench_matvec")  # those that exist after the build are kept
MANIFEST = "manifest.json"
KEY_LEN = 16
KEEP_BUILDS = 3  # finished builds kept per arch (the current one included); older ones are removed

# First CUDA release whose nvcc targets each arch (for the "nvcc too old" message; nvcc --list-gpu-code decides).
MIN_CUDA = {"sm_75": "10.0", "sm_80": "11.0", "sm_86": "11.1", "sm_87": "11.4", "sm_89": "11.8", "sm_90": "11.8",
            "sm_100": "12.8", "sm_101": "12.8", "sm_103": "12.9", "sm_110": "13.0", "sm_120": "12.8",
            "sm_121": "12.9"}

Progress = Union[bool, Callable[[int, int, str], None]]


@dataclass
class Toolchain:
    cxx: str
    cxx_version: str
    cmake: str
    cmake_version: str
    ninja: str
    nvcc: Optional[str] = None
    nvcc_version: Optional[str] = None  # "13.0"
    nvcc_codes: list[str] = field(default_factory=list)  # sm_XX it can compile for


@dataclass
class BuildResult:
    key: str
    arch: str
    build_dir: Path
    lib_path: Path
    up_to_date: bool
    manifest: dict[str, Any]
    note: str = ""  # e.g. why auto fell back to cpu


# ---- tool discovery --------------------------------------------------------------------------------------------

def _run(cmd: list[str], timeout: float = 30) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)
    return (out.stdout or "") + (out.stderr or "")


def find_cxx() -> Optional[str]:
    cands = [os.environ.get("CXX", "")] + ["c++", "g++", "clang++"]
    for c in cands:
        if c and (p := shutil.which(c)):
            return p
    return None


def find_nvcc() -> Optional[str]:
    env = os.environ.get("CUDACXX")
    if env and shutil.which(env):
        return shutil.which(env)
    if p := shutil.which("nvcc"):
        return p
    for d in ("/usr/local/cuda/bin/nvcc", *sorted(Path("/usr/local").glob("cuda-*/bin/nvcc"), reverse=True)):
        if os.access(str(d), os.X_OK):
            return str(d)
    return None


def _cmake_bin() -> str:
    try:
        import cmake  # the PyPI package

        p = Path(cmake.CMAKE_BIN_DIR) / "cmake"
        if p.exists():
            return str(p)
    except Exception:  # pragma: no cover - package missing or odd layout
        pass
    if p2 := shutil.which("cmake"):
        return p2
    raise UserError("cmake not found", "reinstall spark-setup (it depends on the cmake package from PyPI)")


def _ninja_bin() -> str:
    try:
        import ninja

        p = Path(ninja.BIN_DIR) / "ninja"
        if p.exists():
            return str(p)
    except Exception:  # pragma: no cover
        pass
    if p2 := shutil.which("ninja"):
        return p2
    raise UserError("ninja not found", "reinstall spark-setup (it depends on the ninja package from PyPI)")


def nvcc_version(nvcc: str) -> str:
    m = re.search(r"release (\d+)\.(\d+)", _run([nvcc, "--version"]))
    if not m:
        raise UserError(f"cannot read the version of {nvcc}", "check the CUDA toolkit installation")
    return f"{m.group(1)}.{m.group(2)}"


def toolchain(need_cuda: bool) -> Toolchain:
    cxx = find_cxx()
    if not cxx:
        raise UserError("no C++ compiler found (looked for $CXX, c++, g++, clang++)",
                        "install one, e.g. sudo apt install build-essential")
    cmake = _cmake_bin()
    tc = Toolchain(cxx=cxx, cxx_version=_run([cxx, "--version"]).splitlines()[0].strip(), cmake=cmake,
                   cmake_version=_run([cmake, "--version"]).splitlines()[0].strip(), ninja=_ninja_bin())
    if need_cuda:
        nvcc = find_nvcc()
        if nvcc:
            tc.nvcc = nvcc
            tc.nvcc_version = nvcc_version(nvcc)
            try:
                tc.nvcc_codes = _run([nvcc, "--list-gpu-code"]).split()
            except (subprocess.SubprocessError, OSError):
                tc.nvcc_codes = []
    return tc


# ---- arch ------------------------------------------------------------------------------------------------------

def gpu_compute_capability() -> Optional[tuple[int, int]]:
    """Compute capability of GPU 0 (pynvml, then nvidia-smi), or None when there is no usable NVIDIA GPU."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            if pynvml.nvmlDeviceGetCount() > 0:
                h = pynvml.nvmlDeviceGetHandleByIndex(0)
                major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
                return int(major), int(minor)
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        pass
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = _run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"], timeout=20)
            m = re.match(r"\s*(\d+)\.(\d+)", out)
            if m:
                return int(m.group(1)), int(m.group(2))
        except (subprocess.SubprocessError, OSError):
            pass
    return None


def normalize_arch(arch: str) -> str:
    a = arch.strip().lower()
    if a in ("auto", "cpu"):
        return a
    m = re.fullmatch(r"(?:sm_?)?(\d)(\d+)", a)
    if not m:
        raise UsageError(f"--arch must be auto, cpu or sm_XY (e.g. sm_121, sm_90), got {arch!r}",
                         "use --arch auto to detect the GPU")
    return f"sm_{m.group(1)}{m.group(2)}"


def resolve_arch(arch: str) -> tuple[str, str]:
    """(arch, note): arch is 'cpu' or 'sm_XY'."""
    a = normalize_arch(arch)
    if a != "auto":
        return a, ""
    cc = gpu_compute_capability()
    if cc is None:
        return "cpu", "no NVIDIA GPU found: building the CPU backend only"
    if find_nvcc() is None:
        return "cpu", f"GPU sm_{cc[0]}{cc[1]} found but no nvcc: building the CPU backend only (install the CUDA toolkit)"
    return f"sm_{cc[0]}{cc[1]}", ""


def check_cuda_arch(tc: Toolchain, arch: str) -> None:
    need = MIN_CUDA.get(arch)
    if tc.nvcc is None:
        raise UserError(f"--arch {arch} needs nvcc, which was not found",
                        f"install the CUDA toolkit (>= {need or '13.0'}), put nvcc on PATH or set CUDACXX; "
                        "or build with --arch cpu")
    if tc.nvcc_codes and arch not in tc.nvcc_codes:
        why = f"CUDA >= {need} is needed" if need else f"it supports {', '.join(tc.nvcc_codes)}"
        raise UserError(f"nvcc {tc.nvcc_version} ({tc.nvcc}) cannot compile for {arch}: {why}",
                        "install a newer CUDA toolkit, or build with --arch cpu")
    if need and not tc.nvcc_codes:
        if tuple(map(int, tc.nvcc_version.split("."))) < tuple(map(int, need.split("."))):
            raise UserError(f"nvcc {tc.nvcc_version} ({tc.nvcc}) cannot compile for {arch}: CUDA >= {need} is needed",
                            "install a newer CUDA toolkit, or build with --arch cpu")


# ---- key -------------------------------------------------------------------------------------------------------

def source_files() -> list[Path]:
    files = [ENGINE_DIR / "CMakeLists.txt"]
    files += sorted(p for p in (ENGINE_DIR / "csrc").rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    return files


def sources_hash() -> str:
    h = hashlib.sha256()
    for p in source_files():
        rel = p.relative_to(ENGINE_DIR).as_posix()
        data = p.read_bytes()
        h.update(f"{rel}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def build_key(arch: str, tc: Toolchain, src_hash: Optional[str] = None) -> str:
    h = hashlib.sha256()
    parts = [src_hash or sources_hash(), arch, tc.cxx, tc.cxx_version, tc.cmake_version]
    if arch != "cpu":
        parts += [tc.nvcc or "", tc.nvcc_version or ""]
    h.update("\n".join(parts).encode())
    return h.hexdigest()[:KEY_LEN]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _valid_build(out_dir: Path) -> Optional[dict[str, Any]]:
    """The manifest of a finished build whose library still matches its recorded sha256, else None."""
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text())
        art = manifest["artifacts"][LIB_NAME]
        lib = out_dir / LIB_NAME
        if lib.stat().st_size != art["size"] or _sha256(lib) != art["sha256"]:
            return None
        return manifest
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ---- building --------------------------------------------------------------------------------------------------

@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


_NINJA_RE = re.compile(r"^\[(\d+)/(\d+)\]\s*(.*)$")


def _stream(cmd: list[str], log, on_line: Callable[[str], None], env: dict[str, str], cwd: Path) -> int:
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=str(cwd),
                            errors="replace")
    assert proc.stdout is not None
    for line in proc.stdout:
        log.write(line)
        on_line(line.rstrip("\n"))
    return proc.wait()


def _first_error(log_path: Path) -> str:
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    for pat in (r"\berror\b", r"CMake Error", r"FAILED"):
        for ln in lines:
            if re.search(pat, ln):
                return ln.strip()[:300]
    return ""


def _progress_reporter(progress: Progress):
    """(callback(done, total, what), close). True -> a rich bar on stderr; False -> nothing; callable -> it."""
    if callable(progress):
        return progress, lambda: None
    if not progress:
        return (lambda d, t, w: None), lambda: None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn

    bar = RichProgress(TextColumn("building engine"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       TextColumn("{task.description}"), console=Console(stderr=True), transient=True)
    task = bar.add_task("", total=None)
    bar.start()

    def cb(done: int, total: int, what: str) -> None:
        bar.update(task, completed=done, total=total, description=what[-60:])

    return cb, bar.stop


def _cmake_args(arch: str, tc: Toolchain, build_dir: Path) -> list[str]:
    args = [tc.cmake, "-S", str(ENGINE_DIR), "-B", str(build_dir), "-G", "Ninja",
            f"-DCMAKE_MAKE_PROGRAM={tc.ninja}", f"-DCMAKE_CXX_COMPILER={tc.cxx}", "-DCMAKE_BUILD_TYPE=Release",
            f"-DDS4_ARCH_NAME={arch}"]
    if arch == "cpu":
        args += ["-DDS4_CUDA=OFF"]
    else:
        args += ["-DDS4_CUDA=ON", f"-DDS4_CUDA_ARCH={arch[3:]}", f"-DCMAKE_CUDA_COMPILER={tc.nvcc}"]
    return args


def build_engine(settings: Settings, arch: str = "auto", jobs: Optional[int] = None, force: bool = False,
                 progress: Progress = True) -> BuildResult:
    arch, note = resolve_arch(arch)
    tc = toolchain(need_cuda=arch != "cpu")
    if arch != "cpu":
        check_cuda_arch(tc, arch)
    if jobs is not None and jobs < 1:
        raise UsageError(f"--jobs must be >= 1, got {jobs}", "omit --jobs to use every core")
    key = build_key(arch, tc)
    engine_dir = settings.engine_dir
    out_dir = engine_dir / key
    if not force and (manifest := _valid_build(out_dir)) is not None:
        return BuildResult(key, arch, out_dir, out_dir / LIB_NAME, True, manifest, note)

    with _locked(engine_dir / f".lock-{arch}"):
        if not force and (manifest := _valid_build(out_dir)) is not None:  # another process just built it
            return BuildResult(key, arch, out_dir, out_dir / LIB_NAME, True, manifest, note)
        tree = engine_dir / f".build-{arch}"
        log_dir = engine_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"build-{key}.log"
        env = dict(os.environ)
        env["NINJA_STATUS"] = "[%f/%t] "
        if tc.nvcc:
            env["CUDACXX"] = tc.nvcc
        cb, close = _progress_reporter(progress)
        t0 = time.monotonic()
        try:
            with open(log_path, "w") as log:
                def on_line(line: str) -> None:
                    m = _NINJA_RE.match(line)
                    if m:
                        cb(int(m.group(1)), int(m.group(2)), m.group(3))

                if force and tree.exists():
                    shutil.rmtree(tree)
                cb(0, 0, "configuring")
                rc = _stream(_cmake_args(arch, tc, tree), log, on_line, env, engine_dir)
                if rc != 0 and tree.exists():
                    # A tree configured by another toolchain can refuse to reconfigure: start clean once.
                    log.write("\n# configure failed; retrying in a clean build tree\n")
                    shutil.rmtree(tree)
                    rc = _stream(_cmake_args(arch, tc, tree), log, on_line, env, engine_dir)
                if rc != 0:
                    log.flush()
                    raise UserError(f"engine configure failed ({_first_error(log_path) or 'cmake exit ' + str(rc)}); "
                                    f"full log: {log_path}", f"read {log_path}")
                n = jobs or os.cpu_count() or 1
                rc = _stream([tc.ninja, "-C", str(tree), f"-j{n}"], log, on_line, env, engine_dir)
                if rc != 0:
                    log.flush()
                    raise UserError(f"engine build failed ({_first_error(log_path) or 'ninja exit ' + str(rc)}); "
                                    f"full log: {log_path}", f"read {log_path}")
        finally:
            close()
        seconds = round(time.monotonic() - t0, 2)

        staging = engine_dir / f".{key}.tmp-{os.getpid()}"
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        artifacts: dict[str, dict[str, Any]] = {}
        for name in ARTIFACTS:
            src = tree / name
            if src.exists():
                shutil.copy2(src, staging / name)
                artifacts[name] = {"sha256": _sha256(staging / name), "size": (staging / name).stat().st_size}
        if LIB_NAME not in artifacts:
            raise UserError(f"engine build produced no {LIB_NAME}; full log: {log_path}", f"read {log_path}")
        shutil.copy2(log_path, staging / "build.log")
        manifest = {
            "key": key,
            "arch": arch,
            "cuda": arch != "cpu",
            "sources_sha256": sources_hash(),
            "compiler": {"cxx": tc.cxx, "cxx_version": tc.cxx_version, "cmake_version": tc.cmake_version,
                         "nvcc": tc.nvcc if arch != "cpu" else None,
                         "nvcc_version": tc.nvcc_version if arch != "cpu" else None},
            "build_seconds": seconds,
            "jobs": jobs or os.cpu_count() or 1,
            "python": sys.version.split()[0],
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "artifacts": artifacts,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
        prune_builds(engine_dir, arch, keep=key)
        return BuildResult(key, arch, out_dir, out_dir / LIB_NAME, False, manifest, note)


def prune_builds(engine_dir: Path, arch: str, keep: str, n_keep: int = KEEP_BUILDS) -> list[Path]:
    """Remove all but the newest `n_keep` builds of `arch` (never `keep`). A process that has a removed library
    loaded keeps running: its mapping stays valid after the unlink."""
    others = []
    for mf in engine_dir.glob(f"*/{MANIFEST}"):
        try:
            m = json.loads(mf.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(m, dict) and m.get("arch") == arch and mf.parent.name != keep:
            others.append((mf.stat().st_mtime, mf.parent))
    removed = []
    for _, d in sorted(others, reverse=True)[max(0, n_keep - 1):]:
        shutil.rmtree(d, ignore_errors=True)
        (engine_dir / "logs" / f"build-{d.name}.log").unlink(missing_ok=True)
        removed.append(d)
    return removed


def find_engine(settings: Settings, arch: Optional[str] = None) -> Optional[Path]:
    """The library built from the current sources (for `arch`, or for any arch, GPU builds first), or None."""
    engine_dir = settings.engine_dir
    if not engine_dir.is_dir():
        return None
    src = sources_hash()
    candidates: list[tuple[int, float, Path, dict[str, Any]]] = []
    for mf in engine_dir.glob(f"*/{MANIFEST}"):
        try:
            m = json.loads(mf.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(m, dict) or m.get("sources_sha256") != src:
            continue
        if arch is not None and m.get("arch") != normalize_arch(arch):
            continue
        candidates.append((0 if m.get("cuda") else 1, -mf.stat().st_mtime, mf.parent, m))
    for _, _, d, m in sorted(candidates, key=lambda c: (c[0], c[1])):
        try:
            tc = toolchain(need_cuda=bool(m.get("cuda")))
        except UserError:
            continue
        if build_key(m["arch"], tc, src) == d.name and _valid_build(d) is not None:
            return d / LIB_NAME
    return None
