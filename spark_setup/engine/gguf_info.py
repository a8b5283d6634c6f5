"""Inspect a GGUF file without touching its tensor data: metadata, tensor table, DS4 layout check, bytes/token.

Reads through the `gguf` package's GGUFReader (it memory-maps the file and only parses the header and the tensor
infos; tensor data pages are never read), so it works on the real 80 GiB files in seconds.

The expected layout and the decode bytes-per-token method come from ds4-model-facts.md §A (hyper-parameters),
§B (tensors of the main file), §C (MTP draft file) and §G (bytes read per decoded token).
"""

from __future__ import annotations

import mmap
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType

from ..errors import UserError

GGUF_MAGIC = b"GGUF"

# ---- the DS4 layout (facts §A, §B, §C) ---------------------------------------------------------------------
F32, F16, Q8_0, Q2_K, Q4_K, IQ2_XXS, I32 = 0, 1, 8, 10, 12, 16, 26
PLAIN = frozenset({F32, F16})

N_LAYER, N_EMBD, N_VOCAB = 43, 4096, 129280
N_HEAD, HEAD_DIM = 64, 512
Q_RANK, O_GROUPS, O_RANK = 1024, 8, 1024
N_EXPERT, N_USED, N_FF = 256, 6, 2048
N_HASH, WINDOW = 3, 128
IDX_HEADS, IDX_DIM, IDX_TOPK = 64, 128, 512
HC = 4
HC_DIM, HC_MIX = N_EMBD * HC, 2 * HC + HC * HC  # 16384, 24

# expert types per variant: (gate, up, down)
EXPERT_TYPES = {"q2": (IQ2_XXS, IQ2_XXS, Q2_K), "q4": (Q4_K, Q4_K, Q4_K)}

ARCH = "deepseek4"


def compress_ratio(layer: int) -> int:
    """L0, L1: 0 (raw window only); even L >= 2: 4; odd L >= 3: 128 (§A)."""
    if layer < 2:
        return 0
    return 4 if layer % 2 == 0 else 128


# key (without the "deepseek4." prefix) -> expected value; floats compare with 1e-6 relative tolerance (§A)
EXPECTED_METADATA: dict[str, Any] = {
    "block_count": N_LAYER,
    "embedding_length": N_EMBD,
    "vocab_size": N_VOCAB,
    "attention.head_count": N_HEAD,
    "attention.head_count_kv": 1,
    "attention.key_length": HEAD_DIM,
    "attention.value_length": HEAD_DIM,
    "rope.dimension_count": 64,
    "attention.q_lora_rank": Q_RANK,
    "attention.output_group_count": O_GROUPS,
    "attention.output_lora_rank": O_RANK,
    "rope.freq_base": 10000.0,
    "attention.compress_rope_freq_base": 160000.0,
    "rope.scaling.factor": 16.0,
    "rope.scaling.original_context_length": 65536,
    "rope.scaling.yarn_beta_fast": 32.0,
    "rope.scaling.yarn_beta_slow": 1.0,
    "attention.sliding_window": WINDOW,
    "attention.compress_ratios": [compress_ratio(i) for i in range(N_LAYER)],
    "attention.indexer.head_count": IDX_HEADS,
    "attention.indexer.key_length": IDX_DIM,
    "attention.indexer.top_k": IDX_TOPK,
    "hyper_connection.count": HC,
    "hyper_connection.sinkhorn_iterations": 20,
    "hyper_connection.epsilon": 1e-6,
    "expert_count": N_EXPERT,
    "expert_used_count": N_USED,
    "expert_shared_count": 1,
    "expert_feed_forward_length": N_FF,
    "hash_layer_count": N_HASH,
    "expert_weights_norm": True,
    "expert_weights_scale": 1.5,
    "swiglu_clamp_exp": [10.0] * N_LAYER,
    "attention.layer_norm_rms_epsilon": 1e-6,
}
# must be 0 when present
ZERO_OR_ABSENT = ("expert_group_count", "expert_group_used_count")


def type_name(t: int) -> str:
    try:
        return GGMLQuantizationType(t).name
    except ValueError:
        return f"type{t}"


