"""`tunesmith bench`: tunesmith and its peers (TRL SFTTrainer + PEFT, Unsloth's CPU backend) side by side, in one
invocation.

Every engine runs in its own process (so peak RSS is its own) on the same model, LoRA config, token
batches, sequence length, batch size and step count, each in the dtype it picks on this CPU. The fp32 and bf16
matmul peaks are measured in the same run, because this machine is shared and noisy: only ratios within one run
mean anything.

    python bench/run.py [--scenario mixed] [--steps 8] [--output bench/results.json]

Scenarios: (a) mixed: LoRA SFT on real examples of very different lengths, the peer with its defaults
(padded batches) and its best settings (padding-free); (b) fixed512: LoRA on 512-token sequences;
(c) fixed512-full: full fine-tuning; (d) dpo: LoRA DPO on real preference pairs against TRL's DPOTrainer;
(e) longest: the longest sequence each engine trains within a fixed RSS budget.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from tunesmith.hardware import describe

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = "smollm2-135m-instruct"


def matmul_peak_gflops(size: int = 2048, repeats: int = 10, dtype: str = "float32") -> float:
    """Best GEMM rate of this process's threads in `dtype`: the ceiling an engine computing in it is measured
    against."""
    import torch

    a, b = (torch.randn(size, size).to(getattr(torch, dtype)) for _ in range(2))
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
    return [
        {"input_ids": [rng.randrange(vocab) for _ in range(seq)], "loss_mask": [0] * prompt + [1] * (seq - prompt)}
        for _ in range(count)
    ]


def mixed_rows(model: str, count: int, seq: int, seed: int = 0) -> list[dict]:
    """Scenario (a): real examples of three shapes, shuffled together, each at most `seq` tokens.

    Bundled slices (data/README.md): banking77 intents (short: ~40 tokens with the template), gsm8k worked
    solutions (instruction SFT, ~150-400) and SGD customer-service dialogues (multi-turn, every assistant turn
    trained, ~200-500). Tokenised by tunesmith's own chat tokenizer, so both engines train the same tokens.
    """
    from tunesmith.data.dataset import load_examples
    from tunesmith.data.tokenize import ChatTokenizer
    from tunesmith.models import load_tokenizer

    chat = ChatTokenizer(load_tokenizer(model))
    root = HERE.parent / "data"
    pools = []
    for source in ("banking77/train.jsonl", "gsm8k/sft_train.jsonl", "sgd_dialogues/train.jsonl"):
        tokenized = (chat(example) for example in load_examples(root / source)[: 2 * count])
        pools.append([example for example in tokenized if len(example) <= seq])
    rng = random.Random(seed)
    for pool in pools:
        rng.shuffle(pool)
    mixed = [example for group in itertools.zip_longest(*pools) for example in group if example is not None][:count]
    if len(mixed) < count:
        raise SystemExit(f"only {len(mixed)} examples of at most {seq} tokens for the mixed scenario; {count} needed")
    rng.shuffle(mixed)
    return [{"input_ids": e.input_ids, "loss_mask": [int(m) for m in e.loss_mask]} for e in mixed]


def dpo_rows(model: str, count: int, seq: int) -> list[dict]:
    """Scenario (d): the bundled hh-rlhf harmless pairs whose sides both fit in `seq` tokens, in file order.

    Each row carries the pair as text (for the peer, which tokenises it itself) and as tunesmith tokenises
    it, chosen then rejected; tokens/s counts those tokens for every engine.
    """
    from tunesmith.data.dataset import load_examples
    from tunesmith.data.tokenize import ChatTokenizer
    from tunesmith.models import load_tokenizer

    chat = ChatTokenizer(load_tokenizer(model))
    rows = []
    for example in load_examples(HERE.parent / "data" / "hh_rlhf_harmless" / "train.jsonl"):
        pair = chat(example)
        if max(len(pair.chosen), len(pair.rejected)) > seq:
            continue
        rows.append(
            {
                "prompt": example.messages[:-1],
                "chosen": example.messages[-1]["content"],
                "rejected": example.rejected[-1]["content"],
                "input_ids": pair.chosen.input_ids + pair.rejected.input_ids,  # for the token counts and FLOPs
                "loss_mask": [int(m) for m in pair.chosen.loss_mask + pair.rejected.loss_mask],
                "sides": [
                    {"input_ids": side.input_ids, "loss_mask": [int(m) for m in side.loss_mask]}
                    for side in (pair.chosen, pair.rejected)
                ],
            }
        )
        if len(rows) == count:
            return rows
    raise SystemExit(f"only {len(rows)} pairs of at most {seq} tokens a side for the dpo scenario; {count} needed")


def useful_flops_per_token(model_dir: Path, rows: list[dict], adapter: str, reference_forward: bool = False) -> float:
    """Matmul FLOPs a training step must do per (non-padding) token of `rows`: the MFU numerator.

    Weights: forward 2N, input gradients 2N, weight gradients 2N only when the weights train (full);
    frozen LoRA bases skip them. N counts every matmul weight once; the output head (a tied embedding
    counts as one) only at positions that carry a loss. Attention: QK^T and AV over each example's
    average causal context (length/2), forward and two backward matmuls. DPO adds the reference model's
    forward pass (`reference_forward`).
    """
    config = json.loads((model_dir / "config.json").read_text())
    hidden, layers, inter = config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    head_dim = config.get("head_dim", hidden // heads)
    per_layer = hidden * head_dim * (heads * 2 + kv_heads * 2) + 3 * hidden * inter
    tokens = sum(len(row["input_ids"]) for row in rows)
    loss_share = sum(sum(row["loss_mask"][1:]) for row in rows) / tokens
    weights = layers * per_layer + loss_share * hidden * config["vocab_size"]
    context = sum(len(row["input_ids"]) ** 2 / 2 for row in rows) / tokens  # token-weighted mean causal context
    attention_forward = layers * 2 * 2 * context * heads * head_dim
    weight_passes = (6 if adapter == "full" else 4) + (2 if reference_forward else 0)
    return weight_passes * weights + (4 if reference_forward else 3) * attention_forward


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


# Unsloth pins transformers <= 5.17 and tunesmith needs >= 5.25, so it cannot share tunesmith's environment: its
# engines run in a virtual environment of their own (bench/unsloth-requirements.txt; BENCHMARKS.md says how).
UNSLOTH_PYTHON = Path(
    os.environ.get("BENCH_UNSLOTH_PYTHON", Path.home() / ".cache" / "tunesmith-bench" / "unsloth" / "bin" / "python")
)
UNSLOTH_ENV = {"UNSLOTH_FORCE_CPU": "1", "UNSLOTH_SKIP_TORCHVISION_CHECK": "1", "HF_HUB_OFFLINE": "1"}


def worker_command(engine: str) -> tuple[list[str], dict[str, str]] | str:
    """The interpreter and environment an engine's worker runs with, or why it cannot run here."""
    if not engine.startswith("unsloth"):
        return [sys.executable], {}
    if not UNSLOTH_PYTHON.exists():
        return (
            f"no Unsloth environment at {UNSLOTH_PYTHON}: python -m venv ~/.cache/tunesmith-bench/unsloth && "
            "~/.cache/tunesmith-bench/unsloth/bin/pip install -r bench/unsloth-requirements.txt "
            "(or set BENCH_UNSLOTH_PYTHON)"
        )
    return [str(UNSLOTH_PYTHON)], UNSLOTH_ENV


