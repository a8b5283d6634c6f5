"""The bundled demo model: a tiny DS4-architecture GGUF trained to answer a few questions (tools/make_demo_model.py).

A pipeline fixture, not a language model: it lets `smoke`, `serve` and the whole engine run on any CPU.
"""

from __future__ import annotations

from pathlib import Path

from .errors import UserError

DEMO_FILE = "ds4-demo.gguf"
DEMO_MODEL_ID = "ds4-demo"


def demo_model_path() -> Path:
    """Path of the bundled demo GGUF (inside the installed package)."""
    return Path(__file__).resolve().parent / "data" / "demo" / DEMO_FILE


def require_demo_model() -> Path:
    path = demo_model_path()
    if not path.is_file():
        raise UserError(f"the bundled demo model is missing ({path})", "reinstall spark-setup")
    return path
