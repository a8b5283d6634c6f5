"""The downloader against a real HTTP fake hub on 127.0.0.1 (in-process; see test_download_cli.py for processes)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from fakehub import FakeHub

from spark_setup import catalog
from spark_setup import download as dl
from spark_setup.errors import UserError
from spark_setup.settings import load_settings

REPO = catalog.REPO
BASE = catalog.VARIANTS["q2-imatrix"].file
MTP = catalog.VARIANTS["mtp"].file
MiB = 1024 * 1024


def blob(n: int, seed: int) -> bytes:
    return hashlib.shake_256(seed.to_bytes(4, "little")).digest(n)


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@pytest.fixture
def hub(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no stored token from the machine
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("SPARK_SETUP_READ_TIMEOUT", "2")
    with FakeHub() as h:
        monkeypatch.setenv("HF_ENDPOINT", h.url)
        yield h


@pytest.fixture
def settings(tmp_path):
    return load_settings({"prefix": tmp_path / "prefix"}, env={}, config_file=tmp_path / "none.toml")


def run(settings, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("connections", 4)
    return dl.download_variant(settings, **kw)


def test_real_hf_client_accepts_the_fake_hub(hub, tmp_path, monkeypatch):
    from huggingface_hub import HfApi, hf_hub_download

    data = blob(300_000, 1)
    commit = hub.add_file(REPO, BASE, data)
    infos = HfApi(endpoint=hub.url).get_paths_info(REPO, [BASE, "missing.txt"], revision="main")
    assert [i.path for i in infos] == [BASE]
    assert infos[0].lfs.sha256 == sha(data) and infos[0].size == len(data)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    got = hf_hub_download(REPO, BASE, revision=commit, local_dir=tmp_path / "hfdl", endpoint=hub.url)
    assert Path(got).read_bytes() == data


def test_first_download_pins_verifies_links_and_reruns_without_network(hub, settings, monkeypatch):
    data = blob(3 * MiB + 17, 2)
    commit = hub.add_file(REPO, BASE, data)
    res = run(settings)
    f = res.files[0]
    assert not res.skipped and f["status"] == "downloaded"
    assert (f["commit"], f["sha256"], f["size"]) == (commit, sha(data), len(data))
    dest = Path(f["path"])
    assert dest.read_bytes() == data and dest.parent == settings.models_dir
    assert not dest.with_name(dest.name + ".part").exists()
    assert not dest.with_name(dest.name + ".part.json").exists()
    pins = json.loads((settings.state_dir / "pins.json").read_text())["pins"]
    assert pins == [pins[0]] and (pins[0]["commit"], pins[0]["sha256"]) == (commit, sha(data))
    link = settings.models_dir / "current.gguf"
    assert link.is_symlink() and os.readlink(link) == BASE
    # Re-run: verified from the record, no hashing, no network (the hub is gone).
    hub.stop()
    monkeypatch.setattr(dl, "hash_file", lambda *a, **k: pytest.fail("re-hashed a verified file"))
    again = run(settings)
    assert again.skipped and again.files[0]["status"] == "verified" and again.files[0]["sha256"] == sha(data)


def test_verify_rehashes_and_a_touched_file_is_rechecked(hub, settings):
    data = blob(MiB, 3)
    hub.add_file(REPO, BASE, data)
    dest = Path(run(settings).files[0]["path"])
    sent = hub.bytes_sent(REPO, BASE)
    res = run(settings, verify=True)
    assert not res.skipped and res.files[0]["status"] == "verified"
    # Flip a byte behind our back: the record no longer matches the file, it is re-hashed, moved aside, re-fetched.
    raw = bytearray(dest.read_bytes())
    raw[10] ^= 1
    dest.write_bytes(bytes(raw))
    res = run(settings)
    assert res.files[0]["status"] == "downloaded" and dest.read_bytes() == data
    assert dest.with_name(dest.name + ".corrupt").read_bytes() == bytes(raw)
    assert hub.bytes_sent(REPO, BASE) == sent + len(data)


def test_base_and_mtp_and_the_token_never_reaches_the_cdn(hub, settings):
    a, b = blob(2 * MiB, 4), blob(MiB // 2, 5)
    hub.add_file(REPO, BASE, a, gated=True)
    hub.add_file(REPO, MTP, b)
    res = run(settings, with_mtp=True, token=hub.token)
    assert [f["label"] for f in res.files] == ["q2-imatrix", "mtp"]
    assert [Path(f["path"]).read_bytes() for f in res.files] == [a, b]
    assert hub.auth_on_cdn == []
    assert any(r["port"] == int(hub.cdn_url.rsplit(":", 1)[1]) for r in hub.requests)


@pytest.mark.parametrize("fault", ["drop", "5xx", "stall", "no-range", "no-cdn", "expired-cdn-url"])
def test_faults_are_survived(hub, settings, monkeypatch, fault):
    data = blob(2 * MiB + 5, 6)
    if fault == "drop":
        hub.drop_after, hub.drop_times = 100_000, 12
    elif fault == "5xx":
        hub.fail_status = [500, 503, 502, 500]
    elif fault == "stall":
        monkeypatch.setenv("SPARK_SETUP_READ_TIMEOUT", "0.5")
        hub.stall, hub.stall_times = (50_000, 3.0), 1
    elif fault == "no-range":
        hub.ignore_range = True
    elif fault == "no-cdn":
        hub.use_cdn = False
    elif fault == "expired-cdn-url":
        hub.cdn_ttl = -1  # every signed URL handed out is already expired...
    hub.add_file(REPO, BASE, data)
    if fault == "expired-cdn-url":
        dl_head = dl.head

        def head_then_fix(*a, **k):  # ...until the downloader re-resolves (a fresh HEAD) after the 403
            r = dl_head(*a, **k)
            hub.cdn_ttl = 3600
            return r

        monkeypatch.setattr(dl, "head", head_then_fix)
    res = run(settings)
    assert Path(res.files[0]["path"]).read_bytes() == data
    if fault == "no-range":
        assert all(r["range"] for r in hub.requests)  # we always ask for ranges; the server ignored them


def test_wrong_bytes_are_refused_and_kept_aside(hub, settings):
    data = blob(MiB + 3, 7)
    hub.add_file(REPO, BASE, data)
    hub.corrupt.add((REPO, BASE))
    with pytest.raises(UserError, match="SHA-256") as ei:
        run(settings)
    dest = settings.models_dir / BASE
    assert not dest.exists() and not (settings.models_dir / "current.gguf").exists()
    kept = dest.with_name(dest.name + ".corrupt")
    assert kept.stat().st_size == len(data) and kept.read_bytes() != data
    assert "kept" in ei.value.message and str(kept) in ei.value.message
    hub.corrupt.clear()
    assert Path(run(settings).files[0]["path"]).read_bytes() == data


def test_gated_without_token_says_how_to_set_one(hub, settings):
    hub.add_file(REPO, BASE, blob(1000, 8), gated=True)
    with pytest.raises(UserError) as ei:
        run(settings)
    assert "token" in ei.value.message and "HF_TOKEN" in ei.value.hint and "--token" in ei.value.hint
    with pytest.raises(UserError, match="refused .* with the token given"):
        run(settings, token="hf_wrong")


def test_404s_name_the_file_and_revision(hub, settings):
    hub.add_file(REPO, "other.gguf", blob(1000, 9))
    with pytest.raises(UserError) as ei:
        run(settings)
    assert BASE in ei.value.message and "'main'" in ei.value.message
    hub.add_file(REPO, BASE, blob(1000, 9))
    with pytest.raises(UserError, match="revision 'v9' not found"):
        run(settings, revision="v9")
    with pytest.raises(UserError, match="repository nobody/none not found"):
        dl.download_file(settings, "nobody/none", "x.gguf", progress=False)


def test_file_replaced_upstream_is_refused_and_the_good_copy_kept(hub, settings):
    old, new = blob(MiB, 10), blob(MiB, 11)
    hub.add_file(REPO, BASE, old)
    dest = Path(run(settings).files[0]["path"])
    hub.add_file(REPO, BASE, new)  # a new commit on main replaces the file under the same name
    assert run(settings).files[0]["status"] == "verified"  # the pin is in force: nothing changes
    with pytest.raises(UserError, match="replaced upstream") as ei:
        run(settings, revision="main")
    assert "--repin" in ei.value.hint and dest.read_bytes() == old
    # History rewritten under the pinned commit itself, local copy gone: refuse before fetching a byte.
    hub.replace_in_place(REPO, BASE, new)
    dest.unlink()
    sent = hub.bytes_sent(REPO, BASE)
    with pytest.raises(UserError, match="replaced upstream"):
        run(settings)
    assert hub.bytes_sent(REPO, BASE) == sent
    # Moving to the new file is an explicit choice.
    res = run(settings, revision="main", repin=True)
    assert dest.read_bytes() == new and res.files[0]["sha256"] == sha(new)


def test_admin_pins_file_is_enforced(hub, settings, tmp_path):
    data = blob(MiB, 12)
    commit = hub.add_file(REPO, BASE, data)
    pins = tmp_path / "pins.json"
    pins.write_text(json.dumps({"pins": [{"repo": REPO, "file": BASE, "commit": commit, "sha256": "0" * 64,
                                          "size": len(data)}]}))
    with pytest.raises(UserError, match="replaced upstream"):
        run(settings, pins_file=pins)
    pins.write_text(json.dumps({"pins": [{"repo": REPO, "file": BASE, "commit": commit, "sha256": sha(data),
                                          "size": len(data)}]}))
    assert run(settings, pins_file=pins).files[0]["sha256"] == sha(data)
    hub.add_file(REPO, BASE, blob(MiB, 99))  # main moves on; the admin's pin stays in force without --pins
    again = run(settings)
    assert again.skipped and again.files[0]["commit"] == commit


def test_offline_uses_only_the_disk(hub, settings, monkeypatch):
    hub.add_file(REPO, BASE, blob(MiB, 13))
    with pytest.raises(UserError, match=f"offline.*{BASE}") as ei:
        run(settings, offline=True)
    assert "without --offline" in ei.value.hint and hub.requests == []
    run(settings)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert run(settings, verify=True).files[0]["status"] == "verified"


def test_disk_precheck_gives_numbers(hub, settings, tmp_path):
    huge = tmp_path / "huge.bin"
    announced = shutil.disk_usage(tmp_path).free + 64 * 1024**3
    with open(huge, "wb") as f:
        f.truncate(announced)  # sparse: announced by the hub, nothing stored
    hub.add_file(REPO, BASE, huge, sha256="e" * 64)
    with pytest.raises(UserError, match=r"not enough disk at .*: [\d.]+ .iB free, [\d.]+ GiB needed") as ei:
        run(settings)
    assert dl.human(announced) in ei.value.message and "--models-dir" in ei.value.hint
    assert not (settings.models_dir / (BASE + ".part")).exists()


def test_a_second_run_on_the_same_file_refuses(hub, settings):
    hub.add_file(REPO, BASE, blob(1000, 14))
    t = dl.variant_targets(settings, "q2-imatrix", False)[0]
    with dl.FileLock(t):
        with pytest.raises(UserError, match=f"another spark-setup download of {BASE} is running \\(pid {os.getpid()}"):
            run(settings)
    assert Path(run(settings).files[0]["path"]).exists()


def test_any_repo_file_including_non_lfs(hub, settings):
    small = b"{\"architectures\": [\"x\"]}\n"
    hub.add_file("someone/drafter", "config.json", small, lfs=False)
    big = blob(MiB // 3, 15)
    hub.add_file("someone/drafter", "sub/draft.gguf", big)
    r1 = dl.download_file(settings, "someone/drafter", "config.json", progress=False)
    r2 = dl.download_file(settings, "someone/drafter", "sub/draft.gguf", progress=False)
    assert Path(r1.files[0]["path"]) == settings.models_dir / "someone--drafter" / "config.json"
    assert Path(r1.files[0]["path"]).read_bytes() == small and r1.files[0]["sha256"] == sha(small)
    assert Path(r2.files[0]["path"]).read_bytes() == big
    # A non-LFS file is verified by its git blob id; a wrong one is refused like a wrong SHA-256.
    hub.corrupt.add(("someone/drafter", "config.json"))
    Path(r1.files[0]["path"]).unlink()
    with pytest.raises(UserError, match="refusing"):
        dl.download_file(settings, "someone/drafter", "config.json", progress=False)


def test_current_link_follows_the_chosen_variant(hub, settings):
    hub.add_file(REPO, BASE, blob(1000, 16))
    q2 = catalog.VARIANTS["q2"].file
    hub.add_file(REPO, q2, blob(1000, 17))
    run(settings)
    run(settings, variant="q2")
    assert os.readlink(settings.models_dir / "current.gguf") == q2
    rows = {r["name"]: r for r in dl.local_status(settings)}
    assert rows["q2"]["current"] and rows["q2"]["state"] == "verified" and rows["q4"]["state"] == "missing"
    assert rows["q2-imatrix"]["pin"]["sha256"] == sha(blob(1000, 16))


def test_resume_from_a_sidecar_refetches_only_missing_ranges(hub, settings, monkeypatch):
    data = blob(4 * MiB, 18)
    hub.add_file(REPO, BASE, data)
    hub.drop_after, hub.drop_times = 0, None  # every body is cut at once: the first attempt gets nothing...
    monkeypatch.setenv("SPARK_SETUP_MAX_RETRIES", "1")
    with pytest.raises(UserError, match="kept failing"):
        run(settings)
    monkeypatch.delenv("SPARK_SETUP_MAX_RETRIES")
    part = settings.models_dir / (BASE + ".part")
    side = json.loads((settings.models_dir / (BASE + ".part.json")).read_text())
    assert part.stat().st_size == len(data) and side["completed"] == [] and side["sha256"] == sha(data)
    # Pretend half the file arrived earlier: write it and record it in the sidecar, then resume.
    half = len(data) // 2 // side["chunk_size"] * side["chunk_size"]
    with open(part, "r+b") as f:
        f.write(data[:half])
    side["completed"] = [[0, half]]
    (settings.models_dir / (BASE + ".part.json")).write_text(json.dumps(side))
    hub.drop_after = None
    sent = hub.bytes_sent(REPO, BASE)
    assert Path(run(settings).files[0]["path"]).read_bytes() == data
    assert hub.bytes_sent(REPO, BASE) - sent == len(data) - half


def test_file_changing_size_between_head_and_get_is_refused(hub, settings, monkeypatch):
    data = blob(MiB, 19)
    hub.add_file(REPO, BASE, data)
    Path(run(settings).files[0]["path"]).unlink()  # pinned; the local copy is gone, so the next run fetches
    real_head = dl.head

    def head_then_swap(*a, **k):
        r = real_head(*a, **k)
        hub.replace_in_place(REPO, BASE, blob(MiB + 4096, 20))  # the upload lands right after our HEAD
        return r

    monkeypatch.setattr(dl, "head", head_then_swap)
    with pytest.raises(UserError, match="changed on the server during the download"):
        run(settings)
    assert not (settings.models_dir / BASE).exists()
    assert (settings.models_dir / (BASE + ".part.json")).exists()  # the partial and its sidecar are kept


def test_unwritable_models_dir_is_a_clear_error(hub, tmp_path):
    hub.add_file(REPO, BASE, blob(1000, 21))
    (tmp_path / "afile").write_text("x")
    s = load_settings({"prefix": tmp_path / "p", "models_dir": tmp_path / "afile" / "models"}, env={},
                      config_file=tmp_path / "none.toml")
    with pytest.raises(UserError, match="cannot write model files to .*afile/models: Not a directory"):
        run(s)