def run_worker(engine: str, spec_path: Path, rss_limit_mb: float | None = None) -> dict:
    """One engine in its own process; with `rss_limit_mb`, it is killed the moment its RSS passes the limit."""
    interpreter = worker_command(engine)
    if isinstance(interpreter, str):
        return {"engine": engine, "skipped": interpreter}
    python, extra_env = interpreter
    command = [*python, str(HERE / "workers.py"), engine, str(spec_path)]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(
            command, stdout=out, stderr=err, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore", **extra_env}
        )
        over = False
        while process.poll() is None:
            if rss_limit_mb is not None and rss_mb(process.pid) > rss_limit_mb:
                process.kill()
                over = True
            time.sleep(0.05)
        process.wait()
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if over:
        return {"engine": engine, "over_budget": True}
    for line in stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            return json.loads(line.removeprefix("BENCH_RESULT "))
    return {"engine": engine, "error": (stderr or stdout).strip().splitlines()[-5:]}


def ratios(results: list[dict], ours: str, peer: str) -> dict:
    a = next((r for r in results if r["engine"] == ours and "tokens_per_s" in r), None)
    b = next((r for r in results if r["engine"] == peer and "tokens_per_s" in r), None)
    if not (a and b):
        return {}
    return {
        "ours": ours,
        "peer": peer,
        "speed": a["tokens_per_s"] / b["tokens_per_s"],
        "rss": a["peak_rss_mb"] / b["peak_rss_mb"],
        "first_loss_diff": abs(a["first_loss"] - b["first_loss"]),
    }


