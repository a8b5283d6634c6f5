"""`spark-setup install`: doctor -> download -> build -> smoke -> serve, each step done, skipped or failed.

A finished step is skipped from the receipt (and the step's own cheap check) in well under a second: no re-hash
of the model, no rebuild. A failure stops the chain with that step's fix hint; the receipt keeps what was done.

`--demo` swaps the model for the bundled demo model, the engine for the CPU build and the doctor target for
`cpu`, and always serves: as the systemd unit when systemd is PID 1, otherwise as a detached
`spark-setup serve --foreground` process (own session, pid file <state>/server.pid, log <state>/logs/server.log)
so it outlives the installer; `status`, `logs`, `stop` and `uninstall` know it.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from . import receipt as rc
from . import service
from .errors import UserError
from .settings import Settings

STEPS = ("doctor", "download", "build", "smoke", "serve")


@dataclass
class InstallOptions:
    variant: str | None = None  # None: the catalog default
    with_mtp: bool = False
    start: bool = False
    demo: bool = False
    yes: bool = False
    target: str | None = None  # doctor target (default: settings.target; cpu with --demo)
    arch: str = "auto"  # engine arch (cpu with --demo)
    revision: str | None = None
    token: str | None = None
    connections: int = 8
    offline: bool = False
    scope: str | None = None  # "system" | "user" | None (auto)
    jobs: int | None = None


@dataclass
class Step:
    name: str
    status: str  # "done" | "skipped" | "failed" | "not run"
    seconds: float = 0.0
    detail: str = ""
    hint: str | None = None


@dataclass
class Hooks:
    """How the chain talks to its caller (the command module renders; this module never prints)."""

    step_started: Callable[[str, str], None] = lambda name, what: None
    step_finished: Callable[[Step], None] = lambda step: None
    confirm: Callable[[str], bool] = lambda question: True
    progress: Any = True  # passed to download/build (True = their own rich progress)
    readiness: Optional[Callable[[service.Readiness], None]] = None


@dataclass
class InstallResult:
    steps: list[Step]
    receipt: Path
    url: str | None = None
    serving: str | None = None  # "system" | "user" | "foreground"
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(s.status in ("done", "skipped") for s in self.steps if s.status != "not run") and \
            not any(s.status == "failed" for s in self.steps)

    @property
    def failed(self) -> Step | None:
        return next((s for s in self.steps if s.status == "failed"), None)


class _Skip(Exception):
    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Installer:
    def __init__(self, settings: Settings, opts: InstallOptions, hooks: Hooks | None = None):
        from .catalog import DEFAULT_VARIANT

        self.s = settings
        self.o = opts
        self.h = hooks or Hooks()
        self.variant = "demo" if opts.demo else (opts.variant or DEFAULT_VARIANT)
        self.target = "cpu" if opts.demo else (opts.target or settings.target)
        self.arch = "cpu" if opts.demo else opts.arch
        self.r = rc.load(settings)
        self.model: Path | None = None
        self.mtp: Path | None = None
        self.engine_lib: Path | None = None
        self.engine_key: str | None = None
        self.notes: list[str] = []
        self.url: str | None = None
        self.serving: str | None = None

    # ------------------------------------------------------------------ the chain
    def run(self) -> InstallResult:
        steps: list[Step] = []
        wanted = list(STEPS) if (self.o.start or self.o.demo) else [s for s in STEPS if s != "serve"]
        descriptions = {
            "doctor": f"checking the host (target {self.target})",
            "download": "the bundled demo model" if self.o.demo else
            f"model {self.variant}" + (" + MTP draft" if self.o.with_mtp else ""),
            "build": f"engine ({self.arch})",
            "smoke": "asking the capital of France",
            "serve": "starting the server",
        }
        failed = False
        for name in STEPS:
            if name not in wanted or failed:
                step = Step(name, "not run", 0.0, "stopped after the failed step" if failed else "not asked for "
                            "(--start serves)")
                steps.append(step)
                self.h.step_finished(step)
                continue
            self.h.step_started(name, descriptions[name])
            t0 = time.monotonic()
            try:
                detail = getattr(self, f"_step_{name}")()
                step = Step(name, "done", time.monotonic() - t0, detail)
            except _Skip as sk:
                step = Step(name, "skipped", time.monotonic() - t0, sk.detail)
            except UserError as exc:
                step = Step(name, "failed", time.monotonic() - t0, exc.message, exc.hint)
                failed = True
            self.r.setdefault("steps", {})[name] = {"status": step.status, "seconds": round(step.seconds, 3),
                                                    "at": rc.now_iso(), "detail": step.detail}
            rc.save(self.s, self.r)
            steps.append(step)
            self.h.step_finished(step)
        return InstallResult(steps, rc.receipt_path(self.s), self.url, self.serving, self.notes)

    # ------------------------------------------------------------------ doctor
    def _model_bytes(self) -> tuple[int | None, int]:
        """(bytes the chosen files need, bytes of them already on disk): exact sizes from the pins when a
        download pinned them, the catalog's approximations otherwise."""
        if self.o.demo:
            return None, 0
        from .catalog import PinStore, files_for
        from .download import dest_for

        store = PinStore(self.s.state_dir)
        need = have = 0
        for v in files_for(self.variant, self.o.with_mtp):
            pin = store.get(v.repo, v.file)
            size = pin.size if pin is not None else v.approx_bytes
            need += size
            dest = dest_for(self.s.models_dir, v.repo, v.file)
            if dest.is_file() and dest.stat().st_size == size:
                have += size
        return need, have

    def _step_doctor(self) -> str:
        key = f"{rc.host_key()}|{self.target}|{self.variant}|{self.o.with_mtp}|{self.s.port}"
        prev = self.r.get("doctor") or {}
        if prev.get("ok") and prev.get("key") == key:
            raise _Skip(f"passed on {prev.get('at')} on this host (`spark-setup doctor` re-checks)")
        from .doctor import run_checks
        from .host import probe

        need, have = self._model_bytes()
        report = run_checks(probe(self.s), target=self.target, model_bytes=need, already_downloaded=have)
        self.r["doctor"] = {"ok": report.ok, "key": key, "at": rc.now_iso(), "target": self.target,
                            "summary": {s: sum(c.status == s for c in report.checks) for s in ("pass", "warn", "fail")}}
        if not report.ok:
            bad = report.failed
            first = bad[0]
            more = f" (and {len(bad) - 1} more: {', '.join(c.id for c in bad[1:])})" if len(bad) > 1 else ""
            raise UserError(f"{first.title or first.id}: {first.measured}, needs {first.required}{more}",
                            first.fix or f"run `spark-setup doctor --target {self.target}` for details")
        warn = report.warnings
        return f"{sum(c.status == 'pass' for c in report.checks)} checks passed" + (
            f", {len(warn)} warning(s): {', '.join(c.id for c in warn)}" if warn else "")

    # ------------------------------------------------------------------ download
    def _step_download(self) -> str:
        if self.o.demo:
            return self._demo_model()
        from .catalog import files_for
        from .download import download_variant

        entries = files_for(self.variant, self.o.with_mtp)
        total = sum(v.approx_bytes for v in entries)
        if not self._files_look_complete() and not self.o.yes:
            if not self.h.confirm(f"download {total / 2**30:.1f} GiB ({', '.join(v.name for v in entries)}) "
                                  f"into {self.s.models_dir}?"):
                raise UserError("download declined", "re-run with --yes to download without asking")
        res = download_variant(self.s, variant=self.variant, with_mtp=self.o.with_mtp,
                               connections=self.o.connections, offline=self.o.offline, revision=self.o.revision,
                               token=self.o.token, progress=self.h.progress)
        files = [{k: f.get(k) for k in ("path", "sha256", "size", "repo", "revision", "commit", "file", "label")}
                 for f in res.files]
        for f in files:
            f["stat"] = rc.file_stat_key(Path(f["path"]))
        self.r["files"] = files
        self.r["variant"], self.r["with_mtp"] = self.variant, self.o.with_mtp
        self.r["revision"] = files[0].get("revision") if files else None
        self.r["commit"] = files[0].get("commit") if files else None
        self.model = Path(files[0]["path"])
        self.mtp = Path(files[1]["path"]) if self.o.with_mtp and len(files) > 1 else None
        size = sum(int(f.get("size") or 0) for f in files)
        if res.skipped:
            raise _Skip(f"{len(files)} file(s), {size / 2**30:.1f} GiB, already verified")
        return f"{len(files)} file(s), {size / 2**30:.1f} GiB verified" + (f"; {'; '.join(res.notes)}" if res.notes else "")

    def _files_look_complete(self) -> bool:
        files = self.r.get("files") or []
        return bool(files) and self.r.get("variant") == self.variant and all(
            f.get("stat") and rc.file_stat_key(Path(f["path"])) == f["stat"] for f in files)

    def _demo_model(self) -> str:
        from .demo import demo_model_path

        path = Path(demo_model_path())
        if not path.is_file():
            raise UserError(f"the bundled demo model is missing ({path})", "reinstall spark-setup")
        self.model, self.mtp = path, None
        prev = [f for f in (self.r.get("files") or []) if f.get("path") == str(path)]
        stat = rc.file_stat_key(path)
        if self.r.get("variant") == "demo" and prev and prev[0].get("stat") == stat:
            raise _Skip(f"bundled demo model {path.name} ({stat['size'] / 2**20:.1f} MiB), unchanged")
        self.r["files"] = [{"path": str(path), "sha256": _sha256(path), "size": stat["size"], "repo": None,
                            "revision": None, "commit": None, "file": path.name, "label": "demo", "stat": stat}]
        self.r["variant"], self.r["with_mtp"], self.r["revision"], self.r["commit"] = "demo", False, None, None
        return f"bundled demo model {path} ({stat['size'] / 2**20:.1f} MiB)"

    # ------------------------------------------------------------------ build
    def _step_build(self) -> str:
        from .engine.build import build_engine

        res = build_engine(self.s, arch=self.arch, jobs=self.o.jobs, progress=self.h.progress)
        self.engine_lib, self.engine_key = Path(res.lib_path), res.key
        os.environ["DS4_ENGINE_LIB"] = str(self.engine_lib)  # the smoke and the server use exactly this build
        self.r["engine"] = {"key": res.key, "arch": res.arch, "lib_path": str(res.lib_path),
                            "build_dir": str(res.build_dir), "cuda": bool(res.manifest.get("cuda"))}
        note = f" ({res.note})" if res.note else ""
        if res.up_to_date:
            raise _Skip(f"engine {res.key} ({res.arch}) already built{note}")
        secs = res.manifest.get("build_seconds")
        return f"engine {res.key} ({res.arch}) built" + (f" in {secs:.0f} s" if secs else "") + note

    # ------------------------------------------------------------------ smoke
    def _smoke_key(self) -> str:
        files = ",".join(f"{f.get('path')}:{f.get('sha256')}" for f in (self.r.get("files") or []))
        return f"{files}|{self.engine_key}"

    def _step_smoke(self) -> str:
        prev = self.r.get("smoke") or {}
        if prev.get("passed") and prev.get("key") == self._smoke_key():
            raise _Skip(f"passed on {prev.get('at')} with this model and engine ({prev.get('answer', '')[:40]!r})")
        from .smoke import run_smoke

        # One model in memory at a time (an 81 GiB model twice does not fit a Spark): a running server of this
        # install is stopped for the smoke test and started again afterwards (by the serve step when it runs).
        running = service.service_state(self.s)
        stopped = running.mode if running.mode != "none" and running.active_state in ("active", "activating") else None
        if stopped:
            service.stop(self.s)
            self.notes.append(f"stopped the running server ({stopped}) for the smoke test: one model in memory "
                              "at a time")
        try:
            res = run_smoke(url=None, model=None if self.o.demo else self.model, demo=self.o.demo, settings=self.s)
        finally:
            if stopped and not (self.o.start or self.o.demo):
                self._restart(stopped)
        self.r["smoke"] = {"passed": bool(res.passed), "answer": res.answer, "ttft_s": res.ttft_s,
                           "tokens_per_s": res.tokens_per_s, "key": self._smoke_key(), "at": rc.now_iso()}
        if not res.passed:
            answer = " ".join(str(res.answer).split())[:80]
            raise UserError(f"smoke test failed: asked the capital of France, got {answer!r} (no 'Paris')",
                            "the model or engine is broken: re-run `spark-setup download --verify` and "
                            "`spark-setup build --force`, then `spark-setup smoke`")
        tps = f", {res.tokens_per_s:.1f} tokens/s" if res.tokens_per_s else ""
        return f"answered {' '.join(str(res.answer).split())[:40]!r}{tps}"

    def _restart(self, mode: str) -> None:
        if mode in ("system", "user"):
            service.Systemctl(mode).run("start", "--no-block", service.UNIT_NAME, check=False)  # type: ignore[arg-type]
            self.notes.append(f"started the {mode} unit again")

    # ------------------------------------------------------------------ serve
    def _step_serve(self) -> str:
        if service.systemd_booted():
            return self._serve_unit()
        if not self.o.demo:
            raise UserError("systemd is not running as PID 1 here, so the server cannot be installed as a service",
                            "run it in the foreground: spark-setup serve --foreground")
        return self._serve_detached()

    def _serve_unit(self) -> str:
        scope = self.o.scope or service.default_scope()
        plan = service.plan_enable(self.s, scope=scope, model=self.model, mtp=self.mtp,
                                   engine_lib=self.engine_lib)
        url = service.server_url(self.s)
        self.url, self.serving = url, scope
        st = service.service_state(self.s)
        code, _ = service.health(url)
        units = [str(p) for p in plan.files]
        if not plan.changed and st.mode == scope and st.active_state == "active" and code == 200:
            self.r["service"] = {"mode": scope, "units": units, "user": plan.spec.user, "url": url}
            raise _Skip(f"{scope} unit {service.UNIT_NAME} already running at {url}")
        res = service.enable(self.s, plan, progress=self.h.readiness)
        self.notes += res.notes
        self.r["service"] = {"mode": scope, "units": units, "user": plan.spec.user, "url": url,
                             "created_user": any("created the system user" in n for n in res.notes)
                             or (self.r.get("service") or {}).get("created_user", False)}
        return (f"{'restarted' if res.restarted else 'started'} the {scope} unit {service.UNIT_NAME}; "
                f"ready at {url} in {res.elapsed_s:.1f} s")

    def _serve_detached(self) -> str:
        url = service.server_url(self.s)
        self.url, self.serving = url, "foreground"
        running = service.read_foreground(self.s)
        code, _ = service.health(url)
        if running is not None and running.port == self.s.port and running.model == "demo" and code == 200:
            self.r["service"] = {"mode": "foreground", "pid": running.pid, "log": str(running.log), "url": url}
            raise _Skip(f"demo server already running (PID {running.pid}) at {url}")
        restarted = ""
        if running is not None:
            service.stop_foreground(self.s)
            restarted = f"restarted (was PID {running.pid}); "
        owner = service.port_owner(self.s.port, self.s.host)
        if owner is not None:
            raise UserError(owner.describe(), "stop that process, or choose another port: --port N")
        env = dict(os.environ)
        if self.engine_lib:
            env["DS4_ENGINE_LIB"] = str(self.engine_lib)
        srv = service.start_foreground(self.s, demo=True, env=env)
        try:
            service.wait_foreground(self.s, srv, timeout_s=300, progress=self.h.readiness)
        except UserError:
            service.stop_foreground(self.s)
            raise
        self.r["service"] = {"mode": "foreground", "pid": srv.pid, "log": str(srv.log), "url": url}
        return f"{restarted}demo server PID {srv.pid} (detached, log {srv.log}) ready at {url}"


