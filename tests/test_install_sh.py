"""install.sh as users run it: real bash, real venvs, real pip; truncated copies execute nothing."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from support import clean_copy

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "install.sh"
BASH = shutil.which("bash") or "/bin/bash"
# a real interpreter (not a pyenv shim, not this venv): what a user's python3 would be
REAL_PYTHON = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def _exe(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def _env(home: Path, **over: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPARK_SETUP_", "VIRTUAL_ENV", "PYTHON"))}
    env["HOME"] = str(home)
    env.update(over)
    return env


def _bash(args: list[str], env: dict[str, str], script: Path = SCRIPT, timeout: int = 60,
          cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([BASH, str(script), *args], capture_output=True, text=True, env=env, timeout=timeout,
                          stdin=subprocess.DEVNULL, cwd=cwd)


# --- truncation ---------------------------------------------------------------------------------------------


def _spy_path(tmp_path: Path) -> tuple[Path, Path]:
    """A PATH whose first entries log every call of the commands install.sh would run first."""
    spy = tmp_path / "spy"
    spy.mkdir()
    log = tmp_path / "calls.log"
    for name in ("python3", "uname", "mkdir", "ln", "rm", "git", "pip", "curl", "cat", "readlink"):
        _exe(spy / name, f'echo "{name} $*" >> "{log}"')
    return spy, log


def test_truncated_copies_execute_nothing(tmp_path):
    data = SCRIPT.read_bytes()
    spy, log = _spy_path(tmp_path)
    home = tmp_path / "home"
    home.mkdir()
    env = _env(home, PATH=f"{spy}:/usr/bin:/bin")
    last_line_start = data.rstrip(b"\n").rfind(b"\n") + 1
    cuts = sorted({len(data) // 2, *(len(data) * k // 20 for k in range(1, 20)),
                   *range(last_line_start, len(data.rstrip(b"\n")))})
    for cut in cuts:
        part = tmp_path / "part.sh"
        part.write_bytes(data[:cut])
        out = _bash(["--prefix", str(tmp_path / "prefix"), "--yes"], env, script=part)
        assert out.stdout == "", (cut, out.stdout)
        assert not log.exists(), (cut, log.read_text())
        assert list(home.iterdir()) == [] and not (tmp_path / "prefix").exists(), cut
        if cut == len(data) // 2:
            assert out.returncode == 2 and re.search(r"unexpected (end of file|EOF)", out.stderr), out.stderr
            # the same through a pipe, as `curl ... | bash -s -- --flags` runs it
            piped = subprocess.run(["bash", "-s", "--", "--yes"], input=data[:cut], capture_output=True, env=env,
                                   timeout=60)
            assert piped.returncode == 2 and piped.stdout == b"" and not log.exists()
    # the spies do see a complete script run (so the silence above means something)
    out = _bash(["--prefix", str(tmp_path / "prefix"), "--yes"], env)
    assert log.exists() and "uname" in log.read_text()


def test_script_shape():
    text = SCRIPT.read_text()
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines[-1] == '{ spark_setup_install "$@"; exit; }'
    assert lines[0] == "#!/usr/bin/env bash" and "\nspark_setup_install() {\n" in text
    assert "    set -eu" in text.splitlines()


def test_a_script_rewritten_while_running_injects_nothing(tmp_path):
    # bash reads a script as it goes: an upgrade that rewrites install.sh under a running copy must not make bash
    # execute what now follows the call. `cat` (used by --help) appends a line to the running script.
    spy = tmp_path / "spy"
    spy.mkdir()
    copy = tmp_path / "install.sh"
    _exe(spy / "cat", f'printf "echo INJECTED\\n" >> "{copy}"\nexec /bin/cat "$@"')
    env = _env(tmp_path, PATH=f"{spy}:/usr/bin:/bin")
    copy.write_bytes(SCRIPT.read_bytes())
    out = _bash(["--help"], env, script=copy)
    assert out.returncode == 0 and "Usage:" in out.stdout and "INJECTED" not in out.stdout
    assert copy.read_text().endswith("echo INJECTED\n")  # the spy did append
    # without the `exit` in the last line's group, the appended line would run: the guard is what passes above
    copy.write_text(SCRIPT.read_text().replace('{ spark_setup_install "$@"; exit; }', 'spark_setup_install "$@"'))
    out = _bash(["--help"], env, script=copy)
    assert "INJECTED" in out.stdout


# --- flags and host checks (fast: they stop before pip) -------------------------------------------------------


def test_help_creates_nothing(tmp_path):
    out = _bash(["--help"], _env(tmp_path))
    assert out.returncode == 0 and out.stdout.startswith("Usage: install.sh")
    for flag in ("--with-mtp", "--start", "--prefix", "--models-dir", "--yes", "--demo", "--from-source"):
        assert flag in out.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args", [["--prefix"], ["--from-source"], ["--prefix", "--yes"]])
def test_flag_without_value_is_a_usage_error(tmp_path, args):
    out = _bash(args, _env(tmp_path))
    assert out.returncode == 2 and out.stderr.startswith(f"install.sh: error: {args[0]} needs a value")
    assert list(tmp_path.iterdir()) == []


def test_unsupported_arch_refused_unless_forced(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    _exe(fake / "uname", 'case "$1" in -m) echo ppc64le;; *) echo Linux;; esac')
    env = _env(tmp_path / "home", PATH=f"{fake}:{os.environ['PATH']}", SPARK_SETUP_PYTHON="no-such-python3")
    out = _bash(["--prefix", str(tmp_path / "p")], env)
    assert out.returncode == 1 and "unsupported CPU architecture: ppc64le" in out.stderr and "--force" in out.stderr
    out = _bash(["--prefix", str(tmp_path / "p"), "--force"], env)  # past the gate: stops at the next check
    assert out.returncode == 1 and "no-such-python3 not found" in out.stderr
    assert not (tmp_path / "p").exists()


def test_old_python_refused(tmp_path):
    py = _exe(tmp_path / "python3.8", 'case "$2" in *version_info*">="*) exit 1;; *) echo 3.8.10;; esac')
    out = _bash(["--prefix", str(tmp_path / "p")], _env(tmp_path, SPARK_SETUP_PYTHON=str(py)))
    assert out.returncode == 1 and "needs Python >= 3.10" in out.stderr and "3.8.10" in out.stderr


def test_not_a_checkout_refused_before_anything_is_created(tmp_path):
    (tmp_path / "empty").mkdir()
    out = _bash(["--from-source", str(tmp_path / "empty"), "--prefix", str(tmp_path / "p")], _env(tmp_path / "h"))
    assert out.returncode == 1 and "is not a spark-setup checkout" in out.stderr
    assert not (tmp_path / "p").exists()


def test_vcs_install_needs_git(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("uname", "mkdir", "dirname", "cat"):
        if shutil.which(tool):
            os.symlink(shutil.which(tool), bindir / tool)
    env = _env(tmp_path / "h", PATH=str(bindir), SPARK_SETUP_PYTHON=REAL_PYTHON)
    out = _bash(["--prefix", str(tmp_path / "p")], env)
    assert out.returncode == 1 and "git is needed to install from https://" in out.stderr
    assert "--from-source" in out.stderr


def test_missing_ensurepip_prints_the_apt_command(tmp_path):
    # Python without the venv/ensurepip modules (Debian without python3-venv)
    py = _exe(tmp_path / "python3", f'case "$*" in *ensurepip*) echo "No module named ensurepip" >&2; exit 1;; esac\n'
              f'exec "{REAL_PYTHON}" "$@"')
    out = _bash(["--from-source", str(ROOT), "--prefix", str(tmp_path / "p")], _env(tmp_path, SPARK_SETUP_PYTHON=str(py)))
    ver = "%d.%d" % sys.version_info[:2]
    assert out.returncode == 1 and "ensurepip is missing" in out.stderr
    assert f"sudo apt install python{ver}" in out.stderr and "-venv" in out.stderr
    assert not (tmp_path / "p" / "venv").exists()


def test_failed_venv_is_cleaned_up_and_explained(tmp_path):
    # Debian's python3 without python3-venv: `import ensurepip` works, `python3 -m venv` half-creates and fails
    py = _exe(tmp_path / "python3",
              'if [ "$1" = -m ] && [ "$2" = venv ]; then mkdir -p "$3/bin"; touch "$3/pyvenv.cfg"; '
              'echo "The virtual environment was not created successfully because ensurepip is not available." ; '
              f'exit 1; fi\nexec "{REAL_PYTHON}" "$@"')
    out = _bash(["--from-source", str(ROOT), "--prefix", str(tmp_path / "p")], _env(tmp_path, SPARK_SETUP_PYTHON=str(py)))
    assert out.returncode == 1 and "ensurepip is not available" in out.stderr and "-venv" in out.stderr
    assert not (tmp_path / "p" / "venv").exists()
    assert "fix: sudo apt install python" in out.stderr


# --- the real thing (slow: a fresh venv and real pip) -------------------------------------------------------




def _snapshot(prefix: Path) -> dict[str, tuple]:
    """Every path under prefix with what would show a change, except the spark_setup package itself."""
    snap = {}
    for p in sorted(prefix.rglob("*")):
        rel = p.relative_to(prefix).as_posix()
        if "__pycache__" in rel or "/site-packages/spark_setup" in rel or rel.endswith("/bin/spark-setup") \
                and rel.startswith("venv/"):
            continue
        if rel.endswith("site-packages") or rel.endswith("venv/bin"):
            continue  # directories whose mtime moves when the package is reinstalled
        st = p.lstat()
        snap[rel] = (stat.S_IFMT(st.st_mode), st.st_size if not p.is_dir() else 0, st.st_mtime_ns,
                     os.readlink(p) if p.is_symlink() else None)
    return snap


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The acceptance run: `bash install.sh --from-source . --prefix $(mktemp -d) --yes` from a clean copy."""
    tmp = tmp_path_factory.mktemp("install-sh")
    src = clean_copy(tmp / "clone")
    prefix = tmp / "prefix"
    (tmp / "home").mkdir()
    env = _env(tmp / "home", PIP_CACHE_DIR=str(tmp / "pip-cache"), SPARK_SETUP_PYTHON=REAL_PYTHON)
    out = _bash(["--from-source", ".", "--prefix", str(prefix), "--yes"], env, script=Path("install.sh"),
                timeout=900, cwd=src)
    return tmp, src, prefix, env, out


