"""The VLM profiler's timeline hooks into the runner and the model by name: a refactor of either must not
break it silently (it did once). Its CPU smoke mode runs a shrunk Qwen3-VL through two variants."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_vlm_hostprof_smoke_times_every_phase(tmp_path):
    cmd = [sys.executable, "-m", "bench.vlm_hostprof", "--smoke", "--workloads", "V2", "--repeats", "1",
           "--variants", "base,onewindow", "--tmp", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [ln for ln in done.stdout.splitlines() if " V2 [" in ln]
    assert [re.search(r"\[(\w+)\]", ln).group(1) for ln in lines] == ["base", "onewindow"]
    for ln in lines:
        m = re.search(r"render (\d+) ms, (\d+) steps: pixels wait (\d+) ms, launch (\d+) ms.*tower (\d+) calls", ln)
        assert m, ln
        assert int(m.group(2)) >= 1 and int(m.group(4)) > 0 and int(m.group(5)) >= 1, ln
