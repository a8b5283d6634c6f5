"""tools/ncu_src_top.py: the summary of ncu's per-SASS-instruction source page kept in bench/h200 run folders."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[1] / "tools" / "ncu_src_top.py"

# The shape `ncu -i REP --page source --csv --print-source sass` writes (run 69): the kernel's name, a header row,
# then one row per instruction, counts with thousands separators where large.
HDR = ('"Address","Source","Warp Stall Sampling (All Samples)","Warp Stall Sampling (Not-issued Samples)",'
       '"Instructions Executed","stall_long_sb","stall_mio","stall_mio (Not Issued)","stall_wait"')
CSV = "\n".join([
    '"Kernel Name","void matvec6<16, ExpertRows, 12, 1>(T2, int)",',
    HDR,
    '"0x10","      LDS R4, [R2]","30","20","12,288","0","25","20","5"',
    '"0x20","      FMNMX R38, RZ, |R20|, !PT","50","48","1,536","49","0","0","1"',
    '"0x30","@!P0  LDS R5, [R2+0x4]","10","8","12,288","0","10","8","0"',
    '"0x40","      IMMA.16832.S8.S8 R16, R16.ROW, R30.COL, RZ","10","2","4,096","0","0","0","10"',
]) + "\n"


def run(*args):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True)


def test_top_instructions_and_opcode_totals(tmp_path):
    f = tmp_path / "src.csv"
    f.write_text(CSV)
    r = run(f, "--top", "2")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "void matvec6<16, ExpertRows, 12, 1>(T2, int)"
    assert lines[1] == "4 SASS instructions, 100 stall samples"
    top = [l for l in lines if "|" in l and "%" in l]
    assert len(top) == 2  # --top 2
    assert "50.0%" in top[0] and "FMNMX" in top[0] and "long_sb 49, wait 1" in top[0]
    assert "30.0%" in top[1] and "LDS R4" in top[1] and "mio 25, wait 5" in top[1]
    i_ops, i_runs = lines.index("opcode     samples  executed"), lines.index("runs per instruction  instructions  executed  samples")
    ops = {l.split()[0]: l.split()[1:] for l in lines[i_ops + 1:i_runs] if l.strip()}
    # LDS: 40 of 100 samples, 24,576 of 30,208 executions; the predicate does not hide the opcode
    assert ops["LDS"] == ["40.0%", "81.4%"]
    assert ops["IMMA"] == ["10.0%", "13.6%"]
    runs = [l.split() for l in lines[i_runs + 1:]]
    # the two LDS ran 12,288 times each: one group of 2 instructions, 81.4% of executions, 40% of samples, first;
    # then the IMMA's group; --top 2 leaves out the FMNMX's (1,536 runs)
    assert runs == [["12288", "2", "81.4%", "40.0%"], ["4096", "1", "13.6%", "10.0%"]]


def test_not_an_ncu_source_page_is_one_line_error(tmp_path):
    f = tmp_path / "other.csv"
    f.write_text("a,b\n1,2\n")
    r = run(f)
    assert r.returncode != 0
    assert "no 'Address' header row" in r.stderr and "Traceback" not in r.stderr


def test_missing_file_is_one_line_error(tmp_path):
    r = run(tmp_path / "absent.csv")
    assert r.returncode != 0
    assert "cannot read" in r.stderr and "Traceback" not in r.stderr


def test_source_page_without_counters_is_one_line_error(tmp_path):
    f = tmp_path / "src.csv"
    f.write_text('"Kernel Name","k",\n"Address","Source"\n"0x10","      LDS R4, [R2]"\n')
    r = run(f)
    assert r.returncode != 0
    assert "no column 'Warp Stall Sampling (All Samples)'" in r.stderr and "SourceCounters" in r.stderr
    assert "Traceback" not in r.stderr