def run_install(settings: Settings, opts: InstallOptions, hooks: Hooks | None = None) -> InstallResult:
    return Installer(settings, opts, hooks).run()


# ---------------------------------------------------------------------------------------------------- uninstall

@dataclass
class UninstallPlan:
    remove: list[Path]  # files and directories to delete
    keep: list[tuple[Path, str]]  # what stays, and why
    links: list[Path]  # CLI links that point into this install
    purge: bool


def _points_into(link: Path, root: Path) -> bool:
    try:
        return link.is_symlink() and Path(os.path.realpath(link)).is_relative_to(os.path.realpath(root))
    except OSError:
        return False


def _model_files(settings: Settings) -> list[Path]:
    """Files in the models dir that spark-setup put there (catalog files, partials, sidecars, current.gguf)."""
    from .catalog import VARIANTS

    d = settings.models_dir
    if not d.is_dir():
        return []
    ours = {v.file for v in VARIANTS.values()}
    out = []
    for p in d.iterdir():
        base = p.name.lstrip(".")
        for suffix in (".part.json", ".part", ".corrupt", ".lock"):
            if base.endswith(suffix):
                base = base[: -len(suffix)]
        if base in ours or p.name == "current.gguf" or p.name.endswith(".tmp"):
            out.append(p)
    return sorted(out)


