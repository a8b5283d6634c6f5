"""The server as a systemd service: render the unit and its environment file, install, enable, start, follow
readiness, stop, and report; plus the detached "foreground" server that `install --demo` leaves behind when
systemd is not PID 1.

Functions return data (and report progress through a callback); only command modules print.

Units: system scope (default) writes /etc/systemd/system/spark-setup.service and /etc/spark-setup/server.env and
runs as a dedicated system user; user scope writes ~/.config/systemd/user/spark-setup.service and
~/.config/spark-setup/server.env (needs `loginctl enable-linger` to run without a login session).
"""

from __future__ import annotations

import difflib
import json
import math
import os
import pwd
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Literal

import httpx
import jinja2
import psutil

from .errors import UsageError, UserError
from .settings import Settings

Scope = Literal["system", "user"]

UNIT_NAME = "spark-setup.service"
SERVICE_USER = "spark-setup"
SYSTEM_UNIT_DIR = Path("/etc/systemd/system")
SYSTEM_ENV_FILE = Path("/etc/spark-setup/server.env")
TEMPLATES = Path(__file__).resolve().parent / "templates"

# Start timeout: the model is read once from disk before READY=1. 100 MiB/s is a slow SATA disk or a cold network
# mount, several times slower than a Spark's NVMe, so the timeout only fires on a real hang; the server also sends
# EXTEND_TIMEOUT_USEC= while it makes progress.
CONSERVATIVE_DISK_BYTES_PER_S = 100 * 2**20
START_MARGIN_S = 120
MIN_START_TIMEOUT_S = 600
START_LIMIT_INTERVAL_S = 900
START_LIMIT_BURST = 5

HOME_ROOTS = (Path("/home"), Path("/root"), Path("/run/user"))
_UNSAFE_CHARS = set(" \t\n\"'\\$%;`")

ProgressFn = Callable[["Readiness"], None]


# ----------------------------------------------------------------------------------------------- rendering

@dataclass(frozen=True)
class UnitSpec:
    """Everything the templates need; built by `unit_spec`, rendered by `render_units`."""

    scope: Scope
    exec_path: Path
    model_path: Path
    mtp_path: Path | None
    host: str
    port: int
    prefix: Path
    models_dir: Path
    state_dir: Path  # the service's own writable directory
    engine_lib: Path | None
    user: str | None
    group: str | None
    unit_path: Path
    env_path: Path
    model_bytes: int
    mtp_flag: str | None = None
    extra_env: tuple[tuple[str, str], ...] = ()

    @property
    def with_mtp(self) -> bool:
        return self.mtp_path is not None


def start_timeout(model_bytes: int) -> tuple[int, str]:
    """TimeoutStartSec for a model of `model_bytes`, and the one-line reason written into the unit."""
    read_s = math.ceil(max(0, model_bytes) / CONSERVATIVE_DISK_BYTES_PER_S)
    secs = max(MIN_START_TIMEOUT_S, read_s + START_MARGIN_S)
    gib = model_bytes / 2**30
    reason = (f"{gib:.1f} GiB of model at a conservative {CONSERVATIVE_DISK_BYTES_PER_S // 2**20} MiB/s = {read_s} s, "
              f"+{START_MARGIN_S} s, never below {MIN_START_TIMEOUT_S} s")
    return secs, reason


def _under_home(path: Path) -> bool:
    p = Path(os.path.abspath(path))
    return any(p == root or root in p.parents for root in HOME_ROOTS)


def protect_home(paths: Iterable[Path]) -> tuple[str, str]:
    """ProtectHome= value: `yes` unless something the server needs lives under /home, /root or /run/user."""
    inside = sorted({str(p) for p in paths if p is not None and _under_home(p)})
    if not inside:
        return "yes", "homes are hidden: nothing the server needs lives in /home, /root or /run/user"
    return "read-only", f"the server reads files in a home directory ({inside[0]}), so homes stay visible, read-only"


def private_tmp(paths: Iterable[Path]) -> tuple[str, str]:
    """PrivateTmp= value: `yes` unless something the server needs lives under /tmp or /var/tmp (it would vanish)."""
    inside = sorted({str(p) for p in paths if p is not None and any(
        Path(os.path.abspath(p)) == t or t in Path(os.path.abspath(p)).parents
        for t in (Path("/tmp"), Path("/var/tmp")))})
    if not inside:
        return "yes", "a private /tmp and /var/tmp"
    return "no", f"the server needs {inside[0]}, which a private /tmp would hide"


def user_config_dir(home: Path | None = None) -> Path:
    if home is None and os.environ.get("XDG_CONFIG_HOME"):
        return Path(os.environ["XDG_CONFIG_HOME"])
    return Path(home or os.environ.get("HOME") or Path.home()) / ".config"


