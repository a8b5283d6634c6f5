"""Shared fixtures. `engine_lib`: the CPU engine built once per test session (cached across runs by its key)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Reruns reuse the build when the engine sources did not change (the key covers sources + toolchain).
ENGINE_CACHE = Path(os.environ.get("SPARK_SETUP_TEST_ENGINE_PREFIX", str(REPO / ".cache" / "test-engine")))


def has_gpu() -> bool:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return False
    try:
        return subprocess.run([smi, "-L"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def pytest_collection_modifyitems(config, items):
    if has_gpu():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def engine_build():
    """BuildResult of the CPU engine (built into ENGINE_CACHE, reused while the sources are unchanged)."""
    from spark_setup.engine.build import build_engine
    from spark_setup.settings import load_settings

    settings = load_settings({"prefix": ENGINE_CACHE}, env={}, config_file=ENGINE_CACHE / "no-config.toml")
    return build_engine(settings, arch="cpu", jobs=2, progress=False)


@pytest.fixture(scope="session")
def engine_lib(engine_build) -> Path:
    """Path of the CPU libds4engine.so; also exported as DS4_ENGINE_LIB for subprocesses."""
    os.environ["DS4_ENGINE_LIB"] = str(engine_build.lib_path)
    return engine_build.lib_path