def run_scenario(
    name: str,
    kind: str,
    engines: list[str],
    steps: int,
    adapter: str,
    workdir: Path,
    model: str = DEFAULT_MODEL,
    seq: int = 512,
    batch: int = 4,
    grad_accum: int = 1,
    peer_best: dict | None = None,
    **options,
) -> dict:
    from tunesmith.models import resolve_model

    if kind == "longest":
        return run_longest(name, engines, adapter, workdir, model, **options)
    model_dir = resolve_model(model)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    count = batch * grad_accum * steps
    rows = (
        {"mixed": mixed_rows, "dpo": dpo_rows}[kind](model, count, seq)
        if kind in ("mixed", "dpo")
        else fixed_length_rows(count, seq, vocab)
    )
    spec_path = write_spec(
        workdir,
        name,
        rows,
        model=model,
        adapter=adapter,
        seq=seq,
        batch=batch,
        grad_accum=grad_accum,
        steps=steps,
        warmup=2,
        peer_best=peer_best or {},
        kind=kind,
    )
    dtypes = ("float32", "bfloat16")
    peaks = {dtype: matmul_peak_gflops(dtype=dtype) for dtype in dtypes}
    sequences = [side for row in rows for side in row["sides"]] if kind == "dpo" else rows
    flops = useful_flops_per_token(model_dir, sequences, adapter, reference_forward=kind == "dpo")
    results = [run_worker(engine, spec_path) for engine in engines]
    # Measured again after the engines, keeping the best: a neighbour's burst during one measurement would
    # otherwise understate the ceiling and flatter every MFU of the scenario.
    peaks = {dtype: max(peaks[dtype], matmul_peak_gflops(dtype=dtype)) for dtype in dtypes}
    for result in results:
        if "tokens_per_s" in result:  # against the peak of the dtype the engine's products run in
            result["mfu"] = result["tokens_per_s"] * flops / (peaks[result.get("dtype", "float32")] * 1e9)
    lengths = [len(row["input_ids"]) for row in rows]
    compared = [
        ratios(results, ours, peer)
        for ours in engines
        if ours.startswith("tunesmith")
        for peer in engines
        if not peer.startswith("tunesmith")
    ]
    return {
        "scenario": name,
        "kind": kind,
        "seq": seq,
        "batch": batch,
        "grad_accum": grad_accum,
        "steps": steps,
        "adapter": adapter,
        "examples": len(rows),
        "mean_length": sum(lengths) / len(lengths),
        "min_length": min(lengths),
        "max_length": max(lengths),
        "matmul_peak_gflops": peaks["float32"],
        "matmul_peak_gflops_bf16": peaks["bfloat16"],
        "useful_gflops_per_token": flops / 1e9,
        "results": results,
        "ratios": [r for r in compared if r],
    }


def write_spec(workdir: Path, name: str, rows: list[dict], **spec) -> Path:
    """The spec a worker reads, with the model's directory resolved (a peer in its own environment has no tunesmith
    to resolve a built-in name)."""
    from tunesmith.models import resolve_model

    batches = workdir / f"{name}.jsonl"
    batches.write_text("".join(json.dumps(row) + "\n" for row in rows))
    spec_path = workdir / f"{name}.json"
    model_dir = str(resolve_model(spec["model"]))
    spec_path.write_text(json.dumps({**spec, "model_dir": model_dir, "batches": str(batches)}))
    return spec_path