def unit_locations(scope: Scope, home: Path | None = None) -> tuple[Path, Path]:
    """(unit file, environment file) for a scope."""
    if scope == "system":
        return SYSTEM_UNIT_DIR / UNIT_NAME, SYSTEM_ENV_FILE
    cfg = user_config_dir(home)
    return cfg / "systemd" / "user" / UNIT_NAME, cfg / "spark-setup" / "server.env"


def current_exec_path() -> Path:
    """The `spark-setup` executable of the install that is running now (the unit runs the same install)."""
    candidate = Path(sys.executable).parent / "spark-setup"
    if candidate.exists():
        return Path(os.path.abspath(candidate))
    found = shutil.which("spark-setup")
    if found:
        return Path(os.path.abspath(found))
    raise UserError("cannot find the spark-setup executable of this install",
                    "install with install.sh, or run from the venv that has spark-setup")


def service_state_dir(settings: Settings) -> Path:
    """The one directory the service may write (ProtectSystem=strict makes everything else read-only)."""
    return settings.state_dir / "server"


def _check_path(name: str, path: Path | None) -> None:
    if path is not None and _UNSAFE_CHARS & set(str(path)):
        raise UsageError(f"{name} {path} contains a space, quote, '$', '%' or ';', which a unit file cannot carry",
                         f"choose a {name} without those characters")


def unit_spec(settings: Settings, *, scope: Scope, model: Path, mtp: Path | None = None,
              engine_lib: Path | None = None, exec_path: Path | None = None, user: str | None = SERVICE_USER,
              home: Path | None = None, model_bytes: int | None = None, mtp_flag: str | None = None,
              extra_env: Iterable[tuple[str, str]] = ()) -> UnitSpec:
    if scope not in ("system", "user"):
        raise UsageError(f"unknown scope {scope!r}", "use --system or --user")
    exec_path = Path(exec_path) if exec_path is not None else current_exec_path()
    model = Path(os.path.abspath(model))
    mtp = Path(os.path.abspath(mtp)) if mtp is not None else None
    for name, p in (("executable path", exec_path), ("model path", model), ("MTP model path", mtp),
                    ("state dir", settings.state_dir), ("engine library path", engine_lib)):
        _check_path(name, p)
    if model_bytes is None:
        model_bytes = sum(p.stat().st_size for p in (model, mtp) if p is not None and p.exists())
    unit_path, env_path = unit_locations(scope, home)
    return UnitSpec(scope=scope, exec_path=exec_path, model_path=model, mtp_path=mtp, host=settings.host,
                    port=settings.port, prefix=settings.prefix, models_dir=settings.models_dir,
                    state_dir=service_state_dir(settings), engine_lib=engine_lib,
                    user=user if scope == "system" else None,
                    group=_primary_group(user) if scope == "system" else None,
                    unit_path=unit_path, env_path=env_path, model_bytes=model_bytes, mtp_flag=mtp_flag,
                    extra_env=tuple(extra_env))


def _primary_group(user: str | None) -> str | None:
    """The user's primary group (the dedicated user, created with --user-group, gets its own name)."""
    if user is None:
        return None
    try:
        import grp

        return grp.getgrgid(pwd.getpwnam(user).pw_gid).gr_name
    except (KeyError, ImportError):
        return user


def _python_home() -> Path:
    return Path(sys.base_prefix)


def _env() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), trim_blocks=True, lstrip_blocks=True,
                              keep_trailing_newline=True, undefined=jinja2.StrictUndefined, autoescape=False)


def render_units(spec: UnitSpec, python_home: Path | None = None) -> dict[Path, str]:
    """{unit path: text, env path: text} for a spec. `python_home` (the interpreter's prefix) matters for
    ProtectHome: a venv whose Python lives in a home directory needs homes readable."""
    timeout, timeout_reason = start_timeout(spec.model_bytes)
    needed = [spec.exec_path, spec.model_path, spec.mtp_path, spec.engine_lib, spec.state_dir,
              python_home if python_home is not None else _python_home()]
    ph, ph_reason = protect_home(needed)
    pt, pt_reason = private_tmp(needed)
    loopback = spec.host in ("127.0.0.1", "localhost", "::1")
    ctx = dict(asdict(spec), with_mtp=spec.with_mtp, unit_name=UNIT_NAME, env_file=spec.env_path,
               timeout_start_sec=timeout, timeout_reason=timeout_reason, protect_home=ph,
               protect_home_reason=ph_reason, private_tmp=pt, private_tmp_reason=pt_reason,
               loopback_only=loopback, start_limit_interval=START_LIMIT_INTERVAL_S,
               start_limit_burst=START_LIMIT_BURST)
    env = _env()
    unit = env.get_template("spark-setup.service.j2").render(**ctx)
    envfile = env.get_template("spark-setup.env.j2").render(**ctx)
    return {spec.unit_path: unit, spec.env_path: envfile}


