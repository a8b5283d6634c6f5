"""ctypes access to libds4engine.so: finding and loading it, the prototypes of ds4.h, one error type.

Symbols a library lacks (e.g. model/session functions in a library built before the model code landed) are simply
not bound: `has(lib, name)` tells, and calling them raises AttributeError from ctypes.
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path
from typing import Optional

from ..errors import UserError

c_int, c_int32, c_int64, c_uint32, c_uint64 = ctypes.c_int, ctypes.c_int32, ctypes.c_int64, ctypes.c_uint32, ctypes.c_uint64
c_size_t, c_char_p, c_void_p, c_double = ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_double
P_float, P_int32, P_double = ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_int32), ctypes.POINTER(ctypes.c_double)

# ds4_status / ds4_backend / ds4_type (ds4.h)
DS4_OK, DS4_E_ARG, DS4_E_IO, DS4_E_FORMAT, DS4_E_MODEL, DS4_E_NOMEM, DS4_E_BACKEND, DS4_E_STATE = 0, -1, -2, -3, -4, -5, -6, -7
BACKEND_CPU, BACKEND_CUDA = 0, 1
TYPE_F32, TYPE_F16, TYPE_Q8_0, TYPE_Q2_K, TYPE_Q4_K, TYPE_IQ2_XXS, TYPE_I32, TYPE_BF16 = 0, 1, 8, 10, 12, 16, 26, 30


class EngineError(UserError):
    """A failure reported by the engine: message = ds4_last_error(), code = the DS4_E_* status."""

    def __init__(self, message: str, code: int = DS4_E_ARG, hint: Optional[str] = None):
        super().__init__(message, hint)
        self.code = code


class TensorInfo(ctypes.Structure):
    _fields_ = [("name", c_char_p), ("type", c_int32), ("n_dims", c_int32), ("ne", c_int64 * 4),
                ("offset", c_uint64), ("nbytes", c_uint64)]


_DESC_INT_FIELDS = ("n_layer n_embd n_vocab n_head head_dim n_rot q_lora_rank o_groups o_lora_rank n_expert "
                    "n_expert_used n_expert_shared n_ff_exp n_hash_layers sliding_window idx_heads idx_dim idx_topk "
                    "hc_mult hc_iters is_full_size").split()


class ModelDesc(ctypes.Structure):
    _fields_ = [(n, c_int32) for n in _DESC_INT_FIELDS] + [("weight_bytes", c_uint64)]


_P = ctypes.POINTER
# name -> (restype, argtypes). Opaque handles are void pointers.
PROTOTYPES: dict[str, tuple[object, list[object]]] = {
    "ds4_abi_version": (c_int, []),
    "ds4_version_string": (c_char_p, []),
    "ds4_has_cuda": (c_int, []),
    "ds4_last_error": (c_char_p, []),
    "ds4_gguf_open": (c_int, [c_char_p, _P(c_void_p)]),
    "ds4_gguf_close": (None, [c_void_p]),
    "ds4_gguf_n_tensors": (c_int64, [c_void_p]),
    "ds4_gguf_n_kv": (c_int64, [c_void_p]),
    "ds4_gguf_alignment": (c_uint32, [c_void_p]),
    "ds4_gguf_data_offset": (c_uint64, [c_void_p]),
    "ds4_gguf_tensor_at": (c_int, [c_void_p, c_int64, _P(TensorInfo)]),
    "ds4_gguf_find_tensor": (c_int, [c_void_p, c_char_p, _P(TensorInfo)]),
    "ds4_gguf_tensor_data": (c_void_p, [c_void_p, _P(TensorInfo)]),
    "ds4_row_bytes": (c_size_t, [c_int, c_int64]),
    "ds4_dequantize": (c_int, [c_int, c_void_p, c_int64, c_int64, c_int64, c_int64, P_float]),
    "ds4_dequantize_backend": (c_int, [c_int, c_int, c_void_p, c_int64, c_int64, c_int64, c_int64, P_float]),
    "ds4_matvec": (c_int, [c_int, c_int, c_void_p, c_int64, c_int64, P_float, P_float]),
    "ds4_matmul": (c_int, [c_int, c_int, c_void_p, c_int64, c_int64, c_int64, P_float, c_int64, P_int32, P_int32,
                           c_int64, P_float]),
    "ds4_model_open": (c_int, [c_char_p, c_int, _P(c_void_p)]),
    "ds4_model_free": (None, [c_void_p]),
    "ds4_model_describe": (c_int, [c_void_p, _P(ModelDesc)]),
    "ds4_session_new": (c_int, [c_void_p, c_int32, c_uint32, _P(c_void_p)]),
    "ds4_session_free": (None, [c_void_p]),
    "ds4_session_bytes": (c_uint64, [c_void_p]),
    "ds4_session_pos": (c_int32, [c_void_p]),
    "ds4_session_eval": (c_int, [c_void_p, P_int32, c_int32, c_int32, P_float]),
    "ds4_session_truncate": (c_int, [c_void_p, c_int32]),
    "ds4_bandwidth_probe": (c_int, [c_int, c_uint64, c_int32, P_double, P_double]),
}
REQUIRED = ("ds4_abi_version", "ds4_last_error", "ds4_gguf_open")
ABI_VERSION = 1

_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL] = {}


def has(lib: ctypes.CDLL, name: str) -> bool:
    try:
        getattr(lib, name)
        return True
    except AttributeError:
        return False


def _bind(lib: ctypes.CDLL) -> None:
    for name, (res, args) in PROTOTYPES.items():
        try:
            fn = getattr(lib, name)
        except AttributeError:
            continue
        fn.restype = res
        fn.argtypes = args


def _locate(path: Optional[os.PathLike | str]) -> Path:
    if path is not None:
        return Path(path)
    env = os.environ.get("DS4_ENGINE_LIB")
    if env:
        return Path(env)
    from ..settings import load_settings
    from .build import find_engine

    found = find_engine(load_settings())
    if found is None:
        raise EngineError("engine not built: run spark-setup build", DS4_E_BACKEND,
                          "spark-setup build compiles the engine for this machine (a few minutes)")
    return found


def load(path: Optional[os.PathLike | str] = None) -> ctypes.CDLL:
    """Load (once per path) and bind the engine library: `path`, else $DS4_ENGINE_LIB, else the current build."""
    p = _locate(path)
    key = str(p.resolve()) if p.exists() else str(p)
    with _lock:
        if key in _loaded:
            return _loaded[key]
        if not p.exists():
            raise EngineError(f"engine library {p} does not exist", DS4_E_IO, "run spark-setup build")
        try:
            lib = ctypes.CDLL(key)
        except OSError as exc:
            raise EngineError(f"cannot load engine library {p}: {exc}", DS4_E_IO, "rebuild with spark-setup build --force")
        for name in REQUIRED:
            if not has(lib, name):
                raise EngineError(f"{p} is not a ds4 engine library (no {name})", DS4_E_IO, "run spark-setup build")
        _bind(lib)
        v = lib.ds4_abi_version()
        if v != ABI_VERSION:
            raise EngineError(f"engine library {p} has ABI version {v}, this package needs {ABI_VERSION}", DS4_E_IO,
                              "rebuild with spark-setup build --force")
        _loaded[key] = lib
        return lib


def last_error(lib: ctypes.CDLL) -> str:
    msg = lib.ds4_last_error()
    return msg.decode("utf-8", "replace") if msg else ""


def check(lib: ctypes.CDLL, rc: int) -> int:
    """Raise EngineError(ds4_last_error()) when rc is a negative status; return rc otherwise."""
    if rc < 0:
        raise EngineError(last_error(lib) or f"engine call failed with status {rc}", rc)
    return rc
