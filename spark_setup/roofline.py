"""Decode roofline: measured memory read bandwidth / bytes read per token = the most tokens/s one stream can reach.

Bandwidth comes from the engine's own probe (ds4_bandwidth_probe: a read-only streaming kernel over >= 8 GiB on
the GPU, median of many runs); bytes per token from the GGUF's tensor table (gguf_info.bytes_per_token, facts §G).
With a server URL, decode t/s is measured with the bench client at each context and set against the roofline.
"""

from __future__ import annotations

import ctypes
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from .errors import UsageError, UserError

BACKENDS = ("auto", "cpu", "cuda")


@dataclass
class Bandwidth:
    backend: str  # "cpu" or "cuda", or "given" when passed by hand
    probe_bytes: int
    iters: int
    read_gbs: float
    copy_gbs: Optional[float]


def probe_bandwidth(backend: str = "auto", probe_bytes: int = 0, iters: int = 0, lib: Any = None) -> Bandwidth:
    """Run ds4_bandwidth_probe. backend "auto": CUDA when the engine has it and a GPU answers, else CPU.
    probe_bytes / iters 0 = the engine's defaults (CPU 1 GiB x 5; CUDA 8 GiB or what fits x 20)."""
    from .engine import _lib

    if backend not in BACKENDS:
        raise UsageError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    lib = lib if lib is not None else _lib.load()
    if not _lib.has(lib, "ds4_bandwidth_probe"):
        raise UserError("this engine build has no bandwidth probe", "rebuild it: spark-setup build --force")
    candidates = {"cpu": ["cpu"], "cuda": ["cuda"], "auto": (["cuda"] if lib.ds4_has_cuda() else []) + ["cpu"]}
    errors = []
    for name in candidates[backend]:
        rd, cp = ctypes.c_double(), ctypes.c_double()
        code = lib.ds4_bandwidth_probe(_lib.BACKEND_CUDA if name == "cuda" else _lib.BACKEND_CPU,
                                       ctypes.c_uint64(probe_bytes), ctypes.c_int32(iters),
                                       ctypes.byref(rd), ctypes.byref(cp))
        if code == 0:
            return Bandwidth(name, probe_bytes, iters, rd.value, cp.value)
        errors.append(f"{name}: {_lib.last_error(lib)}")
    raise UserError(f"bandwidth probe failed ({'; '.join(errors)})",
                    "for the GPU: check nvidia-smi and free GPU memory; --backend cpu measures host memory")


@dataclass
class RooflinePoint:
    ctx: int
    bytes_per_token: int
    roofline_tps: float
    measured_tps: Optional[float] = None
    measured_std: Optional[float] = None

    @property
    def fraction(self) -> Optional[float]:
        if self.measured_tps is None or self.roofline_tps <= 0:
            return None
        return self.measured_tps / self.roofline_tps


@dataclass
class Roofline:
    model: str
    bandwidth: Bandwidth
    points: list[RooflinePoint]
    bench_url: Optional[str] = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "bandwidth": asdict(self.bandwidth), "bench_url": self.bench_url,
                "notes": self.notes,
                "points": [{**asdict(p), "fraction": p.fraction} for p in self.points]}


def tokens_per_s(read_gbs: float, bytes_per_token: int) -> float:
    return read_gbs * 1e9 / bytes_per_token if bytes_per_token > 0 else float("inf")


def model_tensors(model: Optional[Path], variant: str = "q2") -> tuple[list[Any], str, int]:
    """(tensor table, label, experts used per token): from the GGUF, else the facts' reference layout."""
    from .engine import gguf_info

    if model is None:
        if variant not in gguf_info.EXPERT_TYPES:
            raise UsageError(f"--variant must be one of {', '.join(gguf_info.EXPERT_TYPES)}, got {variant!r}")
        return gguf_info.reference_tensors(variant), f"DS4 {variant.upper()} reference layout (no --model)", \
            gguf_info.N_USED
    info = gguf_info.read_info(model)
    if info.kind != "main":
        raise UserError(f"{model} is not a DS4 main model (it looks like a {info.kind} file)",
                        "give the main GGUF (the MTP draft is not decoded on its own)")
    return info.tensors, str(model), info.n_expert_used


def build_roofline(ctxs: Sequence[int], bandwidth: Bandwidth, model: Optional[Path] = None,
                   variant: str = "q2") -> Roofline:
    from .engine.gguf_info import bytes_per_token

    if not ctxs:
        raise UsageError("--ctx needs at least one value")
    if any(c < 0 for c in ctxs):
        raise UsageError("--ctx values must be >= 0")
    tensors, label, n_used = model_tensors(model, variant)
    pts = []
    for c in ctxs:
        bpt = bytes_per_token(tensors, c, n_expert_used=n_used).total
        pts.append(RooflinePoint(c, bpt, tokens_per_s(bandwidth.read_gbs, bpt)))
    return Roofline(label, bandwidth, pts)


def measure_decode(rl: Roofline, url: str, tg: int = 128, runs: int = 1, pp: int = 64,
                   tokenizer: Optional[Path] = None, api_key: Optional[str] = None, model_name: Optional[str] = None,
                   progress: Any = None) -> None:
    """Fill measured_tps: for each context c, one bench test with depth c - pp, pp prompt tokens, tg generated."""
    from . import bench

    for p in rl.points:
        depth = max(0, p.ctx - pp)
        cfg = bench.BenchConfig(url=url, model=model_name, pp=(pp,), tg=(tg,), depth=(depth,), runs=runs,
                                latency_mode="none", api_key=api_key, tokenizer=tokenizer,
                                warmup=p is rl.points[0])
        rep = bench.run_bench(cfg, progress)
        tg_row = rep.rows[1]
        if tg_row.t_s is not None:
            p.measured_tps, p.measured_std = tg_row.t_s.mean, tg_row.t_s.std
        if rep.ignore_eos_honoured() is False and "stopped early" not in " ".join(rl.notes):
            rl.notes.append("the server stopped early (no ignore_eos): decode t/s counts the tokens it generated")
    rl.bench_url = url


def plot(rl: Roofline, path: Path) -> Path:
    """Roofline vs measured decode t/s over context, to .svg or .png (matplotlib: the `plot` extra)."""
    if path.suffix.lower() not in (".svg", ".png"):
        raise UsageError(f"--plot must name a .svg or .png file, got {path.name}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib, which is not installed",
                        "pip install matplotlib (the spark-setup 'plot' extra), or drop --plot")
    xs = [p.ctx for p in rl.points]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(xs, [p.roofline_tps for p in rl.points], "o-", label=f"roofline ({rl.bandwidth.read_gbs:.0f} GB/s read)")
    meas = [(p.ctx, p.measured_tps) for p in rl.points if p.measured_tps is not None]
    if meas:
        ax.plot([m[0] for m in meas], [m[1] for m in meas], "s-", label="measured decode")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("tokens/s (one stream)")
    ax.set_title(f"Decode roofline: {Path(rl.model).name if rl.model.endswith('.gguf') else rl.model}", fontsize=10)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
