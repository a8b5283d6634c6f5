"""A real systemd, booted in a throw-away container, for the service lifecycle tests.

tools/nspawn_root.sh prepares (once, cached) a Debian root; each test session boots it with
`systemd-nspawn --boot --volatile=overlay` (changes vanish at shutdown), a private network, and bind mounts of the
repository (with its .venv), the venv's interpreter and a scratch prefix at their host paths, so the same
`spark-setup` runs inside. Commands enter through nsenter.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def unavailable() -> str | None:
    """Why the container cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (systemd-nspawn)"
    for tool in ("systemd-nspawn", "debootstrap", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} missing: apt-get install -y systemd-container debootstrap"
    return None


def prepare_root() -> Path:
    cp = subprocess.run(["bash", str(REPO / "tools" / "nspawn_root.sh")], capture_output=True, text=True,
                        timeout=900)
    if cp.returncode != 0:
        raise RuntimeError(f"tools/nspawn_root.sh failed:\n{cp.stderr[-3000:]}")
    return Path(cp.stdout.strip().splitlines()[-1])


class Container:
    def __init__(self, root: Path, binds_ro: list[Path], binds_rw: list[Path], log: Path, lifetime_s: int = 900):
        self.root = root
        self.binds_ro = [Path(p) for p in binds_ro]
        self.binds_rw = [Path(p) for p in binds_rw]
        self.log = log
        self.lifetime_s = lifetime_s
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None  # the container's systemd (PID 1 inside)

    # -- lifecycle
    def boot(self, timeout_s: float = 120) -> None:
        argv = ["timeout", str(self.lifetime_s), "systemd-nspawn", "-D", str(self.root), "--boot", "--register=no",
                "--keep-unit", "-q", "--private-network", "--volatile=overlay", "--console=passive"]
        argv += [f"--bind-ro={p}" for p in self.binds_ro] + [f"--bind={p}" for p in self.binds_rw]
        self._logf = open(self.log, "wb")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._logf, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited ({self.proc.returncode}): {self.log.read_text()[-2000:]}")
            if self.pid is None:
                self.pid = self._find_init()
            if self.pid is not None:
                cp = self.run(["systemctl", "is-system-running"], timeout=10)
                if cp.stdout.strip() in ("running", "degraded"):
                    return
            time.sleep(0.5)
        raise RuntimeError(f"the container's systemd did not come up in {timeout_s} s: {self.log.read_text()[-2000:]}")

    def _find_init(self) -> int | None:
        try:
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                if child.name() == "systemd":
                    return child.pid
        except psutil.Error:
            pass
        return None

    def shutdown(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None and self.pid is not None:
            subprocess.run(self._enter(["systemctl", "poweroff"]), capture_output=True, timeout=30)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait(10)
        self._logf.close()

    def __enter__(self) -> "Container":
        try:
            self.boot()
        except BaseException:
            self.shutdown()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # -- commands inside
    def _enter(self, argv: list[str], env: dict[str, str] | None = None) -> list[str]:
        base_env = {"PATH": CONTAINER_PATH, "HOME": "/root", "LANG": "C.UTF-8", "USER": "root", "TERM": "dumb",
                    "COLUMNS": "200"}
        base_env.update(env or {})
        return (["nsenter", "-t", str(self.pid), "-m", "-u", "-i", "-n", "-p", "--", "env", "-i"]
                + [f"{k}={v}" for k, v in base_env.items()] + list(argv))

    def run(self, argv: list[str], env: dict[str, str] | None = None, timeout: float = 120,
            check: bool = False) -> subprocess.CompletedProcess:
        cp = subprocess.run(self._enter(argv, env), capture_output=True, text=True, timeout=timeout)
        if check and cp.returncode != 0:
            raise AssertionError(f"{argv} exited {cp.returncode}:\n{cp.stdout}\n{cp.stderr}")
        return cp

    def popen(self, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        return subprocess.Popen(self._enter(argv, env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        cp = self.run(["systemctl", "show", unit, "--no-pager"] + [f"--property={p}" for p in props], check=True)
        return dict(line.partition("=")[::2] for line in cp.stdout.splitlines() if "=" in line)

    def journal(self, unit: str) -> str:
        return self.run(["journalctl", "-u", unit, "--no-pager", "-o", "short-iso"]).stdout

    def http_status(self, url: str, timeout: float = 5) -> int | None:
        """GET url from inside the container (its private network); None when nothing answers."""
        code = ("import sys, urllib.request, urllib.error\n"
                "try:\n"
                f"    r = urllib.request.urlopen({url!r}, timeout={timeout}); print(r.status)\n"
                "except urllib.error.HTTPError as e: print(e.code)\n"
                "except Exception: print('none')\n")
        cp = self.run([sys.executable, "-c", code], timeout=timeout + 30)
        out = cp.stdout.strip()
        return int(out) if out.isdigit() else None


def python_home_binds() -> list[Path]:
    """The venv's interpreter, when it lives outside /usr (pyenv and the like): bind it at the same path."""
    base = Path(sys.base_prefix)
    return [] if base == Path("/usr") else [base]


def venv_mismatch(root: Path) -> str | None:
    """Why this venv cannot run inside `root`, or None. A venv on /usr's Python needs the same Python version in
    the container (bookworm: 3.11); one on a Python elsewhere (pyenv) is bind-mounted and always works."""
    if Path(sys.base_prefix) != Path("/usr"):
        return None
    exe = f"python{sys.version_info.major}.{sys.version_info.minor}"
    if (root / "usr" / "bin" / exe).exists():
        return None
    return f"the venv uses /usr/bin/{exe}, which the Debian bookworm container does not have"