def run_longest(
    name: str, engines: list[str], adapter: str, workdir: Path, model: str, budget_mb: int, lengths: list[int]
) -> dict:
    """Scenario (e): the longest single sequence each engine can train one step on within `budget_mb` of RSS.

    Each length runs in a fresh process, killed the moment its RSS passes the budget; the ladder stops at
    the first length that does not fit.
    """
    from tunesmith.models import resolve_model

    vocab = json.loads((resolve_model(model) / "config.json").read_text())["vocab_size"]
    results = []
    for engine in engines:
        trials = []
        for length in lengths:
            spec_path = write_spec(
                workdir,
                f"{name}-{length}",
                fixed_length_rows(1, length, vocab),
                model=model,
                adapter=adapter,
                seq=length,
                batch=1,
                grad_accum=1,
                steps=1,
                warmup=0,
                peer_best={},
            )
            outcome = run_worker(engine, spec_path, rss_limit_mb=budget_mb)
            trials.append(
                {
                    "length": length,
                    "fits": "tokens_per_s" in outcome,
                    "peak_rss_mb": outcome.get("peak_rss_mb"),
                    "error": outcome.get("error"),
                }
            )
            if not trials[-1]["fits"]:
                break
        fitted = [t["length"] for t in trials if t["fits"]]
        results.append({"engine": engine, "longest": max(fitted) if fitted else 0, "trials": trials})
    return {
        "scenario": name,
        "kind": "longest",
        "adapter": adapter,
        "budget_mb": budget_mb,
        "lengths": lengths,
        "results": results,
    }


SCENARIOS = {
    "mixed": dict(
        kind="mixed",
        adapter="lora",
        seq=512,
        batch=4,
        grad_accum=2,
        peer_best={"padding_free": True},
        engines=[
            "tunesmith",
            "tunesmith-qlora",
            "tunesmith-float32",
            "tunesmith-unsplit",
            "tunesmith-selective",
            "tunesmith-compile",
            "trl",
            "trl-best",
            "unsloth",
            "unsloth-4bit",
        ],
    ),
    "fixed512": dict(
        kind="fixed",
        adapter="lora",
        seq=512,
        batch=4,
        engines=[
            "tunesmith",
            "tunesmith-qlora",
            "tunesmith-float32",
            "tunesmith-unsplit",
            "tunesmith-system-malloc",
            "tunesmith-compile",
            "tunesmith-selective",
            "tunesmith-recompute",
            "trl",
            "trl-best",
            "unsloth",
            "unsloth-4bit",
        ],
    ),
    "fixed512-full": dict(
        kind="fixed",
        adapter="full",
        seq=512,
        batch=4,
        engines=["tunesmith", "tunesmith-unsplit", "tunesmith-compile", "trl", "trl-best", "unsloth"],
    ),
    "dpo": dict(kind="dpo", adapter="lora", seq=512, batch=4, engines=["tunesmith", "trl", "trl-best"]),
    "longest": dict(
        kind="longest",
        adapter="lora",
        budget_mb=4096,
        lengths=[1024, 2048, 4096, 8192, 16384],
        engines=["tunesmith-recompute", "tunesmith-selective", "tunesmith", "trl", "trl-best", "unsloth"],
    ),
}
DEFAULT_SCENARIOS = list(SCENARIOS)


def merged_with_earlier(report: dict, path: Path) -> dict:
    """A run of some scenarios keeps the others from the earlier report at `path`, each marked with the date, machine
    and command that measured it, so BENCHMARKS.md always shows every scenario. Ratios compare engines within one
    scenario's run only, so scenarios measured apart stay comparable in what they claim."""
    if not path.is_file():
        return report
    earlier = json.loads(path.read_text())
    fresh = {scenario["scenario"]: scenario for scenario in report["scenarios"]}
    measured = f"{earlier['date']} ({earlier['machine']}) by `{earlier['command']}`"
    kept = {
        scenario["scenario"]: {"measured": measured, **scenario}
        for scenario in earlier["scenarios"]
        if scenario["scenario"] not in fresh
    }
    order = [name for name in SCENARIOS if name in fresh or name in kept]
    return {**report, "scenarios": [fresh.get(name) or kept[name] for name in order]}


