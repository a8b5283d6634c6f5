"""Download benchmark: our ranged downloader vs `curl -C -` vs `hf_hub_download`, in one run, same server.

A fake hub (tests/fakehub.py, a separate process on 127.0.0.1) serves one file through its "CDN" port, throttled
per connection (default 50 MB/s, like the Hub's single-stream ceiling). Each client fetches the same file into its
own directory; the result is checked against the SHA-256 and deleted before the next client runs.

    .venv/bin/python bench/download_bench.py --size-gib 4 --rate-mb 50 --connections 8

Needs about 2x the size free in --workdir (the source file + one download at a time).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MiB = 1024**2


def make_source(path: Path, size: int) -> str:
    """Write `size` pseudo-random bytes (a random 64 MiB block, each copy stamped with its index); return SHA-256."""
    block = bytearray(os.urandom(64 * MiB))
    h = hashlib.sha256()
    with open(path, "wb") as f:
        done, i = 0, 0
        while done < size:
            block[:8] = i.to_bytes(8, "little")
            n = min(len(block), size - done)
            view = memoryview(block)[:n]
            f.write(view)
            h.update(view)
            done, i = done + n, i + 1
    return h.hexdigest()


def sha256_file(path: Path) -> tuple[str, float]:
    t = time.monotonic()
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while buf := f.read(8 * MiB):
            h.update(buf)
    return h.hexdigest(), time.monotonic() - t


def timed(cmd: list[str], env: dict, timeout: float) -> tuple[float, subprocess.CompletedProcess]:
    t = time.monotonic()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    return time.monotonic() - t, r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gib", type=float, default=4.0)
    ap.add_argument("--rate-mb", type=float, default=50.0, help="per-connection limit, MB/s (10^6 bytes)")
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/spark-setup-dlbench"))
    ap.add_argument("--skip", action="append", default=[], choices=["ours", "curl", "hf"])
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()

    size = int(args.size_gib * 1024**3)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free
    if free < 2.2 * size:
        sys.exit(f"need {2.2 * size / 1024**3:.1f} GiB free in {work}, have {free / 1024**3:.1f} GiB")
    src = work / "big.bin"
    t = time.monotonic()
    sha = make_source(src, size)
    print(f"source: {size / 1024**3:.2f} GiB in {time.monotonic() - t:.1f} s, sha256 {sha[:16]}…", flush=True)

    url_file = work / "url"
    url_file.unlink(missing_ok=True)
    server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fakehub.py"), "--repo", "bench/big", "--file",
                               str(src), "--sha256", sha, "--rate", str(args.rate_mb * 1e6), "--url-file",
                               str(url_file)], stdout=subprocess.DEVNULL)
    results: dict[str, dict] = {}
    try:
        while not url_file.exists():
            time.sleep(0.1)
        hub = url_file.read_text().strip()
        base_env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "SPARK_SETUP_"))}
        base_env.update(HF_ENDPOINT=hub, HF_HOME=str(work / "hf-home"), HF_HUB_DISABLE_XET="1",
                        SPARK_SETUP_CONFIG=str(work / "none.toml"), SPARK_SETUP_LOG_INTERVAL="5")
        timeout = size / (args.rate_mb * 1e6) * 3 + 120

        def check(path: Path, name: str, wall: float, **extra) -> None:
            got, hash_s = sha256_file(path)
            ok = got == sha
            results[name] = {"wall_s": round(wall, 2), "MB_per_s": round(size / wall / 1e6, 1), "sha_ok": ok,
                             "separate_sha256_s": round(hash_s, 2), **extra}
            print(f"{name}: {wall:.1f} s, {size / wall / 1e6:.0f} MB/s, sha256 {'ok' if ok else 'MISMATCH'} "
                  f"(a separate sha256 pass takes {hash_s:.1f} s) {extra or ''}", flush=True)
            path.unlink()

        if "ours" not in args.skip:
            prefix = work / "ours"
            wall, r = timed([sys.executable, "-m", "spark_setup", "download", "--repo", "bench/big", "--file",
                             "big.bin", "--connections", str(args.connections), "--json"],
                            {**base_env, "SPARK_SETUP_PREFIX": str(prefix)}, timeout)
            if r.returncode != 0:
                sys.exit(f"ours failed: {r.stderr}")
            f = json.loads(r.stdout)["files"][0]
            check(Path(f["path"]), f"ours ({args.connections} connections, verified)", wall,
                  transfer_s=f["transfer_s"], verify_tail_s=f["verify_tail_s"],
                  verify_overhead_pct=round(100 * f["verify_tail_s"] / f["transfer_s"], 1))
            shutil.rmtree(prefix)

        if "curl" not in args.skip:
            out = work / "curl.bin"
            wall, r = timed(["curl", "-sS", "-f", "-L", "-C", "-", "-o", str(out),
                             f"{hub}/bench/big/resolve/main/big.bin"], base_env, timeout)
            if r.returncode != 0:
                sys.exit(f"curl failed: {r.stderr}")
            check(out, "curl -C - (1 connection, no checksum)", wall)

        if "hf" not in args.skip:
            dest = work / "hf"
            code = ("import sys; from huggingface_hub import hf_hub_download; "
                    "print(hf_hub_download('bench/big', 'big.bin', local_dir=sys.argv[1]))")
            wall, r = timed([sys.executable, "-c", code, str(dest)], base_env, timeout)
            if r.returncode != 0:
                sys.exit(f"hf_hub_download failed: {r.stderr[-2000:]}")
            check(Path(r.stdout.strip().splitlines()[-1]), "hf_hub_download (HF_HUB_DISABLE_XET=1, size check only)",
                  wall)
            shutil.rmtree(dest, ignore_errors=True)
    finally:
        server.terminate()
        server.wait()
        src.unlink(missing_ok=True)
    meta = {"size_bytes": size, "rate_MB_per_s_per_connection": args.rate_mb, "connections": args.connections,
            "cpus": os.cpu_count(), "results": results}
    ours = next((v for k, v in results.items() if k.startswith("ours")), None)
    curl = next((v for k, v in results.items() if k.startswith("curl")), None)
    if ours and curl:
        meta["speedup_vs_curl"] = round(curl["wall_s"] / ours["wall_s"], 2)
        print(f"speedup vs curl: {meta['speedup_vs_curl']}x (goal >= 4x); verify overhead "
              f"{ours['verify_overhead_pct']}% (goal <= 10%)")
    if args.json_out:
        args.json_out.write_text(json.dumps(meta, indent=2))
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
