"""Settings through the real CLI (subprocesses): precedence flags > env > file > default; bad input -> one line, exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spark_setup import __version__


def cli(args: list[str], tmp_path: Path, config: str | None = None, **env_over: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPARK_SETUP_")}
    cfg = tmp_path / "config.toml"
    if config is not None:
        cfg.write_text(config)
    env.update(HOME=str(tmp_path / "home"), SPARK_SETUP_CONFIG=str(cfg), COLUMNS="200", **env_over)
    return subprocess.run([sys.executable, "-m", "spark_setup", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def assert_one_line_usage_error(out: subprocess.CompletedProcess, *needles: str) -> None:
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert lines and lines[0].startswith("error: "), out.stderr
    assert len(lines) <= 2 and all(line.startswith(("error: ", "fix: ")) for line in lines), out.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_version_and_help(tmp_path):
    out = cli(["--version"], tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == f"spark-setup {__version__}"
    out = cli(["doctor", "--help"], tmp_path)
    assert out.returncode == 0 and "--target" in out.stdout and "--json" in out.stdout


@pytest.mark.parametrize("args,needles", [
    (["doctor", "--bogus"], ["--bogus"]),
    (["doctor", "--port", "eighty"], ["--port"]),
    (["doctor", "--port", "70000"], ["port", "70000"]),
    (["doctor", "--target", "tpu"], ["target", "tpu"]),
    (["doctor", "--host", ""], ["host"]),
    (["no-such-command"], ["no-such-command"]),
    (["config", "show", "--port", "0"], ["port"]),
    (["serve", "--foreground", "--enable"], ["--foreground", "--enable"]),
])
def test_bad_flags(tmp_path, args, needles):
    assert_one_line_usage_error(cli(args, tmp_path), *needles)


@pytest.mark.parametrize("config,needles", [
    ('port = "eighty"\n', ["port", "config.toml", "eighty"]),
    ("port = 0\n", ["port", "config.toml"]),
    ('target = "gpu"\n', ["target", "gpu"]),
    ("colour = 1\n", ["unknown setting", "colour"]),
    ("port = \n", ["not valid TOML"]),
    ("host = 12\n", ["host"]),
    ("prefix = 3\n", ["prefix"]),
])
def test_bad_config_file_values(tmp_path, config, needles):
    assert_one_line_usage_error(cli(["doctor"], tmp_path, config=config), *needles)
    assert_one_line_usage_error(cli(["config", "show"], tmp_path, config=config), *needles)


@pytest.mark.parametrize("env,needles", [
    ({"SPARK_SETUP_PORT": "http"}, ["SPARK_SETUP_PORT", "http"]),
    ({"SPARK_SETUP_PORT": "99999"}, ["SPARK_SETUP_PORT"]),
    ({"SPARK_SETUP_TARGET": "gpu"}, ["SPARK_SETUP_TARGET", "gpu"]),
])
def test_bad_env_values(tmp_path, env, needles):
    assert_one_line_usage_error(cli(["doctor"], tmp_path, **env), *needles)


def test_config_show_precedence_flag_env_file_default(tmp_path):
    config = 'port = 9001\nhost = "0.0.0.0"\ntarget = "generic"\nmodels_dir = "/srv/models"\n'
    out = cli(["config", "show", "--json", "--target", "spark"], tmp_path, config=config,
              SPARK_SETUP_PORT="9002", SPARK_SETUP_TARGET="cpu")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    s = data["settings"]
    assert data["config_file"] == str(tmp_path / "config.toml")
    assert s["target"] == {"value": "spark", "source": "flag"}  # flag beats env beats file
    assert s["port"] == {"value": 9002, "source": "env"}  # env beats file
    assert s["host"] == {"value": "0.0.0.0", "source": "config"}  # file beats default
    assert s["models_dir"] == {"value": "/srv/models", "source": "config"}
    home = tmp_path / "home"
    assert s["prefix"] == {"value": str(home / ".local/share/spark-setup"), "source": "default"}
    assert s["state_dir"]["value"] == str(home / ".local/share/spark-setup/state")
    assert s["state_dir"]["source"].startswith("derived from prefix")


def test_config_show_table_names_sources(tmp_path):
    out = cli(["config", "show", "--port", "8123"], tmp_path, config='host = "127.0.0.2"\n')
    assert out.returncode == 0, out.stderr
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:4]]
            for line in out.stdout.splitlines() if line.startswith("│")}
    assert rows["port"] == ["8123", "flag"]
    assert rows["host"] == ["127.0.0.2", "config"]
    assert rows["target"] == ["spark", "default"]


def test_settings_reach_doctor(tmp_path):
    # the port doctor probes comes from the env; the models dir from the config file
    out = cli(["doctor", "--target", "cpu", "--json"], tmp_path,
              config=f'models_dir = "{tmp_path / "m" / "x"}"\n', SPARK_SETUP_PORT="18765")
    data = json.loads(out.stdout)
    assert data["host"]["port"] == 18765
    assert data["host"]["models_dir"] == str(tmp_path / "m" / "x") and data["host"]["disk_path"] == str(tmp_path)
