"""Scaling: tokens/s and memory of one recipe on 1 process and on N processes (DDP, FSDP), in one run.

    python bench/scaling.py [--config examples/banking77-lora.yaml] [--steps 12] [--nproc 2]

Each setting trains the same config for the same steps from a fresh run directory, through the CLI a user runs
(`tunesmith train`, `tunesmith train --nproc N`). The effective batch is the config's in every setting, so the
runs compute the same updates and the figures compare like with like. The one-process run gets every core as
threads; N processes get cores/N each. Throughput is the median of each run's steps after the first (which
pays for one-time setup); memory is the peak RSS of rank 0 (every rank holds about as much).
Writes bench/scaling.json and the table in docs/distributed.md (between its scaling markers).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC, START, END = ROOT / "docs" / "distributed.md", "<!-- scaling:start -->", "<!-- scaling:end -->"


def train(config: Path, run_dir: Path, steps: int, nproc: int, parallel: str) -> dict:
    cores = os.cpu_count() or 1
    command = [
        sys.executable,
        "-m",
        "tunesmith",
        "train",
        str(config),
        f"output_dir={run_dir}",
        f"train.max_steps={steps}",
        "train.progress=false",
        f"train.save_every={steps}",
        f"train.eval_every={steps}",
        f"train.parallel={parallel}",
    ]
    if nproc > 1:
        command += ["--nproc", str(nproc)]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // nproc))}
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    steps_logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    speeds = [record["tokens_per_s"] for record in steps_logged if "tokens_per_s" in record][1:]
    losses = [record["loss"] for record in steps_logged if "tokens_per_s" in record]
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "processes": nproc,
        "parallel": parallel if nproc > 1 else "-",
        "threads_each": max(1, cores // nproc),
        "tokens_per_s": statistics.median(speeds),
        "peak_rss_mb": summary["peak_rss_mb"],
        "final_loss": losses[-1],
        "wall_s": time.perf_counter() - started,
    }


def table(report: dict) -> str:
    lines = [
        f"Measured {report['date']} on {report['machine']} with `{report['command']}`: {report['config']}, "
        f"{report['steps']} steps of the same effective batch in each setting.",
        "",
        "| processes | parallel | threads each | tokens/s | vs 1 process | peak RSS (rank 0) | final loss |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    single = report["results"][0]["tokens_per_s"]
    for result in report["results"]:
        lines.append(
            f"| {result['processes']} | {result['parallel']} | {result['threads_each']} | "
            f"{result['tokens_per_s']:,.0f} | {result['tokens_per_s'] / single:.2f}x | "
            f"{result['peak_rss_mb']:,.0f} MB | {result['final_loss']:.4f} |"
        )
    return "\n".join(lines)


def write_doc(text: str, path: Path = DOC) -> None:
    """Replace what lies between the scaling markers of `path`; the rest of the page stays as written."""
    doc = path.read_text(encoding="utf-8")
    before, rest = doc.split(START, 1)
    after = rest.split(END, 1)[1]
    path.write_text(f"{before}{START}\n{text}\n{END}{after}", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "examples" / "banking77-lora.yaml")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "scaling.json")
    args = parser.parse_args(argv)
    settings = [(1, "ddp"), (args.nproc, "ddp"), (args.nproc, "fsdp")]
    with tempfile.TemporaryDirectory() as workdir:
        results = []
        for nproc, parallel in settings:
            results.append(train(args.config, Path(workdir) / f"{nproc}-{parallel}", args.steps, nproc, parallel))
            print(json.dumps(results[-1]), flush=True)
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "command": "python bench/scaling.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": str(args.config.resolve().relative_to(ROOT))
        if args.config.resolve().is_relative_to(ROOT)
        else str(args.config),
        "steps": args.steps,
        "results": results,
    }
    args.output.write_text(json.dumps(report, indent=1), encoding="utf-8")
    write_doc(table(report))
    print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