def tensor_nbytes(dims: Sequence[int], ggml_type: int) -> int:
    n = int(np.prod([int(d) for d in dims], dtype=np.uint64)) if dims else 1
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    return n // block * size


@dataclass(frozen=True)
class Tensor:
    name: str
    dims: tuple[int, ...]  # GGUF order: innermost (contiguous) first
    type: int
    nbytes: int
    offset: int = 0  # relative to the data section

    @property
    def type_name(self) -> str:
        return type_name(self.type)

    @classmethod
    def make(cls, name: str, dims: Sequence[int], ggml_type: int, offset: int = 0) -> "Tensor":
        return cls(name, tuple(int(d) for d in dims), int(ggml_type), tensor_nbytes(dims, ggml_type), offset)


@dataclass(frozen=True)
class Expect:
    dims: tuple[int, ...]
    types: frozenset[int]
    required: bool = True


def _types_str(types: Iterable[int]) -> str:
    return "|".join(sorted(type_name(t) for t in types))


def _dims_str(dims: Sequence[int]) -> str:
    return "[" + ",".join(str(d) for d in dims) + "]"


def _attn_block(p: str, out: dict[str, Expect]) -> None:
    def add(name: str, dims: Sequence[int], types: Iterable[int] | int, required: bool = True) -> None:
        ts = frozenset([types]) if isinstance(types, int) else frozenset(types)
        out[p + name] = Expect(tuple(dims), ts, required)

    add("attn_norm.weight", (N_EMBD,), F32)
    add("attn_q_a.weight", (N_EMBD, Q_RANK), Q8_0)
    add("attn_q_a_norm.weight", (Q_RANK,), F32)
    add("attn_q_b.weight", (Q_RANK, N_HEAD * HEAD_DIM), Q8_0)
    add("attn_kv.weight", (N_EMBD, HEAD_DIM), Q8_0)
    add("attn_kv_a_norm.weight", (HEAD_DIM,), F32)
    add("attn_sinks.weight", (N_HEAD,), F32)
    add("attn_output_a.weight", (HEAD_DIM * N_HEAD // O_GROUPS, O_GROUPS * O_RANK), Q8_0)
    add("attn_output_b.weight", (O_GROUPS * O_RANK, N_EMBD), Q8_0)
    add("ffn_norm.weight", (N_EMBD,), F32)
    add("ffn_gate_shexp.weight", (N_EMBD, N_FF), Q8_0)
    add("ffn_up_shexp.weight", (N_EMBD, N_FF), Q8_0)
    add("ffn_down_shexp.weight", (N_FF, N_EMBD), Q8_0)


def expected_layout(kind: str = "main", variant: str = "q2") -> dict[str, Expect]:
    """The tensors a DS4 file of `kind` ("main" or "mtp") must hold, from facts §B / §C."""
    out: dict[str, Expect] = {}

    def add(name: str, dims: Sequence[int], types: Iterable[int] | int, required: bool = True) -> None:
        ts = frozenset([types]) if isinstance(types, int) else frozenset(types)
        out[name] = Expect(tuple(dims), ts, required)

    if kind == "mtp":
        p = "mtp.0."
        add(p + "hc_head_fn.weight", (HC_DIM, HC), PLAIN)
        add(p + "hc_head_base.weight", (HC,), F32)
        add(p + "hc_head_scale.weight", (1,), F32)
        add(p + "e_proj.weight", (N_EMBD, N_EMBD), Q8_0)
        add(p + "h_proj.weight", (N_EMBD, N_EMBD), Q8_0)
        for n in ("enorm", "hnorm", "norm"):
            add(p + f"{n}.weight", (N_EMBD,), F32)
        for hc in ("hc_attn", "hc_ffn"):
            add(p + f"{hc}_fn.weight", (HC_DIM, HC_MIX), PLAIN)
            add(p + f"{hc}_scale.weight", (3,), F32)
            add(p + f"{hc}_base.weight", (HC_MIX,), F32)
        _attn_block(p, out)
        add(p + "ffn_gate_inp.weight", (N_EMBD, N_EXPERT), PLAIN)
        add(p + "exp_probs_b.bias", (N_EXPERT,), F32)
        any_expert = (IQ2_XXS, Q2_K, Q4_K)
        add(p + "ffn_gate_exps.weight", (N_EMBD, N_FF, N_EXPERT), any_expert)
        add(p + "ffn_up_exps.weight", (N_EMBD, N_FF, N_EXPERT), any_expert)
        add(p + "ffn_down_exps.weight", (N_FF, N_EMBD, N_EXPERT), any_expert)
        return out

    gate_t, up_t, down_t = EXPERT_TYPES[variant]
    add("token_embd.weight", (N_EMBD, N_VOCAB), F16)
    for L in range(N_LAYER):
        p = f"blk.{L}."
        r = compress_ratio(L)
        for hc in ("hc_attn", "hc_ffn"):
            add(p + f"{hc}_fn.weight", (HC_DIM, HC_MIX), F16)
            add(p + f"{hc}_scale.weight", (3,), F32)
            add(p + f"{hc}_base.weight", (HC_MIX,), F32)
        _attn_block(p, out)
        if r:
            w = 2 * HEAD_DIM if r == 4 else HEAD_DIM
            add(p + "attn_compressor_ape.weight", (w, r), F16)
            add(p + "attn_compressor_kv.weight", (N_EMBD, w), F16)
            add(p + "attn_compressor_gate.weight", (N_EMBD, w), F16)
            add(p + "attn_compressor_norm.weight", (HEAD_DIM,), F32)
        if r == 4:
            add(p + "indexer.attn_q_b.weight", (Q_RANK, IDX_HEADS * IDX_DIM), F16)
            add(p + "indexer.proj.weight", (N_EMBD, IDX_HEADS), F16)
            add(p + "indexer_compressor_ape.weight", (2 * IDX_DIM, r), F16)
            add(p + "indexer_compressor_kv.weight", (N_EMBD, 2 * IDX_DIM), F16)
            add(p + "indexer_compressor_gate.weight", (N_EMBD, 2 * IDX_DIM), F16)
            add(p + "indexer_compressor_norm.weight", (IDX_DIM,), F32)
        add(p + "ffn_gate_inp.weight", (N_EMBD, N_EXPERT), F16)
        # exp_probs_b: needed for top-k routed layers; its presence in the hash layers is unverified (§B)
        add(p + "exp_probs_b.bias", (N_EXPERT,), F32, required=L >= N_HASH)
        if L < N_HASH:
            add(p + "ffn_gate_tid2eid.weight", (N_USED, N_VOCAB), I32)
        add(p + "ffn_gate_exps.weight", (N_EMBD, N_FF, N_EXPERT), gate_t)
        add(p + "ffn_up_exps.weight", (N_EMBD, N_FF, N_EXPERT), up_t)
        add(p + "ffn_down_exps.weight", (N_FF, N_EMBD, N_EXPERT), down_t)
    add("output_hc_fn.weight", (HC_DIM, HC), F16)
    add("output_hc_base.weight", (HC,), F32)
    add("output_hc_scale.weight", (1,), F32)
    add("output_norm.weight", (N_EMBD,), F32)
    add("output.weight", (N_EMBD, N_VOCAB), Q8_0)
    return out


def reference_tensors(variant: str = "q2") -> list[Tensor]:
    """The main file's tensor table as the facts describe it (no data); used when no GGUF is at hand."""
    return [Tensor.make(n, e.dims, min(e.types)) for n, e in expected_layout("main", variant).items() if e.required]


# ---- results -----------------------------------------------------------------------------------------------
@dataclass
class Mismatch:
    name: str
    expected: str
    found: str


@dataclass
class TensorGroup:
    pattern: str  # e.g. "blk.*.attn_q_a.weight"
    count: int
    layers: str  # "" for globals, else compact ranges: "0-42", "2-42/2", "0-2"
    dims: list[str]
    types: list[str]
    nbytes: int


@dataclass
class BytesPerToken:
    """Bytes a single-stream decode step reads at context `ctx` (facts §G)."""

    ctx: int
    layers: int  # per-layer weights read every token (all layers)
    head: int  # output head + hyper head + final norm + one embedding row
    routed: int  # n_used routed experts per layer
    kv: int  # KV cache reads (raw window, compressed rows, indexer keys)
    indexer_active: bool
    kv_bytes: int

    @property
    def always_on(self) -> int:
        return self.layers + self.head

    @property
    def total(self) -> int:
        return self.layers + self.head + self.routed + self.kv

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["always_on"] = self.always_on
        d["total"] = self.total
        return d


@dataclass
class GGUFInfo:
    path: Path
    file_size: int
    version: int
    alignment: int
    data_offset: int
    n_kv: int
    metadata: dict[str, Any]
    tensors: list[Tensor]
    kind: str  # "main", "mtp" or "other"
    variant: str | None  # "q2" / "q4" for main files
    mismatches: list[Mismatch] = field(default_factory=list)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def valid(self) -> bool:
        return not self.mismatches

    @property
    def n_expert_used(self) -> int:
        v = self.metadata.get(f"{self.arch}.expert_used_count")
        return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 else N_USED

    @property
    def arch(self) -> str:
        v = self.metadata.get("general.architecture")
        return v if isinstance(v, str) else ARCH

    def groups(self) -> list[TensorGroup]:
        return group_tensors(self.tensors)

    def bytes_per_token(self, ctx: int, kv_bytes: int = 4) -> BytesPerToken:
        return bytes_per_token(self.tensors, ctx, n_expert_used=self.n_expert_used, kv_bytes=kv_bytes)

    def to_dict(self, ctx: int | None = None) -> dict[str, Any]:
        d: dict[str, Any] = {
            "path": str(self.path), "file_size": self.file_size, "version": self.version,
            "alignment": self.alignment, "data_offset": self.data_offset, "n_kv": self.n_kv,
            "n_tensors": len(self.tensors), "tensor_bytes": self.tensor_bytes, "kind": self.kind,
            "variant": self.variant, "valid": self.valid,
            "metadata": self.metadata,
            "groups": [asdict(g) for g in self.groups()],
            "mismatches": [asdict(m) for m in self.mismatches],
        }
        if ctx is not None and self.kind == "main":
            d["bytes_per_token"] = self.bytes_per_token(ctx).to_dict()
        return d


# ---- reading -----------------------------------------------------------------------------------------------
MAX_ARRAY_VALUES = 64  # longer arrays (vocab, merges) are summarised, not copied


def _field_value(f: Any) -> Any:
    main = f.types[0] if f.types else None
    if main == GGUFValueType.ARRAY:
        sub = f.types[-1] if len(f.types) > 1 else None
        n = len(f.data)
        if n > MAX_ARRAY_VALUES:
            return {"array": sub.name if sub is not None else "?", "len": n}
        return f.contents()
    v = f.contents()
    if isinstance(v, float):
        return float(np.float32(v)) if main == GGUFValueType.FLOAT32 else v
    return v


def _fail(path: Path, what: str) -> UserError:
    return UserError(f"{path}: {what}",
                     "the file is truncated or corrupt: re-fetch it (spark-setup download --verify) or pick another file")


# ---- a bounds-checked walk of the header ---------------------------------------------------------------------
# GGUFReader trusts the counts and lengths it reads: a corrupt count makes it loop for ever (reads past the end
# return empty arrays and do not advance). This walk checks every count and length against the file size first.
_SCALAR_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


class _Corrupt(Exception):
    pass


def _walk_header(buf: Any, size: int) -> None:
    import struct

    off = 4

    def need(n: int, what: str) -> None:
        if n < 0 or off + n > size:
            raise _Corrupt(f"{what} runs past the end of the file (at byte {off:,} of {size:,})")

    def u32(what: str) -> int:
        nonlocal off
        need(4, what)
        v = struct.unpack_from("<I", buf, off)[0]
        off += 4
        return v

    def u64(what: str) -> int:
        nonlocal off
        need(8, what)
        v = struct.unpack_from("<Q", buf, off)[0]
        off += 8
        return v

    def string(what: str) -> None:
        nonlocal off
        n = u64(what)
        need(n, what)
        off += n

    version = u32("version")
    if version not in (2, 3):
        raise _Corrupt(f"unsupported GGUF version {version}")
    n_tensors, n_kv = u64("tensor count"), u64("metadata count")
    if n_kv * 13 > size or n_tensors * 32 > size:
        raise _Corrupt(f"implausible counts ({n_kv:,} metadata keys, {n_tensors:,} tensors) for {size:,} bytes")
    for i in range(n_kv):
        what = f"metadata entry #{i}"
        string(what)
        t = u32(what)
        if t in _SCALAR_SIZE:
            need(_SCALAR_SIZE[t], what)
            off += _SCALAR_SIZE[t]
        elif t == _STRING:
            string(what)
        elif t == _ARRAY:
            sub, count = u32(what), u64(what)
            if sub in _SCALAR_SIZE:
                need(count * _SCALAR_SIZE[sub], what)
                off += count * _SCALAR_SIZE[sub]
            elif sub == _STRING:
                need(count * 8, what)
                for _ in range(count):
                    string(what)
            else:
                raise _Corrupt(f"{what} has an unsupported array element type {sub}")
        else:
            raise _Corrupt(f"{what} has an unknown value type {t}")
    known = {int(q) for q in GGMLQuantizationType}
    for i in range(n_tensors):
        what = f"tensor info #{i}"
        string(what)
        n_dims = u32(what)
        if not 1 <= n_dims <= 4:
            raise _Corrupt(f"{what} has {n_dims} dimensions")
        dims = [u64(what) for _ in range(n_dims)]
        t = u32(what)
        if t not in known or GGMLQuantizationType(t) not in GGML_QUANT_SIZES:
            raise _Corrupt(f"{what} has an unknown tensor type {t}")
        block = GGML_QUANT_SIZES[GGMLQuantizationType(t)][0]
        if dims[0] % block:
            raise _Corrupt(f"{what}: {dims[0]} values per row is not a multiple of the {block}-value block")
        u64(what)


def read_info(path: str | os.PathLike[str]) -> GGUFInfo:
    """Parse the header and tensor infos of `path` (never reads tensor data) and check the DS4 layout."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(4)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file", "give the path of a .gguf file (spark-setup models lists them)")
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory", "give the path of a .gguf file")
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc})", "check the path and its permissions")
    if size < 24 or head != GGUF_MAGIC:
        raise _fail(path, "not a GGUF file (bad magic or too short)" if head != GGUF_MAGIC or size < 4
                    else f"only {size} bytes: too short for a GGUF header")
    try:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            _walk_header(mm, size)
    except _Corrupt as exc:
        raise _fail(path, f"truncated or corrupt GGUF: {exc}")
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot map the file ({exc})", "check the path and its permissions")
    try:
        r = GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError, TypeError, UnicodeDecodeError, MemoryError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise _fail(path, f"truncated or corrupt GGUF: header or tensor table unreadable ({msg[:120]})")

    metadata: dict[str, Any] = {}
    version = 0
    n_kv = 0
    for name, f in r.fields.items():
        if name == "GGUF.version":
            version = int(f.parts[0][0])
            continue
        if name == "GGUF.kv_count":
            n_kv = int(f.parts[0][0])
            continue
        if name.startswith("GGUF."):
            continue
        try:
            metadata[name] = _field_value(f)
        except (ValueError, UnicodeDecodeError) as exc:
            raise _fail(path, f"metadata key {name!r} cannot be decoded ({exc})")

    data_offset = int(r.data_offset)
    tensors = [Tensor(t.name, tuple(int(d) for d in t.shape), int(t.tensor_type), int(t.n_bytes),
                      int(t.data_offset) - data_offset) for t in r.tensors]
    # GGUFReader already refuses tensor data past the end; keep an explicit bounds check of our own
    for t in tensors:
        end = data_offset + t.offset + t.nbytes
        if end > size:
            raise _fail(path, f"tensor {t.name} ends at byte {end:,} but the file has {size:,} bytes")
    kind = detect_kind(tensors)
    variant = detect_variant(tensors) if kind == "main" else None
    info = GGUFInfo(path=path, file_size=size, version=version, alignment=int(r.alignment),
                    data_offset=data_offset, n_kv=n_kv, metadata=metadata, tensors=tensors, kind=kind,
                    variant=variant)
    info.mismatches = validate(info)
    return info


def detect_kind(tensors: Sequence[Tensor]) -> str:
    names = {t.name for t in tensors}
    if any(n.startswith("mtp.") for n in names):
        return "mtp"
    if "token_embd.weight" in names or any(n.startswith("blk.") for n in names):
        return "main"
    return "other"


def detect_variant(tensors: Sequence[Tensor]) -> str:
    for t in tensors:
        if t.name.endswith("ffn_gate_exps.weight"):
            return "q4" if t.type == Q4_K else "q2"
    return "q2"


def _value_matches(found: Any, expected: Any) -> bool:
    if isinstance(expected, bool):
        return found is expected or (isinstance(found, (int, np.integer)) and bool(found) == expected)
    if isinstance(expected, list):
        return (isinstance(found, list) and len(found) >= len(expected)
                and all(_value_matches(f, e) for f, e in zip(found, expected)))
    if isinstance(found, bool) or not isinstance(found, (int, float)):
        return False
    if isinstance(expected, float):
        return abs(found - expected) <= 1e-6 * max(abs(expected), 1e-30) or abs(found - expected) < 1e-12
    return found == expected


def _short(v: Any) -> str:
    s = repr(v) if not isinstance(v, str) else v
    return s if len(s) <= 60 else s[:57] + "..."


def validate(info: GGUFInfo) -> list[Mismatch]:
    """Every difference from the DS4 layout: metadata keys (§A, main files only) and tensors (§B / §C)."""
    out: list[Mismatch] = []
    if info.kind == "other":
        return [Mismatch("(file)", "a DS4 main or MTP GGUF", "no blk.* / mtp.* tensors")]
    if info.kind == "main":
        arch = info.metadata.get("general.architecture")
        if arch != ARCH:
            out.append(Mismatch("general.architecture", ARCH, _short(arch) if arch is not None else "missing"))
        for key, exp in EXPECTED_METADATA.items():
            full = f"{ARCH}.{key}"
            if full not in info.metadata:
                out.append(Mismatch(full, _short(exp), "missing"))
            elif not _value_matches(info.metadata[full], exp):
                out.append(Mismatch(full, _short(exp), _short(info.metadata[full])))
        for key in ZERO_OR_ABSENT:
            full = f"{ARCH}.{key}"
            if full in info.metadata and info.metadata[full] != 0:
                out.append(Mismatch(full, "0 or absent", _short(info.metadata[full])))
    expected = expected_layout(info.kind, info.variant or "q2")
    have = {t.name: t for t in info.tensors}
    for name, e in expected.items():
        t = have.get(name)
        if t is None:
            if e.required:
                out.append(Mismatch(name, f"{_types_str(e.types)} {_dims_str(e.dims)}", "missing"))
            continue
        if t.dims != e.dims:
            out.append(Mismatch(name, f"dims {_dims_str(e.dims)}", f"dims {_dims_str(t.dims)}"))
        if t.type not in e.types:
            out.append(Mismatch(name, f"type {_types_str(e.types)}", f"type {t.type_name}"))
    if info.kind == "main":  # the MTP file may carry tensors DS4 does not bind; the main layout is exact
        for t in info.tensors:
            if t.name not in expected:
                out.append(Mismatch(t.name, "absent", f"{t.type_name} {_dims_str(t.dims)}"))
    return out


# ---- grouping ----------------------------------------------------------------------------------------------
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


def _ranges(layers: list[int]) -> str:
    if not layers:
        return ""
    if len(layers) > 2:
        step = layers[1] - layers[0]
        if step > 0 and all(b - a == step for a, b in zip(layers, layers[1:])):
            return f"{layers[0]}-{layers[-1]}" + (f"/{step}" if step > 1 else "")
    parts, start, prev = [], layers[0], layers[0]
    for x in layers[1:] + [None]:  # type: ignore[list-item]
        if x is not None and x == prev + 1:
            prev = x
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if x is not None:
            start = prev = x
    return ",".join(parts)


def group_tensors(tensors: Sequence[Tensor]) -> list[TensorGroup]:
    """Fold per-layer tensors into patterns (blk.*.attn_q_a.weight x43), in first-seen order."""
    order: list[str] = []
    acc: dict[str, dict[str, Any]] = {}
    for t in tensors:
        m = _LAYER_RE.match(t.name)
        pattern, layer = (f"blk.*.{m.group(2)}", int(m.group(1))) if m else (t.name, None)
        g = acc.get(pattern)
        if g is None:
            g = acc[pattern] = {"count": 0, "layers": [], "dims": [], "types": [], "nbytes": 0}
            order.append(pattern)
        g["count"] += 1
        g["nbytes"] += t.nbytes
        if layer is not None:
            g["layers"].append(layer)
        d = _dims_str(t.dims)
        if d not in g["dims"]:
            g["dims"].append(d)
        if t.type_name not in g["types"]:
            g["types"].append(t.type_name)
    return [TensorGroup(p, acc[p]["count"], _ranges(sorted(acc[p]["layers"])), acc[p]["dims"], acc[p]["types"],
                        acc[p]["nbytes"]) for p in order]


# ---- bytes per token (facts §G) ----------------------------------------------------------------------------
_ROUTED = ("ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight")
_INDEXER_QUERY = ("indexer.attn_q_b.weight", "indexer.proj.weight")


def bytes_per_token(tensors: Sequence[Tensor], ctx: int, *, n_expert_used: int = N_USED, kv_bytes: int = 4,
                    window: int = WINDOW, top_k: int = IDX_TOPK) -> BytesPerToken:
    """Bytes one decode step reads at context `ctx`, from the tensor table alone (facts §G method).

    Every non-expert weight is read once per token, except the embedding and tid2eid (one row each) and the
    indexer's query projections, which are idle while a layer's compressed rows fit in top_k (all visible).
    Routed experts: n_expert_used of each layer's expert-major 3-D tensors. KV (kv_bytes per value, ds4: f32):
    the raw window, the compressed rows attended (top_k of them in indexer layers, all in the others) and, in
    indexer layers, every compressed indexer key.
    """
    if ctx < 0:
        raise ValueError("ctx must be >= 0")
    by_layer: dict[int, dict[str, Tensor]] = {}
    layers = head = routed = 0
    for t in tensors:
        m = _LAYER_RE.match(t.name)
        if m is None:
            if t.name == "token_embd.weight":
                head += t.nbytes // max(1, t.dims[-1])  # one row
            else:
                head += t.nbytes
            continue
        by_layer.setdefault(int(m.group(1)), {})[m.group(2)] = t

    kv = 0
    any_indexer_active = False
    for L, ts in sorted(by_layer.items()):
        ape = ts.get("attn_compressor_ape.weight")
        ratio = ape.dims[1] if ape is not None and len(ape.dims) > 1 else 0
        has_indexer = "indexer_compressor_norm.weight" in ts
        comp_rows = ctx // ratio if ratio else 0
        indexer_active = has_indexer and comp_rows > top_k
        any_indexer_active |= indexer_active
        for short, t in ts.items():
            if short in _ROUTED:
                n_exp = t.dims[-1] if len(t.dims) == 3 else 1
                routed += t.nbytes // n_exp * min(n_expert_used, n_exp)
            elif short == "ffn_gate_tid2eid.weight":
                layers += t.nbytes // max(1, t.dims[-1])  # one token's row
            elif short in _INDEXER_QUERY and not indexer_active:
                continue
            else:
                layers += t.nbytes
        kv_t = ts.get("attn_kv.weight")
        if kv_t is None or len(kv_t.dims) < 2:
            continue  # no attention in this layer's table: nothing cached to read
        head_dim = kv_t.dims[1]
        rows = min(ctx, window)
        if ratio:
            rows += min(comp_rows, top_k) if has_indexer else comp_rows
        kv += rows * head_dim * kv_bytes
        if indexer_active:
            idx_dim = ts["indexer_compressor_norm.weight"].dims[0]
            kv += comp_rows * idx_dim * kv_bytes
    return BytesPerToken(ctx=ctx, layers=layers, head=head, routed=routed, kv=kv,
                         indexer_active=any_indexer_active, kv_bytes=kv_bytes)
