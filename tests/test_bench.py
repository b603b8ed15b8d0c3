"""`tunesmith bench` runs end to end on a tiny model (tunesmith only: the peer is an optional extra)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "run.py"


def test_bench_reports_throughput_memory_mfu_and_losses(tmp_path, tiny_model):
    output = tmp_path / "results.json"
    done = subprocess.run([sys.executable, "-m", "tunesmith", "bench", "--model", str(tiny_model), "--steps", "3",
                           "--engines", "tunesmith", "--output", str(output)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "tunesmith" in done.stdout and "MFU" in done.stdout
    [scenario] = json.loads(output.read_text())["scenarios"]
    [result] = scenario["results"]
    assert result["tokens_per_s"] > 0 and result["peak_rss_mb"] > 0 and len(result["losses"]) == 3
    assert 0 < result["mfu"] < 1 and scenario["matmul_peak_gflops"] > 0