def format_table(report: dict) -> str:
    lines = [f"{report['date']}  {report['machine']}"]
    for scenario in report["scenarios"]:
        name = scenario["scenario"]
        if "measured" in scenario:
            lines.append(f"\n({name}: kept from the run of {scenario['measured']})")
        if "skipped" in scenario:
            lines.append(f"\n{name}: skipped: {scenario['skipped']}")
            continue
        if scenario["kind"] == "longest":
            lines.append(
                f"\n{name}: longest sequence trained (one step, batch 1, {scenario['adapter']}) within "
                f"{scenario['budget_mb']} MB of RSS; lengths tried {scenario['lengths']}"
            )
            lines.append(f"{'engine':<20} {'longest':>8}  peak RSS MB per length")
            for r in scenario["results"]:
                if "skipped" in r:
                    lines.append(f"{r['engine']:<20} skipped: {r['skipped']}")
                    continue
                trials = ", ".join(
                    f"{t['length']}: {t['peak_rss_mb']:.0f}"
                    if t["fits"]
                    else f"{t['length']}: {'error' if t['error'] else 'over'}"
                    for t in r["trials"]
                )
                lines.append(f"{r['engine']:<20} {r['longest']:>8}  {trials}")
            continue
        unit = "pairs" if scenario["kind"] == "dpo" else "examples"
        lines.append(
            f"\n{name}: {scenario['adapter']}, {scenario['examples']} {unit} of {scenario['min_length']}-"
            f"{scenario['max_length']} tokens (mean {scenario['mean_length']:.0f}), max length {scenario['seq']}, "
            f"{scenario['batch'] * scenario['grad_accum']} {unit} per step, {scenario['steps']} steps; "
            f"matmul peak fp32 {scenario['matmul_peak_gflops']:.0f} GFLOP/s"
            + (f", bf16 {scenario['matmul_peak_gflops_bf16']:.0f}" if "matmul_peak_gflops_bf16" in scenario else "")
        )
        lines.append(
            f"{'engine':<20} {'dtype':>8} {'tokens/s':>9} {'peak RSS MB':>12} {'first step s':>13} {'MFU':>6} "
            f"{'step-1 loss':>12}"
        )
        for r in scenario["results"]:
            if "error" in r or "skipped" in r:
                why = f"error: {' | '.join(r['error'])}" if "error" in r else f"skipped: {r['skipped']}"
                lines.append(f"{r['engine']:<20} {why}")
                continue
            lines.append(
                f"{r['engine']:<20} {r.get('dtype', 'float32'):>8} {r['tokens_per_s']:>9.1f} {r['peak_rss_mb']:>12.0f} "
                f"{r['time_to_first_step_s']:>13.1f} {r['mfu']:>6.1%} {r['first_loss']:>12.5f}"
            )
        for ratio in scenario["ratios"]:
            lines.append(
                f"{ratio['ours']} / {ratio['peer']}: {ratio['speed']:.2f}x tokens/s, {ratio['rss']:.0%} of the "
                f"peak RSS, |step-1 loss difference| {ratio['first_loss_diff']:.2e}"
            )
    return "\n".join(lines)


# The CPU targets of issue 24 (a machine with native bf16): (scenario, ours, peer, least speed ratio, most RSS ratio);
# a peer of None is the matmul peak of the dtype ours computes in (MFU).
TARGETS = [
    ("fixed512", "tunesmith", "unsloth", 1.5, 1.0),
    ("mixed", "tunesmith", "unsloth", 1.5, 1.0),
    ("fixed512", "tunesmith", "trl", 3.0, None),
    ("mixed", "tunesmith", "trl", 3.0, None),
    ("fixed512", "tunesmith", None, 0.5, None),
    ("mixed", "tunesmith", None, 0.5, None),
    ("fixed512-full", "tunesmith", "unsloth", 1.5, None),
    ("fixed512", "tunesmith-qlora", "unsloth-4bit", 1.3, 1.0),
    ("mixed", "tunesmith-qlora", "unsloth-4bit", 1.3, 1.0),
]


