"""The DeepSeek-V4 tokenizer, built from a GGUF's metadata (ds4-model-facts.md §E).

A GGUF carries the byte-level BPE as two string arrays: `tokenizer.ggml.tokens` (index = id) and
`tokenizer.ggml.merges` ("left right", rank = index). We hand both to the Rust `tokenizers` library together with
the DS4 pre-tokenizer (three isolating regex splits, then the GPT-2 byte-to-unicode mapping), so the splitting and
merging are the library's, not ours.

Added ("special") tokens are every token BPE cannot produce: not one of the 256 byte symbols and not the result of
any merge (plus, when the file has `tokenizer.ggml.token_type`, the control / user-defined ones). They are matched by
string in the input text and never split.

Decoding works on bytes: each token maps to the bytes it stands for, and `StreamDecoder` turns a stream of ids into
text without ever emitting half a UTF-8 character.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import AddedToken, Regex
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from ..errors import UserError

# The DS4 pre-tokenizer, in order (each split keeps the matches as their own pieces):
#  1. digits in runs of at most three;
#  2. runs of CJK ideographs, hiragana and katakana;
#  3. one ASCII punctuation + ASCII letters | an optional non-letter/punct/symbol + letters/marks |
#     an optional space + punctuation/symbols + trailing CR/LF | whitespace up to its last newline |
#     whitespace not followed by a non-space (a run before a word leaves its last space to the word) | whitespace.
PRE_TOKENIZER_PATTERNS = (
    r"\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
)

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK = "<think>"
END_THINK = "</think>"
DSML = "｜DSML｜"
# ds4 refuses a model whose vocabulary lacks any of these.
REQUIRED_SPECIALS = (BOS, EOS, USER, ASSISTANT, THINK, END_THINK, DSML)

# llama.cpp's tokenizer.ggml.token_type values for added tokens.
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """The GPT-2 byte-level table: printable bytes stand for themselves, the rest shift to U+0100 and up."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {b: chr(b) for b in keep}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


@lru_cache(maxsize=1)
def unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in byte_to_unicode().items()}


@dataclass(frozen=True)
class Vocab:
    """What a GGUF stores about the tokenizer (tokens by id, merges by rank, optional token types)."""

    tokens: list[str]
    merges: list[str]
    token_types: list[int] | None = None


_GGUF_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # value type -> bytes
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_VOCAB_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type")


def read_gguf_metadata(path: str | Path, keys: Sequence[str]) -> dict:
    """The values of `keys` from a GGUF's metadata section (strings, string arrays, integer arrays, scalars).

    The gguf package's GGUFReader parses every field and tensor into numpy views first (about 10 s for the
    129k-token vocabulary here), so this walks only the key/value section, bounds-checking every read."""
    import mmap
    import struct

    path = Path(path)
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            size = len(mm)
            pos = 0

            def take(n: int) -> bytes:
                nonlocal pos
                if n < 0 or pos + n > size:
                    raise ValueError(f"truncated metadata at byte {pos}")
                pos += n
                return mm[pos - n:pos]

            def u32() -> int:
                return struct.unpack_from("<I", take(4))[0]

            def u64() -> int:
                return struct.unpack_from("<Q", take(8))[0]

            def string() -> str:
                return str(take(u64()), "utf-8")

            if bytes(take(4)) != b"GGUF":
                raise ValueError("not a GGUF file (bad magic)")
            version = u32()
            if version != 3:
                raise ValueError(f"GGUF version {version} (only 3 is supported)")
            u64()  # tensor count
            n_kv = u64()
            fmt = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
            out = {}
            for _ in range(n_kv):
                key = string()
                vtype = u32()
                want = key in keys
                if vtype == _GGUF_STRING:
                    value = string()
                elif vtype in _GGUF_SCALAR:
                    value = struct.unpack_from(fmt[vtype], take(_GGUF_SCALAR[vtype]))[0]
                elif vtype == _GGUF_ARRAY:
                    etype, count = u32(), u64()
                    if etype == _GGUF_STRING:
                        if want:
                            value = [string() for _ in range(count)]
                        else:
                            for _ in range(count):
                                n = u64()
                                if pos + n > size:
                                    raise ValueError(f"truncated metadata at byte {pos}")
                                pos += n
                    elif etype in _GGUF_SCALAR:
                        raw = take(_GGUF_SCALAR[etype] * count)
                        value = list(struct.unpack_from(f"<{count}{fmt[etype][1]}", raw)) if want else None
                    else:
                        raise ValueError(f"metadata key {key!r} is an array of unknown type {etype}")
                else:
                    raise ValueError(f"metadata key {key!r} has unknown type {vtype}")
                if want:
                    out[key] = value
                    if len(out) == len(set(keys)):
                        break
            return out
    except (OSError, ValueError, UnicodeDecodeError, struct.error) as exc:
        raise UserError(f"cannot read the tokenizer from {path}: {exc}", "check that the file is a complete GGUF")


