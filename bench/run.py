"""`tunesmith bench`: tunesmith and its peer (TRL SFTTrainer + PEFT) side by side, in one invocation.

Every engine runs in its own process (so peak RSS is its own) on the same model, LoRA config, token
batches, sequence length, batch size, dtype (fp32) and step count. The fp32 matmul peak is measured in
the same run, because this machine is shared and noisy: only ratios within one run mean anything.

    python bench/run.py [--scenario fixed512] [--steps 10] [--output bench/results.json]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = "smollm2-135m-instruct"


def matmul_peak_gflops(size: int = 2048, repeats: int = 5) -> float:
    """Best fp32 GEMM rate of this process's threads: the ceiling MFU is measured against."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e9


def fixed_length_rows(count: int, seq: int, vocab: int, seed: int = 0) -> list[dict]:
    """Scenario (b): sequences of exactly `seq` tokens; the first 20% are prompt (no loss), as in ../shared/bench."""
    rng = random.Random(seed)
    prompt = seq // 5
    return [{"input_ids": [rng.randrange(vocab) for _ in range(seq)], "loss_mask": [0] * prompt + [1] * (seq - prompt)}
            for _ in range(count)]


def useful_flops_per_token(model_dir: Path, seq: int, adapter: str) -> float:
    """Matmul FLOPs a training step must do per token (the MFU numerator).

    Weights: forward 2N, input gradients 2N, weight gradients 2N only when the weights train (full);
    frozen LoRA bases skip them. N counts every matmul weight once (a tied embedding counts as the output
    head). Attention: QK^T and AV over an average causal context of seq/2, forward and two backward matmuls.
    """
    config = json.loads((model_dir / "config.json").read_text())
    hidden, layers, inter = config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    head_dim = config.get("head_dim", hidden // heads)
    per_layer = hidden * head_dim * (heads * 2 + kv_heads * 2) + 3 * hidden * inter
    weights = layers * per_layer + hidden * config["vocab_size"]
    attention_forward = layers * 2 * 2 * (seq / 2) * heads * head_dim
    weight_passes = 6 if adapter == "full" else 4
    return weight_passes * weights + 3 * attention_forward


def run_worker(engine: str, spec_path: Path) -> dict:
    command = [sys.executable, str(HERE / "workers.py"), engine, str(spec_path)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    for line in done.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            return json.loads(line.removeprefix("BENCH_RESULT "))
    return {"engine": engine, "error": (done.stderr or done.stdout).strip().splitlines()[-5:]}


def run_scenario(name: str, engines: list[str], steps: int, seq: int, batch: int, adapter: str, workdir: Path,
                 model: str = DEFAULT_MODEL) -> dict:
    from tunesmith.models import resolve_model

    model_dir = resolve_model(model)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    rows = fixed_length_rows(batch * steps, seq, vocab)
    batches = workdir / f"{name}.jsonl"
    batches.write_text("".join(json.dumps(row) + "\n" for row in rows))
    spec = {"model": model, "adapter": adapter, "seq": seq, "batch": batch, "steps": steps, "warmup": 2,
            "packing": False, "batches": str(batches)}
    spec_path = workdir / f"{name}.json"
    spec_path.write_text(json.dumps(spec))
    peak = matmul_peak_gflops()
    flops = useful_flops_per_token(model_dir, seq, adapter)
    results = [run_worker(engine, spec_path) for engine in engines]
    for result in results:
        if "tokens_per_s" in result:
            result["mfu"] = result["tokens_per_s"] * flops / (peak * 1e9)
    reference = next((r for r in results if r["engine"] == "trl" and "tokens_per_s" in r), None)
    ours = next((r for r in results if r["engine"] == "tunesmith" and "tokens_per_s" in r), None)
    ratios = {}
    if reference and ours:
        ratios = {"speed_vs_trl": ours["tokens_per_s"] / reference["tokens_per_s"],
                  "rss_vs_trl": ours["peak_rss_mb"] / reference["peak_rss_mb"],
                  "first_loss_diff": abs(ours["first_loss"] - reference["first_loss"])}
    return {"scenario": name, "seq": seq, "batch": batch, "steps": steps, "adapter": adapter,
            "matmul_peak_gflops": peak, "useful_gflops_per_token": flops / 1e9, "results": results, "ratios": ratios}


SCENARIOS = {"fixed512": dict(seq=512, batch=4, adapter="lora", engines=["tunesmith", "tunesmith-recompute", "trl"]),
             "fixed512-full": dict(seq=512, batch=4, adapter="full", engines=["tunesmith", "trl"])}


def format_table(report: dict) -> str:
    lines = [f"{report['date']}  {report['machine']}"]
    for scenario in report["scenarios"]:
        lines.append(f"\n{scenario['scenario']}: {scenario['adapter']}, seq {scenario['seq']}, batch {scenario['batch']}, "
                     f"{scenario['steps']} steps; fp32 matmul peak {scenario['matmul_peak_gflops']:.0f} GFLOP/s")
        lines.append(f"{'engine':<20} {'tokens/s':>9} {'peak RSS MB':>12} {'first step s':>13} {'MFU':>6} {'step-1 loss':>12}")
        for r in scenario["results"]:
            if "error" in r:
                lines.append(f"{r['engine']:<20} error: {' | '.join(r['error'])}")
                continue
            lines.append(f"{r['engine']:<20} {r['tokens_per_s']:>9.1f} {r['peak_rss_mb']:>12.0f} "
                         f"{r['time_to_first_step_s']:>13.1f} {r['mfu']:>6.1%} {r['first_loss']:>12.5f}")
        if scenario["ratios"]:
            ratio = scenario["ratios"]
            lines.append(f"tunesmith / trl: {ratio['speed_vs_trl']:.2f}x tokens/s, {ratio['rss_vs_trl']:.0%} of the peak RSS, "
                         f"|step-1 loss difference| {ratio['first_loss_diff']:.2e}")
    return "\n".join(lines)


def write_markdown(report: dict, path: Path) -> None:
    """BENCHMARKS.md: the latest table, with the date, the machine and the command that made it."""
    text = ["# Benchmarks", "", "Regenerated by `tunesmith bench` (bench/run.py) on every run with the default model. "
            "The machine is shared and noisy: compare engines only within one run, by the ratios below.", "",
            f"- date: {report['date']}", f"- machine: {report['machine']}", f"- command: `{report['command']}`", "",
            "```", format_table(report), "```", "",
            "tokens/s counts non-padding tokens over the measured steps (2 warm-up steps excluded); MFU is useful "
            "matmul FLOPs (bench/run.py: useful_flops_per_token) over the fp32 matmul peak measured in the same run; "
            "step-1 loss is the parity check (LoRA starts as the base model, so both engines must agree).", ""]
    path.write_text("\n".join(text), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tunesmith bench")
    parser.add_argument("--scenario", action="append", choices=sorted(SCENARIOS), help="default: fixed512")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--output", type=Path, default=HERE / "results.json")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="any model spec tunesmith accepts")
    parser.add_argument("--engines", help="comma-separated subset, e.g. tunesmith,trl (default: the scenario's)")
    args = parser.parse_args(argv)
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / "tunesmith-bench"
    workdir.mkdir(parents=True, exist_ok=True)
    report = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": f"{os.cpu_count()} CPU cores, torch threads {__import__('torch').get_num_threads()}",
              "command": "python bench/run.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "scenarios": [run_scenario(name, steps=args.steps, workdir=workdir, model=args.model,
                                         **{**SCENARIOS[name], **({"engines": args.engines.split(",")} if args.engines else {})})
                            for name in (args.scenario or ["fixed512"])]}
    print(format_table(report))
    args.output.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.output}")
    if args.model == DEFAULT_MODEL:
        write_markdown(report, HERE.parent / "BENCHMARKS.md")
        print(f"wrote {HERE.parent / 'BENCHMARKS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
