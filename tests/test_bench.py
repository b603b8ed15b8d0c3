"""`tunesmith bench` runs end to end on a tiny model (tunesmith only: the peer is an optional extra)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "run.py"


def test_bench_reports_throughput_memory_mfu_and_losses(tmp_path, tiny_model):
    output = tmp_path / "results.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tunesmith",
            "bench",
            "--model",
            str(tiny_model),
            "--steps",
            "3",
            "--scenario",
            "mixed",
            "--scenario",
            "dpo",
            "--engines",
            "tunesmith",
            "--output",
            str(output),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )  # not the shared tunesmith-bench of a real run
    assert done.returncode == 0, done.stderr
    assert "tunesmith" in done.stdout and "MFU" in done.stdout
    mixed, dpo = json.loads(output.read_text())["scenarios"]
    [result] = mixed["results"]
    assert result["tokens_per_s"] > 0 and result["peak_rss_mb"] > 0 and len(result["losses"]) == 3
    assert 0 < result["mfu"] < 1 and mixed["matmul_peak_gflops"] > 0
    # Real data of very different lengths: short intents, math solutions and dialogues, 8 per step.
    assert mixed["examples"] == 24 and mixed["max_length"] > 4 * mixed["min_length"]
    [pairs] = dpo["results"]  # DPO on the bundled hh-rlhf pairs: policy and reference start equal, so loss log 2
    assert pairs["tokens_per_s"] > 0 and abs(pairs["first_loss"] - 0.6931) < 1e-3 and dpo["examples"] == 12


def test_longest_sequence_ladder_stops_at_the_rss_budget(tmp_path, tiny_model):
    """A worker is killed the moment its RSS passes the budget; the ladder records it and stops."""
    sys.path.insert(0, str(BENCH.parent))
    import run as bench

    report = bench.run_longest(
        "longest", ["tunesmith"], "lora", tmp_path, str(tiny_model), budget_mb=100000, lengths=[64, 128]
    )
    [result] = report["results"]
    assert result["longest"] == 128 and all(trial["fits"] for trial in result["trials"])
    tight = bench.run_longest(
        "longest", ["tunesmith"], "lora", tmp_path, str(tiny_model), budget_mb=50, lengths=[64, 128]
    )
    [result] = tight["results"]
    assert result["longest"] == 0 and result["trials"] == [
        {"length": 64, "fits": False, "peak_rss_mb": None, "error": None}
    ]


def test_a_run_of_some_scenarios_keeps_the_others_marked_with_their_date(tmp_path):
    sys.path.insert(0, str(BENCH.parent))
    from run import format_table, merged_with_earlier

    earlier = {
        "date": "2026-01-01 00:00 UTC",
        "machine": "2 CPU cores",
        "command": "python bench/run.py",
        "scenarios": [{"scenario": "mixed", "skipped": "x"}, {"scenario": "dpo", "skipped": "old"}],
    }
    path = tmp_path / "results.json"
    path.write_text(json.dumps(earlier))
    fresh = {
        "date": "2026-02-02 00:00 UTC",
        "machine": "2 CPU cores",
        "command": "python bench/run.py --scenario dpo",
        "scenarios": [{"scenario": "dpo", "skipped": "new"}],
    }
    merged = merged_with_earlier(fresh, path)
    assert [s["scenario"] for s in merged["scenarios"]] == ["mixed", "dpo"]
    assert merged["scenarios"][1]["skipped"] == "new" and "measured" not in merged["scenarios"][1]
    assert merged["scenarios"][0]["measured"] == "2026-01-01 00:00 UTC (2 CPU cores) by `python bench/run.py`"
    assert "(mixed: kept from the run of 2026-01-01" in format_table(merged)
    path.write_text(json.dumps(merged))  # kept again by a later run: it still names the run that measured it
    again = merged_with_earlier({**fresh, "date": "2026-03-03 00:00 UTC"}, path)
    assert again["scenarios"][0]["measured"].startswith("2026-01-01")


def test_scaling_table_compares_with_one_process_and_replaces_only_its_section(tmp_path):
    sys.path.insert(0, str(BENCH.parent))
    import scaling

    report = {
        "date": "2026-11-23",
        "machine": "x86_64, 2 cores",
        "command": "python bench/scaling.py",
        "steps": 4,
        "config": "examples/banking77-lora.yaml",
        "results": [
            {
                "processes": 1,
                "parallel": "-",
                "threads_each": 2,
                "tokens_per_s": 200.0,
                "peak_rss_mb": 900.0,
                "final_loss": 2.5,
            },
            {
                "processes": 2,
                "parallel": "fsdp",
                "threads_each": 1,
                "tokens_per_s": 150.0,
                "peak_rss_mb": 800.0,
                "final_loss": 2.5,
            },
        ],
    }
    text = scaling.table(report)
    assert "| 2 | fsdp | 1 | 150 | 0.75x | 800 MB | 2.5000 |" in text and "| 1 | - | 2 | 200 | 1.00x |" in text
    doc = tmp_path / "doc.md"
    doc.write_text(f"# title\nbefore\n{scaling.START}\nold table\n{scaling.END}\nafter\n")
    scaling.write_doc(text, doc)
    written = doc.read_text()
    assert "old table" not in written and text in written
    assert written.startswith("# title\nbefore\n") and written.endswith(f"{scaling.END}\nafter\n")


def test_without_its_environment_an_unsloth_engine_is_skipped_with_how_to_install_it(tmp_path, tiny_model, monkeypatch):
    sys.path.insert(0, str(BENCH.parent))
    import run as bench

    monkeypatch.setattr(bench, "UNSLOTH_PYTHON", tmp_path / "absent" / "python")
    report = bench.run_scenario(
        "fixed512", "fixed", ["unsloth"], steps=3, adapter="lora", workdir=tmp_path, model=str(tiny_model), seq=32
    )
    [result] = report["results"]
    assert "skipped" in result and "unsloth-requirements.txt" in result["skipped"] and not report["ratios"]
    assert "unsloth              skipped: no Unsloth environment" in bench.format_table(
        {"date": "2026-12-07", "machine": "test", "scenarios": [report]}
    )


@pytest.mark.skipif(
    not Path(
        os.environ.get("BENCH_UNSLOTH_PYTHON", Path.home() / ".cache/tunesmith-bench/unsloth/bin/python")
    ).exists(),
    reason="Unsloth's environment is not installed (bench/unsloth-requirements.txt; BENCHMARKS.md says how)",
)
@pytest.mark.parametrize("engine", ["unsloth", "unsloth-4bit"])
def test_unsloth_engines_train_the_same_batches_and_start_from_the_same_loss(tmp_path, tiny_model, engine):
    """Unsloth's CPU backend, run from its own environment, trains the spec's batches; LoRA starts as the base
    model, so its first loss is tunesmith's to within bf16 rounding."""
    sys.path.insert(0, str(BENCH.parent))
    import run as bench

    report = bench.run_scenario(
        "fixed512",
        "fixed",
        ["tunesmith", engine],
        steps=3,
        adapter="lora",
        workdir=tmp_path,
        model=str(tiny_model),
        seq=32,
        batch=2,
    )
    ours, peer = report["results"]
    assert "error" not in peer, peer
    assert peer["engine"] == engine and peer["version"] and len(peer["losses"]) == 3 and peer["tokens_per_s"] > 0
    assert abs(peer["first_loss"] - ours["first_loss"]) < 0.05 * ours["first_loss"]
    [ratio] = report["ratios"]
    assert ratio["ours"] == "tunesmith" and ratio["peer"] == engine and ratio["speed"] > 0


def test_the_gpu_check_dry_runs_on_cpu(tmp_path):
    """bench/gpu_check.py stays runnable for the first lent GPU: its CPU dry run (tiny configs) checks every fused op
    in bf16, trains LoRA, QLoRA and full fine-tuning on both families beside the peer, and DDP on one process."""
    output = tmp_path / "gpu_check.md"
    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"
    done = subprocess.run(
        [sys.executable, str(script), "--device", "cpu", "--steps", "3", "--output", str(output)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = output.read_text()
    op_rows = [line for line in report.splitlines() if line.startswith("| ") and line.endswith("| yes |")]
    assert len(op_rows) == 4
    for family in ("llama (tiny)", "qwen3 (tiny)"):
        for method in ("lora", "qlora", "full"):
            assert f"| {family} | {method} | tunesmith |" in report
    assert "DDP, one process: ok" in report