def read_gguf_vocab(path: str | Path) -> Vocab:
    """Read tokens/merges (and token_type when present) from a GGUF file's metadata."""
    meta = read_gguf_metadata(path, _VOCAB_KEYS)
    tokens, merges = meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise UserError(f"{path} has no tokenizer (tokenizer.ggml.tokens / tokenizer.ggml.merges missing)",
                        "use a DeepSeek-V4 GGUF that embeds its tokenizer")
    types = meta.get("tokenizer.ggml.token_type")
    return Vocab(list(tokens), list(merges), [int(t) for t in types] if types else None)


class Tokenizer:
    """Encode text to DS4 token ids and back. Build with `from_gguf` or `from_vocab`."""

    def __init__(self, vocab: Vocab):
        tokens = vocab.tokens
        self.tokens = tokens
        self.n_vocab = len(tokens)
        self._id = {t: i for i, t in enumerate(tokens)}
        pairs = []
        for rank, m in enumerate(vocab.merges):
            left, sep, right = m.partition(" ")
            if not sep or not left or not right:
                raise UserError(f"tokenizer merge #{rank} {m!r} is not 'left right'", "the GGUF tokenizer is corrupt")
            pairs.append((left, right))

        alphabet = set(byte_to_unicode().values())
        produced = alphabet | {a + b for a, b in pairs}
        added = {i for i, t in enumerate(tokens) if t not in produced}
        if vocab.token_types is not None and len(vocab.token_types) == len(tokens):
            # Files differ in how they type non-special added tokens (<｜User｜> is "normal" in some), so the
            # types only add to what vocab + merges already tell.
            added |= {i for i, t in enumerate(vocab.token_types) if t in (_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED)}
        self.added_ids = frozenset(added)

        # Bytes each token stands for: added tokens are their UTF-8 text; BPE tokens map back through the table.
        u2b = unicode_to_byte()
        self._bytes: list[bytes] = []
        for i, t in enumerate(tokens):
            if i in self.added_ids or any(c not in u2b for c in t):
                self._bytes.append(t.encode("utf-8"))
            else:
                self._bytes.append(bytes(u2b[c] for c in t))

        # Merges whose parts or result are not in the vocabulary cannot fire (a sub-vocabulary may drop them);
        # their words then stay split, down to single bytes, as in ds4.
        # Added tokens stay in the model's vocabulary so the library keeps their GGUF ids.
        bpe_vocab = dict(self._id)
        pairs = [(a, b) for a, b in pairs if a in bpe_vocab and b in bpe_vocab and a + b in bpe_vocab]
        missing = [c for c in alphabet if c not in bpe_vocab]
        if missing:
            raise UserError(f"tokenizer lacks {len(missing)} of the 256 byte tokens", "the GGUF tokenizer is corrupt")
        tk = _HFTokenizer(models.BPE(vocab=bpe_vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(p), behavior="isolated", invert=False) for p in PRE_TOKENIZER_PATTERNS]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        tk.decoder = decoders.ByteLevel()
        # Added tokens keep their GGUF ids: the model already knows them, so adding them reuses those ids.
        tk.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in sorted(self.added_ids)])
        for i in self.added_ids:
            got = tk.token_to_id(tokens[i])
            if got != i:
                raise UserError(f"tokenizer token {tokens[i]!r} is duplicated (ids {i} and {got})",
                                "the GGUF tokenizer is corrupt")
        self._tk = tk

        self.bos_id = self._id.get(BOS)
        self.eos_id = self._id.get(EOS)
        self.think_id = self._id.get(THINK)
        self.end_think_id = self._id.get(END_THINK)

    # ---- construction -----------------------------------------------------------------------------
    @classmethod
    def from_vocab(cls, tokens: Sequence[str], merges: Sequence[str],
                   token_types: Sequence[int] | None = None) -> "Tokenizer":
        return cls(Vocab(list(tokens), list(merges), list(token_types) if token_types is not None else None))

    @classmethod
    def from_gguf(cls, path: str | Path) -> "Tokenizer":
        return cls(read_gguf_vocab(path))

    # ---- lookups ----------------------------------------------------------------------------------
    def token_id(self, token: str) -> int | None:
        return self._id.get(token)

    def missing_specials(self) -> list[str]:
        return [s for s in REQUIRED_SPECIALS if s not in self._id]

    def token_bytes(self, token_id: int) -> bytes:
        return self._bytes[token_id]

    def is_special(self, token_id: int) -> bool:
        return token_id in self.added_ids

    # ---- encode / decode --------------------------------------------------------------------------
    def encode(self, text: str, special: bool = True) -> list[int]:
        """Token ids of `text`. With special=True (default) added tokens written in the text become their ids;
        with special=False they are encoded as ordinary text."""
        if special:
            return self._tk.encode(text, add_special_tokens=False).ids
        # The library always matches added tokens in encode(); for plain text run its pre-tokenizer and BPE
        # model directly, which know nothing about them.
        model = self._tk.model
        return [t.id for piece, _ in self._tk.pre_tokenizer.pre_tokenize_str(text) for t in model.tokenize(piece)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        table = self._bytes
        return b"".join(table[i] for i in ids)

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)


class StreamDecoder:
    """Ids in, text out, one token at a time; a character split across tokens is emitted once it is complete."""

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self._tok.token_bytes(token_id))

    def flush(self) -> str:
        """Whatever is left (an unfinished character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)
