"""The `spark-setup` command line: a thin skin over the modules. Parses flags, calls, renders.

Each capability lives in `spark_setup/commands/<name>.py` with a `register(app)` function; modules there are
discovered, so a command appears once its module exists (add a module only when its command works).
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from . import __version__
from .errors import UserError

# Help order for the product's commands; any other module under commands/ follows these.
ORDER = ["install", "doctor", "download", "models", "build", "smoke", "serve", "status", "logs", "stop",
         "bench", "roofline", "inspect", "uninstall", "config"]

app = typer.Typer(
    name="spark-setup",
    help="Run DeepSeek-V4-Flash on an NVIDIA DGX Spark, served by the bundled engine.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"spark-setup {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True,
                                           help="Print the version and exit."),
) -> None:
    """Run DeepSeek-V4-Flash on an NVIDIA DGX Spark, served by the bundled engine."""


def _command_modules() -> list[str]:
    from . import commands

    names = [m.name for m in pkgutil.iter_modules(commands.__path__) if m.name != "common" and not m.name.startswith("_")]
    return sorted(names, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))


for _name in _command_modules():
    _mod = importlib.import_module(f"spark_setup.commands.{_name}")
    if hasattr(_mod, "register"):
        _mod.register(app)


def report_error(exc: UserError) -> None:
    err_console.print(f"[bold red]error:[/] {escape(exc.message)}", markup=True)
    if exc.hint:
        err_console.print(f"[bold]fix:[/] {escape(exc.hint)}", markup=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point: never shows a traceback for expected failures; exit 0 ok, 1 failed, 2 usage."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    except Exception as exc:  # a bug: one line unless SPARK_SETUP_DEBUG asks for the traceback
        if os.environ.get("SPARK_SETUP_DEBUG"):
            raise
        err_console.print(f"[bold red]internal error:[/] {type(exc).__name__}: {escape(str(exc))}", markup=True)
        err_console.print("fix: re-run with SPARK_SETUP_DEBUG=1 for a traceback and report it", markup=False)
        return 1


def _main(argv: list[str] | None) -> int:
    command = typer.main.get_command(app)
    args = sys.argv[1:] if argv is None else argv
    try:
        rv = command.main(args=args, prog_name="spark-setup", standalone_mode=False)
        return int(rv) if isinstance(rv, int) else 0
    except UserError as exc:
        report_error(exc)
        return exc.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        err_console.print("aborted")
        return 130
    except Exception as exc:
        # Click's (typer-vendored) errors for bad flags/arguments/values carry format_message and exit_code.
        if not (hasattr(exc, "format_message") and hasattr(exc, "exit_code")):
            raise
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
            typer.echo(ctx.get_help())
            return 0
        where = ctx.command_path if ctx is not None else "spark-setup"
        err_console.print(f"[bold red]error:[/] {escape(exc.format_message())} (see '{where} --help')", markup=True)
        return int(exc.exit_code)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
