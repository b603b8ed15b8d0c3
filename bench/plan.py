"""`tunesmith plan` against the runs it plans: predicted peak RSS and step time beside the measured ones.

For each adapter (lora, qlora, full) and micro-batch size (512 and 2,048 tokens) on the default model, SFT on the
bundled banking77 slice packed into rows of that many tokens, one row a step:
* the plan: `tunesmith plan CONFIG --measure` (memory before any compute; time from its 5-step run);
* the run: `tunesmith train CONFIG` for STEPS steps in its own process; its peak RSS (summary.json, ru_maxrss) and
  its mean step time over steps 2 to STEPS (metrics.jsonl).

    python bench/plan.py [--adapters lora,qlora,full] [--tokens 512,2048] [--steps 8] [--dtype float32]
    python bench/plan.py --main-job   # examples/banking77-classify.yaml, whole (150 steps): a long run

A run's measured peak is summary.json's, training's own; each row also has its process's peak, which includes
what follows training (the main job calibrates its classifier).

Also the estimate without --measure (the device's matmul peak at EFFICIENCY). Adds its rows to bench/plan.json and
prints the table docs/plan.md holds. Run it alone: it times steps.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from tunesmith import hardware  # noqa: E402
from tunesmith.train.plan import step_times  # noqa: E402


def config_for(adapter: str, tokens: int, output: Path, steps: int, dtype: str) -> dict:
    return {
        "model": "smollm2-135m-instruct",
        "method": "sft",
        "adapter": {"type": adapter, "r": 16, "alpha": 32, "target": "all-linear"}
        if adapter != "full"
        else {"type": "full"},
        "data": {
            "train": str(ROOT / "data/banking77/train.jsonl"),
            "format": "classification",
            "val_fraction": 0.02,
            "system_prompt": "Name the intent of this banking customer's message.",
            "max_length": tokens,
            "packing": True,
        },
        "train": {
            "batch_size": 1,
            "max_steps": steps,
            "lr": 1e-4,
            "micro_batch_tokens": tokens,
            "eval_every": 1000,
            "save_every": 1000,
            "progress": False,
            "dtype": dtype,
        },
        "output_dir": str(output),
    }


def run(command: list[str]) -> str:
    finished = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if finished.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{finished.stderr[-3000:]}")
    return finished.stdout


def train(command: list[str]) -> float:
    """Run `command`; its process's peak RSS in GiB (what summary.json's misses: the work after training)."""
    with tempfile.TemporaryFile() as errors:
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors, cwd=ROOT)
        _, status, usage = os.wait4(child.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            errors.seek(0)
            raise SystemExit(f"{' '.join(command)} failed:\n{errors.read().decode()[-3000:]}")
    return usage.ru_maxrss / 2**20


def gib(text: str, label: str) -> float:
    found = re.search(rf"{label}\s+([\d,.]+) GiB", text)
    return float(found.group(1).replace(",", "")) if found else float("nan")


def measure(name: str, path: Path, output: Path, overrides: list[str]) -> dict:
    """Plan `path` (with and without --measure), then train it in its own process; one row of the table."""
    estimated = run([sys.executable, "-m", "tunesmith", "plan", str(path), *overrides])
    planned = run([sys.executable, "-m", "tunesmith", "plan", str(path), "--measure", *overrides])
    process_peak = train([sys.executable, "-m", "tunesmith", "train", str(path), *overrides])
    summary = json.loads((output / "summary.json").read_text())
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    seconds = [seconds for _, seconds in step_times(records)]
    row = {
        "config": name,
        "steps": summary["steps"],
        "predicted_peak_gib": float(re.search(r"peak of CPU RAM: ([\d.]+) GiB", planned).group(1)),
        "phase": re.search(r"peak \(([^)]+)\)", planned).group(1),
        "measured_peak_gib": summary["peak_rss_mb"] / 1024,
        "process_peak_gib": process_peak,
        "predicted_step_s": float(re.search(r"time: ([\d.,]+) s per step", planned).group(1)),
        "peak_estimate_step_s": float(re.search(r"time: ([\d.,]+) s per step", estimated).group(1)),
        "measured_step_s": sum(seconds) / len(seconds),
        "plan": planned,
    }
    print(name, {k: v for k, v in row.items() if k != "plan"}, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", default="lora,qlora,full")
    parser.add_argument("--tokens", default="512,2048")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--dtype", default="auto", help="train.dtype of every run (auto, float32, bfloat16)")
    parser.add_argument("--main-job", action="store_true", help="plan and run the main job whole instead")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="tunesmith-bench-plan-") as scratch:
        if args.main_job:
            output = Path(scratch) / "main-job"
            rows.append(
                measure("main-job", ROOT / "examples/banking77-classify.yaml", output, [f"output_dir={output}"])
            )
        else:
            for adapter in args.adapters.split(","):
                for tokens in [int(value) for value in args.tokens.split(",")]:
                    name = f"{adapter}-{tokens}" + ("" if args.dtype == "auto" else f"-{args.dtype}")
                    path = Path(scratch) / f"{name}.yaml"
                    output = Path(scratch) / name
                    path.write_text(yaml.safe_dump(config_for(adapter, tokens, output, args.steps, args.dtype)))
                    rows.append(measure(name, path, output, []))
    for row in rows:
        row["peak_error"] = row["predicted_peak_gib"] / row["measured_peak_gib"] - 1
        row["step_error"] = row["predicted_step_s"] / row["measured_step_s"] - 1
    header = (
        "| run | steps | predicted peak RSS | measured | error | peak in | whole process | step time, --measure "
        "| measured | error | from the device's peak | error |"
    )
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['config']} | {row['steps']} | {row['predicted_peak_gib']:.2f} GiB | "
            f"{row['measured_peak_gib']:.2f} GiB | {row['peak_error']:+.1%} | {row['phase']} | "
            f"{row['process_peak_gib']:.2f} GiB | {row['predicted_step_s']:.2f} s | "
            f"{row['measured_step_s']:.2f} s | {row['step_error']:+.1%} | {row['peak_estimate_step_s']:.2f} s | "
            f"{row['peak_estimate_step_s'] / row['measured_step_s'] - 1:+.1%} |"
        )
    table = "\n".join(lines)
    print(f"{hardware.describe()}\n{table}")
    results = ROOT / "bench" / "plan.json"  # rows of earlier runs stay unless this one measured them again
    kept = json.loads(results.read_text())["rows"] if results.exists() else []
    measured = {row["config"] for row in rows}
    rows = [row for row in kept if row["config"] not in measured] + rows
    results.write_text(json.dumps({"cpu": hardware.describe(), "steps": args.steps, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