def plan_uninstall(settings: Settings, purge: bool) -> UninstallPlan:
    s = settings
    remove: list[Path] = []
    keep: list[tuple[Path, str]] = []
    for p in (s.venv_dir, s.engine_dir, s.prefix / "bin"):
        if p.exists() or p.is_symlink():
            remove.append(p)
    if s.state_dir.exists():
        if purge:
            remove.append(s.state_dir)
        else:
            for p in sorted(s.state_dir.iterdir()):
                if p.name in ("pins.json", "verified.json"):
                    keep.append((p, "the model pins (kept with the models; --purge removes them)"))
                else:
                    remove.append(p)
    models = _model_files(s)
    if purge:
        remove += models
    elif models:
        size = sum(p.stat().st_size for p in models if p.is_file() and not p.is_symlink())
        keep.append((s.models_dir, f"{len(models)} model file(s), {size / 2**30:.1f} GiB (--purge removes them)"))
    links = [p for p in (Path.home() / ".local" / "bin" / "spark-setup", Path("/usr/local/bin/spark-setup"))
             if _points_into(p, s.prefix)]
    return UninstallPlan(remove=remove, keep=keep, links=links, purge=purge)


def _rm(p: Path) -> None:
    import shutil

    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink(missing_ok=True)


def uninstall(settings: Settings, plan: UninstallPlan) -> tuple[list[str], list[str], list[str]]:
    """Stop and remove the server (units, user, detached process), then the planned paths; the venv that runs
    this goes last. Returns (removed, kept, notes)."""
    removed: list[str] = []
    notes: list[str] = []
    stopped = service.stop(settings)
    removed += [f"stopped {x}" for x in stopped]
    units, unit_notes = service.remove_units(settings)
    removed += units
    notes += unit_notes
    venv = settings.venv_dir
    for p in plan.links:
        p.unlink(missing_ok=True)
        removed.append(str(p))
    for p in sorted(plan.remove, key=lambda x: x == venv):
        if p.exists() or p.is_symlink():  # the service's state dir may already be gone with the units
            _rm(p)
            removed.append(str(p))
    for d in (settings.models_dir, settings.state_dir, settings.prefix):
        try:
            d.rmdir()  # only when empty
            removed.append(f"{d} (empty)")
        except OSError:
            pass
    kept = [f"{p}: {why}" for p, why in plan.keep]
    return removed, kept, notes
