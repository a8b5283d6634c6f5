"""tools/profile_decode.py: the decode-step profile driver (run under ncu on a GPU) and its summary of ncu's CSV."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from spark_setup.demo import demo_model_path

TOOL = Path(__file__).resolve().parents[1] / "tools" / "profile_decode.py"

# What `ncu --csv --log-file` writes: its own lines first, then one row per kernel and metric, values with thousands
# separators in the unit of the row.
CSV = '''==PROF== Connected to process 816 (/usr/bin/python3.12)
==PROF== Disconnected from process 816
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"
"0","816","python3","h","attention_kernel(const float *, int)","1","14","(256, 1, 1)","(64, 1, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","ns","85,000"
"1","816","python3","h","hc_pre_kernel(const float *)","1","14","(1024, 1, 1)","(1, 1, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","us","30.5"
"2","816","python3","h","attention_kernel(const float *, int)","1","14","(256, 1, 1)","(64, 1, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","ns","83,000"
"3","816","python3","h","matvec6<8, 4>(T2, int)","1","14","(128, 1, 1)","(8, 1, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","ns","27,500"
"4","816","python3","h","matvec6<8, 4>(T2, int)","1","14","(128, 1, 1)","(512, 1, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","ns","11,000"
'''


def test_summary_folds_by_kernel_and_grid_in_microseconds(tmp_path):
    f = tmp_path / "k.csv"
    f.write_text(CSV)
    out = subprocess.run([sys.executable, str(TOOL), "--summarize", str(f)], capture_output=True, text=True,
                         check=True).stdout
    assert out.splitlines()[0] == "5 kernels, 237 us of kernel time in the profiled step"
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| `")]
    # largest total first; the two matvec6 grids stay apart (a tiny grid is what the profile is for)
    assert [(r[0], r[1], r[3], r[4]) for r in rows] == [
        ("| `attention_kernel`", "(64, 1, 1)", "2", "168"),
        ("| `hc_pre_kernel`", "(1, 1, 1)", "1", "30"),
        ("| `matvec6<8, 4>`", "(8, 1, 1)", "1", "28"),
        ("| `matvec6<8, 4>`", "(512, 1, 1)", "1", "11"),
    ]
    assert rows[0][5] == "84.0" and rows[0][6] == "70.9% |"


def test_summary_of_a_file_that_is_not_ncus_csv_is_one_line(tmp_path):
    f = tmp_path / "k.csv"
    f.write_text("kernel,us\nattention,85\n")
    r = subprocess.run([sys.executable, str(TOOL), "--summarize", str(f)], capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "is not ncu's CSV" in r.stderr and "--csv --log-file" in r.stderr
    missing = subprocess.run([sys.executable, str(TOOL), "--summarize", str(tmp_path / "none.csv")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr.startswith("error: cannot read")


def test_drives_a_decode_step_on_the_cpu_engine(engine_lib):
    # the same path as under ncu, on the bundled demo model: prefill, timed decode steps, the profiled step
    r = subprocess.run([sys.executable, str(TOOL), str(demo_model_path()), "--lib", str(engine_lib), "--backend",
                        "cpu", "--ctx", "8", "--steps", "3"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "decode at ctx 8:" in r.stderr and "ms/token" in r.stderr
    assert "profiled step:" in r.stderr


def test_drives_a_prefill_step_on_the_cpu_engine(engine_lib):
    r = subprocess.run([sys.executable, str(TOOL), str(demo_model_path()), "--lib", str(engine_lib), "--backend",
                        "cpu", "--ctx", "4", "--steps", "2", "--prefill", "6"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "profiled step:" in r.stderr


AB = Path(__file__).resolve().parents[1] / "tools" / "prefill_ab.py"


def test_prefill_ab_alternates_settings_and_compares_logits(engine_lib):
    """tools/prefill_ab.py on the CPU engine: every setting in every round, in order, the first setting's logits as
    the reference; --no-roundtrip runs; a bad setting is a one-line usage error."""
    base = [sys.executable, str(AB), str(demo_model_path()), "--lib", str(engine_lib), "--backend", "cpu",
            "--tokens", "6"]
    r = subprocess.run(base + ["--rounds", "2", "--config", "a:", "--config", "b:DS4_CPU_THREADS=1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [ln.split()[:3] for ln in lines] == [["round", "0", "a:"], ["round", "0", "b:"], ["round", "1", "a:"],
                                                ["round", "1", "b:"]]
    assert all(ln.endswith("rel diff vs first 0") for ln in lines)  # thread count never changes the result
    off = subprocess.run(base + ["--config", "a:", "--no-roundtrip"], capture_output=True, text=True, timeout=300)
    assert off.returncode == 0 and "finite True" in off.stdout, off.stderr
    bad = subprocess.run(base + ["--config", "noseparator"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "expected NAME:VAR=VALUE" in bad.stderr


def test_bad_counts_are_usage_errors(tmp_path):
    for cmd in ([str(TOOL), "m.gguf", "--steps", "1"], [str(TOOL), "m.gguf", "--prefill", "-1"],
                [str(AB), "m.gguf", "--config", "a:", "--tokens", "0"], [str(AB), "m.gguf", "--config", "a:", "--rounds", "0"]):
        r = subprocess.run([sys.executable] + cmd, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "must be >=" in r.stderr and "Traceback" not in r.stderr, cmd