def target_lines(report: dict) -> list[str]:
    """Each target against the figures of one run: the ratio measured, and whether it is met."""
    scenarios = {scenario["scenario"]: scenario for scenario in report["scenarios"]}
    lines = []
    for name, ours, peer, speed, rss in TARGETS:
        results = {r["engine"]: r for r in scenarios.get(name, {}).get("results", []) if "tokens_per_s" in r}
        if peer is None:
            wanted = f"{ours} in {name}: MFU >= {speed:.0%} of its dtype's matmul peak"
        else:
            wanted = f"{ours} / {peer} in {name}: speed >= {speed}x" + (f", RSS <= {rss:.0%}" if rss else "")
        if ours not in results or (peer is not None and peer not in results):
            lines.append(f"- {wanted}: not measured")
            continue
        if peer is None:
            measured, met = f"MFU {results[ours]['mfu']:.0%}", results[ours]["mfu"] >= speed
        else:
            ratio = next(r for r in scenarios[name]["ratios"] if r["ours"] == ours and r["peer"] == peer)
            measured = f"{ratio['speed']:.2f}x, RSS {ratio['rss']:.0%}"
            met = ratio["speed"] >= speed and (rss is None or ratio["rss"] <= rss)
        lines.append(f"- {wanted}: {measured}, {'met' if met else 'NOT met'}")
    return lines