def canonical_specs() -> dict[str, UnitSpec]:
    """The units as committed in systemd/: default settings with the prefix pinned so they do not depend on who
    renders them (system: /opt/spark-setup; user: HOME=/home/spark), the default variant, no MTP."""
    from .catalog import DEFAULT_VARIANT, VARIANTS
    from .settings import load_settings

    out = {}
    for scope, home, prefix in (("system", Path("/root"), Path("/opt/spark-setup")),
                                ("user", Path("/home/spark"), Path("/home/spark/.local/share/spark-setup"))):
        s = load_settings({"prefix": prefix}, env={}, config_file=Path("/nonexistent/spark-setup.toml"))
        v = VARIANTS[DEFAULT_VARIANT]
        out[scope] = unit_spec(s, scope=scope, model=s.models_dir / v.file, exec_path=prefix / "venv/bin/spark-setup",
                               home=home, model_bytes=v.approx_bytes, engine_lib=None)
    return out


def render_canonical() -> dict[str, str]:
    """{relative path under systemd/: text} for the committed units (python home pinned to /usr)."""
    files = {}
    for scope, spec in canonical_specs().items():
        rendered = render_units(spec, python_home=Path("/usr"))
        files[f"{scope}/{UNIT_NAME}"] = rendered[spec.unit_path]
        files[f"{scope}/server.env"] = rendered[spec.env_path]
    return files


def diff_text(path: Path, new: str) -> str:
    """Unified diff of what is at `path` (empty if absent) against `new`; '' when identical."""
    try:
        old = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        old = ""
    except OSError as exc:
        old = f"<unreadable: {exc.strerror}>\n"
    if old == new:
        return ""
    return "".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True),
                                        fromfile=f"{path} (installed)" if old else "/dev/null",
                                        tofile=f"{path} (new)"))


# ----------------------------------------------------------------------------------------------- systemctl

def systemd_booted() -> bool:
    """True when systemd is PID 1 (sd_booted: /run/systemd/system exists)."""
    return Path("/run/systemd/system").is_dir()


def user_manager_running() -> bool:
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"
    return Path(runtime, "systemd", "private").exists()


