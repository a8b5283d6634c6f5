"""`spark-setup serve`: the OpenAI-compatible server.

`serve --foreground` runs the server in this process (also what the systemd unit runs). Managing the systemd
service (`--enable`, `--user`, `--system`, `--dry-run`) belongs to spark_setup.service and plugs in at
`_manage_service` below.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import UsageError, UserError
from ..settings import Settings
from .common import HostOpt, ModelsDirOpt, PortOpt, PrefixOpt, StateDirOpt, settings_from

BACKENDS = ("auto", "cpu", "cuda")


def resolve_model(settings: Settings, model: Optional[Path], demo: bool) -> tuple[Path, str | None]:
    """(model path, model id override) from --model / --demo / the models directory."""
    if model is not None and demo:
        raise UsageError("--model and --demo are exclusive", "pass one of them")
    if demo:
        from ..demo import DEMO_MODEL_ID, require_demo_model

        return require_demo_model(), DEMO_MODEL_ID
    if model is not None:
        path = Path(model).expanduser()
        if not path.is_file():
            raise UserError(f"model file {path} does not exist", "run spark-setup download, or pass --model FILE")
        return path.absolute(), None
    found = sorted(p for p in Path(settings.models_dir).glob("**/*.gguf") if "mtp" not in p.name.lower()) \
        if Path(settings.models_dir).is_dir() else []
    if len(found) == 1:
        return found[0], None
    if not found:
        raise UserError(f"no model found in {settings.models_dir}",
                        "run spark-setup download, pass --model FILE, or try --demo")
    raise UserError(f"{len(found)} models in {settings.models_dir}; which one?", "pass --model FILE")


def resolve_backend(backend: str) -> str:
    """auto = cuda when the engine has the CUDA backend and a GPU is visible, else cpu."""
    if backend not in BACKENDS:
        raise UsageError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend != "auto":
        return backend
    try:
        from ..engine import _lib

        lib = _lib.load()
        if not lib.ds4_has_cuda():
            return "cpu"
    except Exception:
        return "cpu"
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return "cuda" if pynvml.nvmlDeviceGetCount() > 0 else "cpu"
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return "cpu"


def run_foreground(settings: Settings, model: Optional[Path], demo: bool, ctx: int, api_key: Optional[str],
                   backend: str, max_queue: int, sessions: int = 1) -> int:
    from ..engine import server

    if ctx < 64:
        raise UsageError(f"--ctx must be at least 64 tokens, got {ctx}")
    path, model_id = resolve_model(settings, model, demo)
    config = server.ServerConfig(model_path=path, ctx=ctx, backend=resolve_backend(backend), api_key=api_key or None,
                                 max_queue=max_queue, model_id=model_id, sessions=sessions)
    try:
        return server.serve(config, settings.host, settings.port, log_file=settings.log_dir / "server.log")
    except OSError as exc:
        raise UserError(str(exc.strerror or exc), "stop the other process, or choose another port: --port N")


def _manage_service(settings: Settings, **options) -> int:
    """`serve --enable [--user|--system] [--dry-run]`: the systemd unit (spark_setup.service; rendering and
    progress in commands/_service_ui.py, owned by the service helper)."""
    from . import _service_ui

    if not options.pop("enable", False):
        raise UsageError("serve needs --foreground (run here) or --enable (install the systemd service)",
                         "spark-setup serve --foreground, or spark-setup serve --enable")
    user, system = options.pop("user", False), options.pop("system", False)
    if user and system:
        raise UsageError("--user and --system are exclusive", "pass one of them")
    return _service_ui.serve_enable(settings, scope="user" if user else ("system" if system else None), **options)


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve_cmd(
        foreground: bool = typer.Option(False, "--foreground", help="Run the server in this process until "
                                        "Ctrl-C / SIGTERM (what the systemd unit runs)."),
        model: Optional[Path] = typer.Option(None, "--model", help="GGUF file to serve (default: the one model "
                                             "in the models directory)."),
        demo: bool = typer.Option(False, "--demo", help="Serve the bundled tiny demo model (CPU, any machine)."),
        ctx: int = typer.Option(32768, "--ctx", help="Context length in tokens (prompt + completion)."),
        api_key: Optional[str] = typer.Option(None, "--api-key", envvar="SPARK_SETUP_API_KEY",
                                              help="Require 'Authorization: Bearer KEY' on /v1/* "
                                                   "(env SPARK_SETUP_API_KEY)."),
        backend: str = typer.Option("auto", "--backend", help="Engine backend: auto, cpu or cuda."),
        max_queue: int = typer.Option(8, "--max-queue", help="Requests that may wait for the engine; more get 429."),
        sessions: int = typer.Option(1, "--sessions", envvar="SPARK_SETUP_SESSIONS",
                                     help="Conversations whose context state stays on the GPU (each its own --ctx "
                                          "of memory): an agent's side requests then stop evicting its main "
                                          "conversation (env SPARK_SETUP_SESSIONS)."),
        host: Optional[str] = HostOpt, port: Optional[int] = PortOpt, prefix: Optional[Path] = PrefixOpt,
        models_dir: Optional[Path] = ModelsDirOpt, state_dir: Optional[Path] = StateDirOpt,
        # -- the systemd service (spark_setup.service, service helper) --
        enable: bool = typer.Option(False, "--enable", help="Install, enable and (re)start the systemd unit, "
                                    "then wait until /health is 200."),
        user: bool = typer.Option(False, "--user", help="With --enable: a user unit (default without sudo)."),
        system: bool = typer.Option(False, "--system", help="With --enable: a system unit with a dedicated user "
                                    "(default as root or with sudo)."),
        dry_run: bool = typer.Option(False, "--dry-run", help="With --enable: show the units and the diff "
                                     "against what is installed; change nothing."),
    ) -> None:
        """Serve the model over an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models)."""
        settings = settings_from(prefix, models_dir, state_dir, port, host)
        if max_queue < 0:
            raise UsageError(f"--max-queue must be >= 0, got {max_queue}")
        if not 1 <= sessions <= 16:
            raise UsageError(f"--sessions must be between 1 and 16, got {sessions}")
        if foreground and (enable or user or system or dry_run):
            raise UsageError("--foreground runs the server here; --enable/--user/--system/--dry-run manage the "
                             "systemd service: pick one", "spark-setup serve --foreground, or spark-setup serve --enable")
        if not foreground:
            raise typer.Exit(_manage_service(settings, model=model, demo=demo, enable=enable, user=user,
                                             system=system, dry_run=dry_run))
        raise typer.Exit(run_foreground(settings, model, demo, ctx, api_key, backend, max_queue, sessions))