def write_markdown(report: dict, path: Path) -> None:
    """BENCHMARKS.md: the latest table, with the date, the machine and the command that made it."""
    text = [
        "# Benchmarks",
        "",
        "Regenerated by `tunesmith bench` (bench/run.py) on every run with the default model. "
        "The machine is shared and noisy: compare engines only within one run, by the ratios below.",
        "",
        f"- date: {report['date']}",
        f"- machine: {report['machine']}",
        f"- command: `{report['command']}`",
        "",
        "```",
        format_table(report),
        "```",
        "",
        "## Targets on a CPU with native bf16",
        "",
        *target_lines(report),
        "",
        "## How to read it",
        "",
        "- **Scenarios.** (a) `mixed`: LoRA SFT on real examples of very different lengths (bundled banking77 "
        "intents, gsm8k solutions, SGD dialogues), 8 examples per optimizer step. (b) `fixed512`: LoRA on "
        "512-token sequences, 4 per step. (c) `fixed512-full`: full fine-tuning. (d) `dpo`: LoRA DPO (sigmoid loss, "
        "beta 0.1) on the bundled hh-rlhf harmless pairs, 4 pairs per step, against TRL's DPOTrainer; both "
        "compute the reference log-probabilities on every step with the adapter switched off (tunesmith's "
        "`dpo.reference: live`; its default `cached` computes them once before training instead), so tokens/s "
        "counts the chosen and rejected tokens of the same work. (e) `longest`: the longest single sequence each "
        "engine trains one step on, its process "
        "killed the moment its RSS passes the budget.",
        "- **Engines.** `tunesmith`: the path `tunesmith train` runs (packed rows laid out flat with no padding, "
        "a step's examples run in even pieces of at most 1,024 tokens (`train.micro_batch_tokens: auto` on a "
        "CPU; the gradients add up to the same update), fused attention per example or per batch of equal-length "
        "examples, the SwiGLU MLP's tail as one op that keeps gate and up for backward and recomputes the rest, "
        "output head only at loss positions with its gradient computed in a chunked fused "
        "cross-entropy). `tunesmith-unsplit`: with `train.micro_batch_tokens: null`, the step's rows in as many "
        "micro-batches as the peer's gradient accumulation. `tunesmith-compile`: the same as `tunesmith` with "
        "`train.compile: true`. "
        "`tunesmith-recompute`: with `train.gradient_checkpointing: true`; `tunesmith-selective`: with "
        "`train.gradient_checkpointing: selective` (matrix products and attention kept, element-wise ops "
        "recomputed). tunesmith engines run on jemalloc when the "
        "system has it, as `tunesmith train` does (src/tunesmith/allocator.py); `tunesmith-system-malloc` is "
        "`tunesmith` on the C library's malloc, the isolated effect of that choice; TRL runs on the system malloc. "
        "`trl`: TRL's SFTTrainer + PEFT with "
        "its defaults (padded batches, and gradient checkpointing, which SFTConfig turns on by default); "
        "`trl-best`: its fastest settings, `gradient_checkpointing=False`, plus `padding_free=True` where "
        "lengths vary (on fixed-length rows padding-free only adds a (T, T) mask over the flattened batch). Compare "
        "speed with `trl-best`, and memory like for like: `tunesmith-recompute` with `trl`. "
        "`tunesmith-qlora`: `adapter.type: qlora` (4-bit NF4 base). `tunesmith-float32`: `train.dtype: float32`. "
        "`unsloth`: Unsloth's CPU backend "
        "(`unsloth_zoo/cpu`, `UNSLOTH_FORCE_CPU=1`) as its notebooks run it: `FastLanguageModel.from_pretrained` "
        "with its defaults (bf16 where the CPU has it natively, its gradient checkpointing) and "
        "`load_in_4bit=False` (16-bit LoRA), or `full_finetuning=True`, then TRL's SFTTrainer with the defaults "
        "its CPU backend installs (bf16 autocast, fused AdamW, chunked cross-entropy, padded batches); "
        "`unsloth-4bit`: the same with its default `load_in_4bit=True` (QLoRA). Unsloth pins transformers <= 5.17, "
        "below tunesmith's, so it runs from an environment of its own: `python -m venv "
        "~/.cache/tunesmith-bench/unsloth && ~/.cache/tunesmith-bench/unsloth/bin/pip install -r "
        "bench/unsloth-requirements.txt` (or `BENCH_UNSLOTH_PYTHON`); without it its rows say skipped. "
        "tunesmith engines compute in the dtype `tunesmith train` picks (`train.dtype: auto`), TRL in fp32 (its "
        "CPU default). Every engine gets the same model, LoRA config (r 16, alpha 32, all linear "
        "layers), examples per step, order and step count.",
        "- **Figures.** tokens/s counts non-padding tokens over the measured steps (2 warm-up steps excluded, "
        "so compilation shows in the first-step time, not in tokens/s); MFU is useful matmul FLOPs "
        "(bench/run.py: useful_flops_per_token) over the matmul peak of the dtype the engine computes in, both "
        "measured in the same run; step-1 loss is the parity check (LoRA starts as the base model, so every engine "
        "must agree to within its dtype's rounding).",
        "",
    ]
    path.write_text("\n".join(text), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tunesmith bench")
    parser.add_argument("--scenario", action="append", choices=list(SCENARIOS), help="default: all of them")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--output", type=Path, default=HERE / "results.json")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="any model spec tunesmith accepts")
    parser.add_argument("--engines", help="comma-separated subset, e.g. tunesmith,trl (default: the scenario's)")
    args = parser.parse_args(argv)
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / "tunesmith-bench"
    workdir.mkdir(parents=True, exist_ok=True)
    report = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{describe()}, torch threads {__import__('torch').get_num_threads()}",
        "command": "python bench/run.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "scenarios": [],
    }
    for name in args.scenario or DEFAULT_SCENARIOS:
        options = {**SCENARIOS[name], **({"engines": args.engines.split(",")} if args.engines else {})}
        report["scenarios"].append(run_scenario(name, steps=args.steps, workdir=workdir, model=args.model, **options))
        print(format_table({**report, "scenarios": report["scenarios"][-1:]}).split("\n", 1)[1], flush=True)
    report = merged_with_earlier(report, args.output)
    print("\n" + format_table(report))
    args.output.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.output}")
    if args.model == DEFAULT_MODEL:
        write_markdown(report, HERE.parent / "BENCHMARKS.md")
        print(f"wrote {HERE.parent / 'BENCHMARKS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