class Systemctl:
    """systemctl/journalctl for one scope; system scope goes through sudo when we are not root."""

    def __init__(self, scope: Scope, sudo: bool | None = None):
        self.scope = scope
        self.sudo = (scope == "system" and os.geteuid() != 0) if sudo is None else sudo

    def _prefix(self) -> list[str]:
        return ["sudo"] if self.sudo else []

    def cmd(self, *args: str) -> list[str]:
        base = ["systemctl"] + (["--user"] if self.scope == "user" else [])
        return self._prefix() + base + list(args)

    def run(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        argv = self.cmd(*args)
        try:
            cp = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except FileNotFoundError:
            raise UserError("systemctl is not installed", "run the server in the foreground: spark-setup serve --foreground")
        except subprocess.TimeoutExpired:
            raise UserError(f"`{shlex.join(argv)}` did not answer in {timeout:.0f} s", "check `systemctl status`")
        if check and cp.returncode != 0:
            msg = (cp.stderr or cp.stdout).strip().splitlines()
            raise UserError(f"`{shlex.join(argv)}` failed: {msg[-1] if msg else f'exit {cp.returncode}'}",
                            f"see `{'journalctl --user' if self.scope == 'user' else 'journalctl'} -u {UNIT_NAME}`")
        return cp

    def privileged(self, argv: list[str], what: str) -> None:
        """Run a root-only helper command (install, useradd, ...) in this scope."""
        full = (self._prefix() if self.scope == "system" else []) + argv
        cp = subprocess.run(full, capture_output=True, text=True)
        if cp.returncode != 0:
            raise UserError(f"{what} failed: {(cp.stderr or cp.stdout).strip() or f'exit {cp.returncode}'}",
                            "run as root, or use --user for a per-user service")

    def show(self, *props: str) -> dict[str, str]:
        cp = self.run("show", UNIT_NAME, "--no-pager", *(f"--property={p}" for p in props), check=False, timeout=15)
        out = {}
        for line in cp.stdout.splitlines():
            k, _, v = line.partition("=")
            out[k] = v
        return out

    def journal_cmd(self, follow: bool = False, lines: int | None = None) -> list[str]:
        argv = self._prefix() + ["journalctl"]
        argv += ["--user-unit", UNIT_NAME] if self.scope == "user" else ["-u", UNIT_NAME]
        argv += ["--no-pager", "-o", "short-iso"]
        if lines is not None:
            argv += ["-n", str(lines)]
        if follow:
            argv.append("-f")
        return argv


def can_sudo() -> bool:
    """True when we are root or `sudo -n true` works (no password prompt needed)."""
    if os.geteuid() == 0:
        return True
    if not shutil.which("sudo"):
        return False
    try:
        return subprocess.run(["sudo", "-n", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def default_scope() -> Scope:
    return "system" if can_sudo() else "user"


def installed_scopes(home: Path | None = None) -> list[Scope]:
    return [s for s in ("system", "user") if unit_locations(s, home)[0].exists()]  # type: ignore[misc]


def linger_enabled(user: str | None = None) -> bool | None:
    user = user or pwd.getpwuid(os.getuid()).pw_name
    if Path("/var/lib/systemd/linger", user).exists():
        return True
    return False if Path("/var/lib/systemd/linger").is_dir() else None


# ----------------------------------------------------------------------------------------------- ports, processes

@dataclass
class PortOwner:
    port: int
    pid: int | None
    name: str | None
    cmdline: str | None

    def describe(self) -> str:
        if self.pid is None:
            return f"port {self.port} is in use by a process we cannot see (another user's; run as root to name it)"
        return f"port {self.port} is in use by PID {self.pid} ({self.name}: {self.cmdline})"


def port_owner(port: int, host: str = "127.0.0.1") -> PortOwner | None:
    """Who listens on `port` (any address), or None when nobody does."""
    try:
        conns = psutil.net_connections(kind="inet")
    except (psutil.AccessDenied, PermissionError):
        conns = []
    for c in conns:
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port:
            if c.pid is None:
                return PortOwner(port, None, None, None)
            try:
                p = psutil.Process(c.pid)
                return PortOwner(port, c.pid, p.name(), " ".join(p.cmdline())[:200])
            except psutil.Error:
                return PortOwner(port, c.pid, None, None)
    # Listening sockets of other users are invisible without root: fall back to a connect test.
    import socket

    try:
        with socket.create_connection((host if host not in ("0.0.0.0", "::") else "127.0.0.1", port), timeout=0.5):
            return PortOwner(port, None, None, None)
    except OSError:
        return None


def _pid_tree(pid: int) -> set[int]:
    try:
        p = psutil.Process(pid)
        return {pid} | {c.pid for c in p.children(recursive=True)}
    except psutil.Error:
        return set()


# ----------------------------------------------------------------------------------------------- readiness

@dataclass
class Readiness:
    """One observation while following a start."""

    elapsed_s: float
    active_state: str
    sub_state: str
    status_text: str
    health_code: int | None
    health: dict
    percent: float | None  # loading progress when the server says so
    n_restarts: int = 0


def health(url: str, timeout: float = 2.0) -> tuple[int | None, dict]:
    """GET <url>/health -> (status code or None when nothing answers, JSON body or {})."""
    try:
        r = httpx.get(url.rstrip("/") + "/health", timeout=timeout, trust_env=False)  # loopback: no proxies
    except httpx.HTTPError:
        return None, {}
    try:
        body = r.json()
    except ValueError:
        body = {}
    return r.status_code, body if isinstance(body, dict) else {}


def _percent(status_text: str, body: dict) -> float | None:
    for key in ("progress", "percent", "loading_percent"):
        v = body.get(key)
        if isinstance(v, (int, float)):
            return float(v) * (100.0 if 0 <= v <= 1 and key == "progress" else 1.0)
    import re

    m = re.search(r"(\d+(?:\.\d+)?)\s*%", status_text or "")
    return float(m.group(1)) if m else None


_SYSTEMD_NOISE = ("Starting ", "Started ", "Stopped ", "Stopping ", "Failed to start ", "Scheduled restart job",
                  "Failed with result", "Control process exited", "Main process exited", "Consumed ",
                  "Deactivated successfully")


def last_journal_line(ctl: "Systemctl") -> str:
    """The unit's most telling recent journal line (the server's or systemd's reason, not its routine lines)."""
    argv = ctl.journal_cmd(lines=40)
    argv[argv.index("short-iso")] = "cat"
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=15).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
    lines = [l.strip() for l in out.splitlines() if l.strip()]
    useful = [l for l in lines if not any(n in l for n in _SYSTEMD_NOISE)]
    return (useful or lines or [""])[-1][:300]


def server_url(settings: Settings) -> str:
    host = settings.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{settings.port}"


def follow_readiness(ctl: Systemctl, url: str, timeout_s: float, progress: ProgressFn | None = None,
                     poll_s: float = 0.5, since_restarts: int | None = None) -> Readiness:
    """Poll the unit and /health until /health is 200 (-> returned) or the unit fails (-> UserError)."""
    t0 = time.monotonic()
    while True:
        props = ctl.show("ActiveState", "SubState", "StatusText", "NRestarts", "Result")
        code, body = health(url)
        obs = Readiness(elapsed_s=time.monotonic() - t0, active_state=props.get("ActiveState", ""),
                        sub_state=props.get("SubState", ""), status_text=props.get("StatusText", ""),
                        health_code=code, health=body, percent=_percent(props.get("StatusText", ""), body),
                        n_restarts=int(props.get("NRestarts") or 0))
        if progress is not None:
            progress(obs)
        if code == 200 and obs.active_state == "active":
            return obs
        if obs.active_state == "failed" or (since_restarts is not None and obs.n_restarts > since_restarts
                                            and obs.sub_state == "auto-restart"):
            journal = " ".join(ctl.journal_cmd(lines=30))
            why = obs.status_text or last_journal_line(ctl) or "no status"
            raise UserError(f"{UNIT_NAME} failed to start ({props.get('Result') or obs.sub_state}): {why}",
                            f"see the log: {journal}")
        if obs.elapsed_s > timeout_s:
            raise UserError(f"{UNIT_NAME} did not become ready in {timeout_s:.0f} s "
                            f"(state {obs.active_state}/{obs.sub_state}, health {code})",
                            f"see the log: {' '.join(ctl.journal_cmd(lines=50))}")
        time.sleep(poll_s)


# ----------------------------------------------------------------------------------------------- foreground pid file

def pid_file(settings: Settings) -> Path:
    return settings.state_dir / "server.pid"


def log_file(settings: Settings) -> Path:
    """The server's own log (it writes <state>/logs/server.log itself)."""
    return settings.log_dir / "server.log"


def out_file(settings: Settings) -> Path:
    """The detached server's stdout/stderr (what it printed before its logging started, e.g. a crash)."""
    return settings.log_dir / "server.out"


@dataclass
class ForegroundServer:
    pid: int
    port: int
    host: str
    started_at: float
    log: Path
    model: str

    def alive(self) -> bool:
        try:
            p = psutil.Process(self.pid)
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE and abs(p.create_time() - self.started_at) < 5
        except psutil.Error:
            return False


def read_foreground(settings: Settings) -> ForegroundServer | None:
    """The detached server this install started (pid file), if it is still running."""
    try:
        data = json.loads(pid_file(settings).read_text(encoding="utf-8"))
        srv = ForegroundServer(int(data["pid"]), int(data["port"]), str(data["host"]), float(data["started_at"]),
                               Path(data["log"]), str(data.get("model", "")))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return srv if srv.alive() else None


def start_foreground(settings: Settings, model: Path | None = None, demo: bool = False,
                     exec_path: Path | None = None, extra_args: Iterable[str] = (),
                     env: dict[str, str] | None = None) -> ForegroundServer:
    """Start `spark-setup serve --foreground` detached (own session), logging to <state>/logs/server.log, with
    a pid file at <state>/server.pid so status/logs/stop/uninstall find it. Returns once the process exists;
    readiness is followed with `wait_foreground`."""
    exe = Path(exec_path) if exec_path else current_exec_path()
    argv = [str(exe), "serve", "--foreground", "--host", settings.host, "--port", str(settings.port)]
    argv += ["--demo"] if demo else ["--model", str(model)]
    argv += list(extra_args)
    log = log_file(settings)
    log.parent.mkdir(parents=True, exist_ok=True)
    out_path = out_file(settings)
    penv = dict(os.environ if env is None else env)
    penv.update({"SPARK_SETUP_PREFIX": str(settings.prefix), "SPARK_SETUP_MODELS_DIR": str(settings.models_dir),
                 "SPARK_SETUP_STATE_DIR": str(settings.state_dir)})
    penv.pop("NOTIFY_SOCKET", None)
    with open(out_path, "wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, env=penv, close_fds=True)
    started = psutil.Process(proc.pid).create_time()
    srv = ForegroundServer(proc.pid, settings.port, settings.host, started, log,
                           "demo" if demo else str(model))
    pf = pid_file(settings)
    pf.parent.mkdir(parents=True, exist_ok=True)
    tmp = pf.with_suffix(".tmp")
    tmp.write_text(json.dumps({**asdict(srv), "log": str(log), "argv": argv}), encoding="utf-8")
    os.replace(tmp, pf)
    return srv


def wait_foreground(settings: Settings, srv: ForegroundServer, timeout_s: float = 600,
                    progress: ProgressFn | None = None, poll_s: float = 0.3) -> Readiness:
    url = server_url(settings)
    t0 = time.monotonic()
    while True:
        code, body = health(url)
        obs = Readiness(time.monotonic() - t0, "active" if code == 200 else "activating", "foreground",
                        str(body.get("status", "")), code, body, _percent("", body))
        if progress:
            progress(obs)
        if code == 200:
            return obs
        if not srv.alive():
            tail = _tail(srv.log.with_name("server.out"), 5) or _tail(srv.log, 5)
            raise UserError(f"the server exited while starting: {tail[-1] if tail else 'no output'}",
                            f"see {srv.log.with_name('server.out')} and {srv.log}")
        if obs.elapsed_s > timeout_s:
            raise UserError(f"the server did not become ready in {timeout_s:.0f} s", f"see {srv.log}")
        time.sleep(poll_s)


def _tail(path: Path, n: int) -> list[str]:
    try:
        return [l for l in path.read_text(encoding="utf-8", errors="replace").splitlines() if l.strip()][-n:]
    except OSError:
        return []


def stop_foreground(settings: Settings, timeout_s: float = 20) -> int | None:
    """Stop the detached server (SIGTERM, then SIGKILL after `timeout_s`); returns its PID or None."""
    srv = read_foreground(settings)
    pid = None
    if srv is not None:
        pid = srv.pid
        try:
            os.killpg(srv.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        except PermissionError:
            raise UserError(f"cannot stop the server PID {srv.pid}: permission denied", "run as its owner or root")
        try:
            psutil.Process(srv.pid).wait(timeout_s)
        except psutil.TimeoutExpired:
            os.killpg(srv.pid, signal.SIGKILL)
        except psutil.Error:
            pass
    pid_file(settings).unlink(missing_ok=True)
    return pid


# ----------------------------------------------------------------------------------------------- enable

@dataclass
class EnablePlan:
    scope: Scope
    spec: UnitSpec
    files: dict[Path, str]
    diffs: dict[Path, str]
    user_note: str = ""
    actions: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return any(self.diffs.values())


@dataclass
class EnableResult:
    plan: EnablePlan
    url: str
    ready: Readiness | None
    restarted: bool
    elapsed_s: float
    linger: bool | None = None
    notes: list[str] = field(default_factory=list)


def _path_readable_by(user: str, path: Path) -> bool:
    """Can `user` (a fresh system user: no groups but its own) read `path`? Checks real permissions by running
    `test -r` as that user when it exists, else by the 'other' permission bits along the path."""
    try:
        pwd.getpwnam(user)
        exists = True
    except KeyError:
        exists = False
    if exists and os.geteuid() == 0 and shutil.which("runuser"):
        return subprocess.run(["runuser", "-u", user, "--", "test", "-r", str(path)], capture_output=True).returncode == 0
    p = Path(os.path.abspath(path))
    for d in [*reversed(p.parents), p]:
        try:
            st = d.stat()
        except OSError:
            return False
        need = 0o001 if d != p else 0o004
        if not st.st_mode & need:
            return False
    return True


def choose_service_user(paths: Iterable[Path], prefix: Path) -> tuple[str, str]:
    """The dedicated `spark-setup` user when it can read everything the server needs; otherwise the owner of the
    install (typical: a venv and models under a private home), with the reason."""
    paths = [p for p in paths if p is not None]
    blocked = [p for p in paths if not _path_readable_by(SERVICE_USER, p)]
    if not blocked:
        return SERVICE_USER, f"runs as the dedicated system user {SERVICE_USER}"
    try:
        owner = pwd.getpwuid(Path(prefix).stat().st_uid).pw_name
    except (KeyError, OSError):
        owner = "root"
    if owner == "root":
        raise UserError(f"the service user {SERVICE_USER} cannot read {blocked[0]} (a directory above it is private)",
                        "install under a shared prefix (e.g. --prefix /opt/spark-setup), or use --user")
    return owner, (f"runs as {owner}: the dedicated user {SERVICE_USER} cannot read {blocked[0]} "
                   f"(a private home); use --prefix /opt/spark-setup for a dedicated user")


def plan_enable(settings: Settings, *, scope: Scope, model: Path, mtp: Path | None = None,
                engine_lib: Path | None = None, exec_path: Path | None = None, mtp_flag: str | None = None,
                check_user: bool = True) -> EnablePlan:
    """Render the units for this install and diff them against what is installed (no side effects)."""
    exe = Path(exec_path) if exec_path else current_exec_path()
    user, note = SERVICE_USER, ""
    if scope == "system" and check_user:
        user, note = choose_service_user([exe, _python_home() / "bin", model, mtp, engine_lib], settings.prefix)
    spec = unit_spec(settings, scope=scope, model=model, mtp=mtp, engine_lib=engine_lib, exec_path=exe,
                     user=user, mtp_flag=mtp_flag)
    files = render_units(spec)
    diffs = {p: diff_text(p, text) for p, text in files.items()}
    return EnablePlan(scope=scope, spec=spec, files=files, diffs=diffs, user_note=note)


def _our_unit_pids(ctl: Systemctl) -> set[int]:
    props = ctl.show("MainPID", "ControlPID")
    pids: set[int] = set()
    for key in ("MainPID", "ControlPID"):
        pid = int(props.get(key) or 0)
        if pid:
            pids |= _pid_tree(pid)
    return pids


def _ensure_user(ctl: Systemctl, user: str, home: Path) -> bool:
    """Create the dedicated system user if missing; True when created."""
    try:
        pwd.getpwnam(user)
        return False
    except KeyError:
        pass
    nologin = next((s for s in ("/usr/sbin/nologin", "/sbin/nologin") if Path(s).exists()), "/bin/false")
    ctl.privileged(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", str(home),
                    "--shell", nologin, "--comment", "spark-setup server", user], f"creating the user {user}")
    return True


def _write_root_file(ctl: Systemctl, path: Path, text: str, mode: int) -> None:
    if not ctl.sudo:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        return
    import tempfile

    with tempfile.NamedTemporaryFile("w", delete=False, encoding="utf-8") as f:
        f.write(text)
        src = f.name
    try:
        ctl.privileged(["install", "-D", "-m", f"{mode:o}", src, str(path)], f"writing {path}")
    finally:
        os.unlink(src)


def enable(settings: Settings, plan: EnablePlan, progress: ProgressFn | None = None,
           ready_timeout_s: float | None = None) -> EnableResult:
    """Write the planned units, reload, enable and (re)start, then follow readiness until /health is 200.

    Never a second server: our unit is restarted in place, our detached foreground server is stopped first, and a
    foreign process on the port is reported (with its PID) and left alone."""
    scope = plan.scope
    if not systemd_booted():
        raise UserError("systemd is not running as PID 1 on this machine, so there is no service to enable",
                        "run the server in the foreground instead: spark-setup serve --foreground")
    if scope == "user" and not user_manager_running():
        raise UserError("no systemd user manager is running for this user (no login session?)",
                        "log in normally (not su), or use the system scope: sudo spark-setup serve --enable --system")
    ctl = Systemctl(scope)
    t0 = time.monotonic()
    notes: list[str] = []
    if plan.user_note:
        notes.append(plan.user_note)

    # Who holds the port? Ours (unit or detached server) is fine; anyone else is reported, not killed.
    owner = port_owner(settings.port, settings.host)
    if owner is not None:
        ours = _our_unit_pids(ctl)
        fg = read_foreground(settings)
        if fg is not None and (owner.pid is None or owner.pid in _pid_tree(fg.pid)):
            stop_foreground(settings)
            notes.append(f"stopped the foreground server PID {fg.pid} so the service can take port {settings.port}")
        elif owner.pid is None or owner.pid not in ours:
            raise UserError(owner.describe(),
                            f"stop that process, or choose another port: spark-setup serve --enable --port N")

    spec = plan.spec
    if scope == "system":
        if spec.user == SERVICE_USER and _ensure_user(ctl, SERVICE_USER, spec.state_dir):
            notes.append(f"created the system user {SERVICE_USER}")
        ctl.privileged(["install", "-d", "-m", "750", "-o", str(spec.user), "-g", str(spec.group),
                        str(spec.state_dir)], f"creating {spec.state_dir}")
    else:
        spec.state_dir.mkdir(parents=True, exist_ok=True)

    for path, text in plan.files.items():
        if plan.diffs.get(path):
            _write_root_file(ctl, path, text, 0o644) if scope == "system" else _write_user_file(path, text)
    ctl.run("daemon-reload")
    ctl.run("enable", UNIT_NAME)
    ctl.run("reset-failed", UNIT_NAME, check=False)
    was_active = ctl.show("ActiveState").get("ActiveState") in ("active", "activating", "reloading")
    restarts_before = int(ctl.show("NRestarts").get("NRestarts") or 0)
    ctl.run("restart", "--no-block", UNIT_NAME)
    timeout, _ = start_timeout(spec.model_bytes)
    ready = follow_readiness(ctl, server_url(settings), ready_timeout_s or timeout + 30, progress,
                             since_restarts=restarts_before)
    linger = None
    if scope == "user":
        linger = linger_enabled()
        if linger is False:
            me = pwd.getpwuid(os.getuid()).pw_name
            notes.append(f"the user service stops when you log out: `sudo loginctl enable-linger {me}` keeps it "
                         "running and starts it at boot")
    return EnableResult(plan=plan, url=server_url(settings), ready=ready, restarted=was_active,
                        elapsed_s=time.monotonic() - t0, linger=linger, notes=notes)


def _write_user_file(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------- status / stop / remove

@dataclass
class ServiceState:
    mode: str  # "system", "user", "foreground" or "none"
    active_state: str = ""
    sub_state: str = ""
    status_text: str = ""
    main_pid: int | None = None
    n_restarts: int = 0
    unit_file_state: str = ""
    started_at: float | None = None  # epoch seconds
    unit_path: str | None = None
    log: str | None = None

    @property
    def uptime_s(self) -> float | None:
        return None if self.started_at is None else max(0.0, time.time() - self.started_at)


def _ts_from_monotonic_usec(v: str) -> float | None:
    try:
        usec = int(v)
    except (TypeError, ValueError):
        return None
    if usec <= 0:
        return None
    return time.time() - (time.clock_gettime(time.CLOCK_MONOTONIC) - usec / 1e6)


def service_state(settings: Settings) -> ServiceState:
    """What runs the server here: a unit (system or user scope), our detached foreground server, or nothing."""
    if systemd_booted():
        for scope in installed_scopes():
            if scope == "user" and not user_manager_running():
                continue
            ctl = Systemctl(scope, sudo=False)  # systemctl show needs no privileges
            p = ctl.show("ActiveState", "SubState", "StatusText", "MainPID", "NRestarts", "UnitFileState",
                         "ActiveEnterTimestampMonotonic")
            pid = int(p.get("MainPID") or 0) or None
            return ServiceState(mode=scope, active_state=p.get("ActiveState", ""), sub_state=p.get("SubState", ""),
                                status_text=p.get("StatusText", ""), main_pid=pid,
                                n_restarts=int(p.get("NRestarts") or 0), unit_file_state=p.get("UnitFileState", ""),
                                started_at=_ts_from_monotonic_usec(p.get("ActiveEnterTimestampMonotonic", ""))
                                if p.get("ActiveState") == "active" else None,
                                unit_path=str(unit_locations(scope)[0]))
    fg = read_foreground(settings)
    if fg is not None:
        return ServiceState(mode="foreground", active_state="active", sub_state="running", main_pid=fg.pid,
                            started_at=fg.started_at, log=str(fg.log))
    return ServiceState(mode="none", log=str(log_file(settings)) if log_file(settings).exists() else None)


def read_env_file(path: Path) -> dict[str, str]:
    out = {}
    try:
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                k, _, v = line.partition("=")
                out[k.strip()] = v.strip().strip('"')
    except OSError:
        pass
    return out


def running_url(settings: Settings, state: ServiceState | None = None) -> str:
    """The URL of the server that runs (the unit's env file, or the detached server's pid file), else settings'."""
    state = state or service_state(settings)
    host, port = settings.host, settings.port
    if state.mode in ("system", "user"):
        env = read_env_file(unit_locations(state.mode)[1])  # type: ignore[arg-type]
        host = env.get("SPARK_SETUP_HOST") or host
        try:
            port = int(env.get("SPARK_SETUP_PORT") or port)
        except ValueError:
            pass
    elif state.mode == "foreground":
        fg = read_foreground(settings)
        if fg is not None:
            host, port = fg.host, fg.port
    from dataclasses import replace

    return server_url(replace(settings, host=host, port=port))


def stop(settings: Settings) -> list[str]:
    """Stop whatever runs the server (unit(s) and/or the detached server); returns what was stopped."""
    done = []
    if systemd_booted():
        for scope in installed_scopes():
            ctl = Systemctl(scope)
            if ctl.show("ActiveState").get("ActiveState") in ("active", "activating", "reloading", "deactivating"):
                ctl.run("stop", UNIT_NAME, timeout=120)
                done.append(f"{scope} unit {UNIT_NAME}")
    pid = stop_foreground(settings)
    if pid is not None:
        done.append(f"foreground server PID {pid}")
    return done


def remove_units(settings: Settings) -> tuple[list[str], list[str]]:
    """Stop, disable and delete the units and env files; delete the dedicated user. Returns (removed, notes)."""
    removed: list[str] = []
    notes: list[str] = []
    for scope in ("system", "user"):
        unit, envf = unit_locations(scope)  # type: ignore[arg-type]
        if not unit.exists() and not envf.exists():
            continue
        ctl = Systemctl(scope)  # type: ignore[arg-type]
        live = systemd_booted() and (scope == "system" or user_manager_running())
        if live:
            ctl.run("disable", "--now", UNIT_NAME, check=False, timeout=120)
        # The service's own state dir belongs to the service user: remove it with the unit's privileges.
        svc_state = read_env_file(envf).get("SPARK_SETUP_STATE_DIR")
        if svc_state and Path(svc_state).name == "server" and Path(svc_state).exists():
            if scope == "system":
                ctl.privileged(["rm", "-rf", "--one-file-system", svc_state], f"removing {svc_state}")
            else:
                import shutil as _sh

                _sh.rmtree(svc_state, ignore_errors=True)
            removed.append(svc_state)
        for f in (unit, envf):
            if f.exists():
                if scope == "system" and ctl.sudo:
                    ctl.privileged(["rm", "-f", str(f)], f"removing {f}")
                else:
                    f.unlink()
                removed.append(str(f))
        try:
            envf.parent.rmdir()
        except OSError:
            pass
        if live:
            ctl.run("daemon-reload", check=False)
            ctl.run("reset-failed", UNIT_NAME, check=False)
    try:
        pwd.getpwnam(SERVICE_USER)
        has_user = True
    except KeyError:
        has_user = False
    if has_user:
        ctl = Systemctl("system")
        try:
            ctl.privileged(["userdel", SERVICE_USER], f"removing the user {SERVICE_USER}")
            removed.append(f"system user {SERVICE_USER}")
        except UserError as exc:
            notes.append(exc.message)
    return removed, notes