@pytest.mark.slow
def test_install_from_clean_checkout_then_rerun(installed):
    tmp, src, prefix, env, out = installed
    cli = prefix / "venv" / "bin" / "spark-setup"
    assert cli.is_file(), out.stdout + out.stderr
    assert os.readlink(prefix / "bin" / "spark-setup") == str(cli)
    assert "==> spark-setup install --prefix" in out.stdout
    if out.returncode != 0:  # `spark-setup install` ran and said why it stopped (e.g. not a Spark here)
        assert f"`spark-setup install` stopped (exit {out.returncode})" in out.stderr, out.stderr
    version = subprocess.run([str(prefix / "bin" / "spark-setup"), "--version"], capture_output=True, text=True,
                             env=env, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("spark-setup ")
    doctor = subprocess.run([str(cli), "doctor", "--target", "cpu", "--json", "--prefix", str(prefix)],
                            capture_output=True, text=True, env=env, timeout=120)
    assert '"schema_version": 1' in doctor.stdout, doctor.stderr
    # a custom prefix leaves ~/.local/bin alone
    assert not (tmp / "home" / ".local").exists()

    before = _snapshot(prefix)
    pkg = next((prefix / "venv" / "lib").glob("python3*/site-packages/spark_setup/__init__.py"))
    pkg_mtime = pkg.stat().st_mtime_ns
    out2 = _bash(["--from-source", str(src), "--prefix", str(prefix), "--yes", "--cli-only"], env,
                 script=src / "install.sh", timeout=900)
    assert out2.returncode == 0, out2.stderr
    assert "upgrading spark-setup in place" in out2.stdout
    after = _snapshot(prefix)
    assert before == after  # venv, links, dependencies, receipt: untouched
    assert pkg.stat().st_mtime_ns != pkg_mtime  # ...but the package was reinstalled


@pytest.mark.slow
def test_default_prefix_links_user_bin_with_path_hint(installed):
    tmp, src, prefix, env, _ = installed
    # A HOME whose default prefix is the installed one (a link, to reuse its venv: this run upgrades in place).
    home = tmp / "home2"
    (home / ".local" / "share").mkdir(parents=True)
    os.symlink(prefix, home / ".local" / "share" / "spark-setup")
    env = dict(env, HOME=str(home), PATH="/usr/local/bin:/usr/bin:/bin")
    out = _bash(["--from-source", str(src), "--cli-only"], env, timeout=900)
    assert out.returncode == 0, out.stderr
    assert "upgrading spark-setup in place" in out.stdout
    link = home / ".local" / "bin" / "spark-setup"
    assert os.readlink(link) == str(home / ".local/share/spark-setup/venv/bin/spark-setup")
    assert ".local/bin is not on your PATH" in out.stdout
    ok = subprocess.run([str(link), "--version"], capture_output=True, text=True, env=env, timeout=60)
    assert ok.returncode == 0
    # a file the user put there is never replaced; with ~/.local/bin on PATH there is no hint
    link.unlink()
    link.write_text("#!/bin/sh\necho mine\n")
    env["PATH"] = f"{home / '.local' / 'bin'}:{env['PATH']}"
    out = _bash(["--from-source", str(src), "--cli-only"], env, timeout=900)
    assert out.returncode == 0 and "left " in out.stdout and link.read_text() == "#!/bin/sh\necho mine\n"
    assert "not on your PATH" not in out.stdout
