"""The catalog's facts and the pins format (no network)."""

from __future__ import annotations

import json

import pytest

from spark_setup import catalog
from spark_setup.catalog import Pin, PinStore, read_pins_file
from spark_setup.errors import UsageError

C40, S64 = "a" * 40, "b" * 64


def test_variants_cover_the_published_files():
    assert catalog.DEFAULT_VARIANT == "q2-imatrix"
    assert set(catalog.VARIANTS) == {"q2-imatrix", "q2", "q4-imatrix", "q4", "mtp"}
    for v in catalog.VARIANTS.values():
        assert v.repo == "antirez/deepseek-v4-gguf" and v.file.endswith(".gguf")
    assert catalog.VARIANTS["q2-imatrix"].file.endswith("-chat-v2-imatrix.gguf")
    assert catalog.VARIANTS["q2"].file.endswith("-chat-v2.gguf")
    # Q4 does not fit a 128 GB Spark; Q2 must.
    assert catalog.VARIANTS["q2-imatrix"].memory_gib < 121 < catalog.VARIANTS["q4"].memory_gib


def test_draft_pairing_is_symmetric():
    mtp = catalog.VARIANTS["mtp"]
    assert mtp.kind == "draft"
    for base in catalog.BASES:
        assert "mtp" in catalog.VARIANTS[base].drafts
        assert base in mtp.pairs_with
    assert [v.name for v in catalog.files_for("q2", with_mtp=True)] == ["q2", "mtp"]
    assert [v.name for v in catalog.files_for("q2-imatrix", with_mtp=False)] == ["q2-imatrix"]


def test_bad_variant_choices_are_usage_errors():
    with pytest.raises(UsageError, match="unknown variant 'q3'"):
        catalog.files_for("q3", False)
    with pytest.raises(UsageError, match="draft, not a base"):
        catalog.files_for("mtp", False)


def test_pins_file_round_trip_and_precedence(tmp_path):
    state = tmp_path / "state"
    store = PinStore(state)
    store.record(Pin("o/r", "f.gguf", "main", C40, S64, 123))
    again = PinStore(state)
    assert again.get("o/r", "f.gguf").sha256 == S64 and again.get("o/r", "f.gguf").pinned_at
    admin = tmp_path / "pins.json"
    admin.write_text(json.dumps({"pins": [{"repo": "o/r", "file": "f.gguf", "commit": "c" * 40,
                                           "sha256": "d" * 64, "size": 123}]}))
    forced = PinStore(state, admin)
    assert forced.get("o/r", "f.gguf").commit == "c" * 40
    assert forced.get("o/r", "f.gguf").source == str(admin)


@pytest.mark.parametrize("pin,msg", [
    ({"repo": "o/r", "file": "f", "commit": "xyz", "sha256": S64, "size": 1}, "not 40 hex"),
    ({"repo": "o/r", "file": "f", "commit": C40, "sha256": "12", "size": 1}, "not 64 hex"),
    ({"repo": "o/r", "file": "f", "commit": C40, "size": 1}, "neither sha256 nor git_oid"),
    ({"repo": "o/r", "commit": C40, "sha256": S64, "size": 1}, "needs repo, file"),
])
def test_bad_pins_are_refused_with_the_file_named(tmp_path, pin, msg):
    f = tmp_path / "p.json"
    f.write_text(json.dumps([pin]))
    with pytest.raises(UsageError, match=msg) as ei:
        read_pins_file(f)
    assert str(f) in ei.value.message


def test_unreadable_pins_file(tmp_path):
    f = tmp_path / "p.json"
    f.write_text("{not json")
    with pytest.raises(UsageError, match="not readable JSON"):
        read_pins_file(f)
    with pytest.raises(UsageError, match="does not exist"):
        read_pins_file(tmp_path / "missing.json")
