"""Model and session objects over the engine's C ABI (ds4.h), returning numpy arrays.

    with Model("model.gguf") as m, m.new_session(max_ctx=4096) as s:
        logits = s.eval(prompt_ids)            # [n_vocab] float32, logits of the last position
        s.eval([next_id])                      # decode
        s.truncate(len(prefix))                # keep a prefix, continue from there

Every engine failure raises `EngineError` (spark_setup.engine._lib) carrying the engine's one-line message.
"""

from __future__ import annotations

import ctypes
import os
from typing import Optional, Sequence

import numpy as np

from . import _lib
from ._lib import BACKEND_CPU, BACKEND_CUDA, DS4_E_ARG, DS4_E_STATE, EngineError

__all__ = ["Model", "Session", "EngineError", "SESSION_NO_ROUNDTRIP"]

SESSION_NO_ROUNDTRIP = 1
_BACKENDS = {"cpu": BACKEND_CPU, "cuda": BACKEND_CUDA}
_MODEL_FUNCS = ("ds4_model_open", "ds4_model_describe", "ds4_session_new", "ds4_session_eval")


def _need(lib: ctypes.CDLL) -> None:
    for name in _MODEL_FUNCS:
        if not _lib.has(lib, name):
            raise EngineError(f"the engine library has no {name} (built before the model code): rebuild it",
                              _lib.DS4_E_BACKEND, "spark-setup build --force")


class Model:
    """A DS4 GGUF loaded by the engine. `desc` holds ds4_model_desc as a dict."""

    def __init__(self, path: str | os.PathLike, backend: str = "cpu",
                 lib: Optional[ctypes.CDLL | str | os.PathLike] = None):
        """lib: a loaded engine library, the path of one, or None ($DS4_ENGINE_LIB, else the built engine)."""
        if backend not in _BACKENDS:
            raise EngineError(f"unknown backend {backend!r} (use cpu or cuda)", DS4_E_ARG)
        self._lib = lib if isinstance(lib, ctypes.CDLL) else _lib.load(lib)
        _need(self._lib)
        self.path = os.fspath(path)
        self.backend = backend
        handle = ctypes.c_void_p()
        _lib.check(self._lib, self._lib.ds4_model_open(self.path.encode(), _BACKENDS[backend], ctypes.byref(handle)))
        self._h: Optional[ctypes.c_void_p] = handle
        d = _lib.ModelDesc()
        try:
            _lib.check(self._lib, self._lib.ds4_model_describe(self._h, ctypes.byref(d)))
        except EngineError:
            self.close()
            raise
        self.desc = {name: getattr(d, name) for name, _ in _lib.ModelDesc._fields_}
        self._sessions: list[Session] = []

    @property
    def n_vocab(self) -> int:
        return self.desc["n_vocab"]

    def new_session(self, max_ctx: int, roundtrip: bool = True) -> "Session":
        """A fresh session with room for `max_ctx` positions (memory is allocated now). roundtrip=False turns
        the official FP8/FP4/F16 round-trips off (f32 throughout, the transformers-comparable mode)."""
        self._check_open()
        h = ctypes.c_void_p()
        flags = 0 if roundtrip else SESSION_NO_ROUNDTRIP
        _lib.check(self._lib, self._lib.ds4_session_new(self._h, int(max_ctx), flags, ctypes.byref(h)))
        s = Session(self, h, int(max_ctx), roundtrip)
        self._sessions.append(s)
        return s

    def _check_open(self) -> None:
        if self._h is None:
            raise EngineError("model is closed", DS4_E_STATE)

    def close(self) -> None:
        """Free the model (and any session still open on it). Idempotent."""
        for s in list(getattr(self, "_sessions", [])):
            s.close()
        if getattr(self, "_h", None) is not None:
            self._lib.ds4_model_free(self._h)
            self._h = None

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class Session:
    """Positions 0..pos-1 evaluated so far; `eval` continues at `pos`."""

    def __init__(self, model: Model, handle: ctypes.c_void_p, max_ctx: int, roundtrip: bool):
        self._model = model
        self._lib = model._lib
        self._h: Optional[ctypes.c_void_p] = handle
        self.max_ctx = max_ctx
        self.roundtrip = roundtrip
        self.nbytes = int(self._lib.ds4_session_bytes(handle))

    @property
    def pos(self) -> int:
        self._check_open()
        return int(self._lib.ds4_session_pos(self._h))

    def eval(self, tokens: Sequence[int] | np.ndarray, all_logits: bool = False) -> np.ndarray:
        """Evaluate tokens at positions pos..pos+n-1. Returns float32 logits: [n_vocab] for the last position,
        or [n, n_vocab] with all_logits=True."""
        self._check_open()
        toks = np.ascontiguousarray(np.asarray(tokens, dtype=np.int64).reshape(-1))
        if toks.size and (toks.min() < -2**31 or toks.max() >= 2**31):
            raise EngineError("token id out of the int32 range", DS4_E_ARG)
        toks32 = toks.astype(np.int32)
        n = int(toks32.size)
        V = self._model.n_vocab
        out = np.empty((n, V) if all_logits else (V,), dtype=np.float32)
        if n == 0:
            return out
        rc = self._lib.ds4_session_eval(self._h, toks32.ctypes.data_as(_lib.P_int32), n, 1 if all_logits else 0,
                                        out.ctypes.data_as(_lib.P_float))
        _lib.check(self._lib, rc)
        return out

    def truncate(self, n: int) -> None:
        """Forget positions >= n; the next eval continues at position n."""
        self._check_open()
        _lib.check(self._lib, self._lib.ds4_session_truncate(self._h, int(n)))

    def _check_open(self) -> None:
        if self._h is None:
            raise EngineError("session is closed", DS4_E_STATE)
        self._model._check_open()

    def close(self) -> None:
        if self._h is not None:
            self._lib.ds4_session_free(self._h)
            self._h = None
            if self in self._model._sessions:
                self._model._sessions.remove(self)

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
