"""The safety-tuning recipe's evidence: red-team figures before and after, written to docs/safety.md.

    python bench/safety.py [--max-examples 100] [--max-new-tokens 64]

Trains what is missing (examples/hh-refusal-sft.yaml, examples/hh-dpo.yaml; a run directory that already
has its adapter is reused), red-teams the base model and each tuned model on the same prompts with the same
greedy decoding (`tunesmith redteam`: hh-rlhf red-team openings held out from training, XSTest's unsafe and
safe prompts), and compares each tuned model with the base prompt by prompt: the change in refusal rate with
a paired 95% bootstrap interval and McNemar's exact p. A red-team directory that already holds redteam.json
with the same settings is reused. Long: about an hour on 2 CPU cores. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from tunesmith.eval.stats import bootstrap_indices, mcnemar_p, percentile_interval

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "runs" / "safety"
DOC = ROOT / "docs" / "safety.md"
TUNED = [
    ("refusal SFT", "examples/hh-refusal-sft.yaml", ROOT / "runs" / "hh-refusal-sft"),
    ("DPO", "examples/hh-dpo.yaml", ROOT / "runs" / "hh-dpo"),
]
BASE = "smollm2-135m-instruct"


def tunesmith(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "tunesmith", *args], cwd=ROOT, check=True)


def redteam(target: str, name: str, args: argparse.Namespace) -> Path:
    """Red-team `target` into runs/safety/redteam-NAME unless it was done there with these settings."""
    output = OUT / f"redteam-{name}"
    done = output / "redteam.json"
    if done.is_file():
        settings = json.loads(done.read_text())["settings"]
        if (settings["max_examples"], settings["max_new_tokens"]) == (args.max_examples, args.max_new_tokens):
            return output
    tunesmith(
        "redteam",
        target,
        "--max-examples",
        str(args.max_examples),
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--batch-size",
        "50",
        "--output",
        str(output),
    )
    return output


def refusals(directory: Path) -> dict[str, dict[str, bool]]:
    """{set: {prompt id: refused}} from a red-team directory's responses.jsonl."""
    found: dict[str, dict[str, bool]] = {}
    for line in (directory / "responses.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        found.setdefault(row["set"], {})[row["id"]] = bool(row["refused"])
    return found


def paired_change(tuned: dict[str, bool], base: dict[str, bool]) -> dict[str, float]:
    """Tuned minus base refusal rate on the prompts both answered, with a paired bootstrap interval."""
    ids = sorted(set(tuned) & set(base))
    a = np.array([tuned[i] for i in ids], dtype=float)
    b = np.array([base[i] for i in ids], dtype=float)
    rows = bootstrap_indices(len(ids), 2000, 0)
    low, high = percentile_interval(a[rows].mean(1) - b[rows].mean(1))
    return {"diff": float(a.mean() - b.mean()), "low": low, "high": high, "p": mcnemar_p(a > 0, b > 0), "n": len(ids)}


def percent(value: float) -> str:
    return f"{100 * value:.0f}"


def rate_cell(metric: dict) -> str:
    low, high = metric["ci95"]
    return f"{percent(metric['value'])} [{percent(low)}, {percent(high)}]"


def write_doc(rows: list[tuple[str, Path]], args: argparse.Namespace) -> str:
    base = refusals(rows[0][1])
    sets = json.loads((rows[0][1] / "redteam.json").read_text())["sets"]
    lines = [
        "# Safety tuning: refusal SFT and DPO on hh-rlhf harmless",
        "",
        "Written by `python bench/safety.py` "
        f"(--max-examples {args.max_examples} --max-new-tokens {args.max_new_tokens}); do not edit by hand.",
        "",
        "The recipe, on the default model (smollm2-135m-instruct) and the bundled hh-rlhf harmless slice (769",
        "training pairs; data/README.md):",
        "",
        "1. Red-team the base: `tunesmith redteam smollm2-135m-instruct --max-examples 100 --max-new-tokens 64`.",
        "2. Refusal SFT: `tunesmith train examples/hh-refusal-sft.yaml` (LoRA; each pair's chosen reply is learned,",
        "   never its rejected reply nor the pair's earlier, unrated assistant turns).",
        "3. DPO: `tunesmith train examples/hh-dpo.yaml` (LoRA, sigmoid loss, beta 0.1, reference cached).",
        "4. Red-team each tuned run the same way (`tunesmith redteam runs/NAME ...`) and compare prompt by prompt.",
        "",
        "Sets: hh-rlhf red-team openings (prompts of the held-out test pairs, never trained on) and XSTest's unsafe",
        f"prompts, where refusing is right; XSTest's safe prompts, where refusing is over-refusal. {args.max_examples}",
        "evenly spaced prompts per set, greedy replies; a reply is a refusal when it opens with a refusal phrase",
        "(the phrase classifier agrees with XSTest's human labels on 90.3% of 2,250 completions, kappa 0.81).",
        "",
        "Refusal rate in % with its 95% Wilson interval; the change from the base in points, with a paired",
        "bootstrap 95% interval over the same prompts and McNemar's exact p.",
        "",
        "| model | "
        + " | ".join(f"{name} ({'refusal' if 'unsafe' in block else 'over-refusal'})" for name, block in sets.items())
        + " |",
        "| --- |" + " --- |" * len(sets),
    ]
    for label, directory in rows:
        result = json.loads((directory / "redteam.json").read_text())["sets"]
        found = refusals(directory)
        cells = []
        for name, block in result.items():
            metric = (block.get("unsafe") or block["safe"])["metrics"]
            cell = rate_cell(metric.get("refusal_rate") or metric["over_refusal_rate"])
            if directory != rows[0][1]:
                change = paired_change(found[name], base[name])
                cell += (
                    f"; {change['diff'] * 100:+.0f} [{change['low'] * 100:+.0f}, {change['high'] * 100:+.0f}],"
                    f" p={change['p']:.2g}"
                )
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "How to read it: a safety recipe should raise refusal on the unsafe sets while over-refusal on the safe",
        "set stays near the base's. A recipe that raises both by as much has taught the model to refuse, not to",
        "judge; the remedy is data that also rewards helping (helpful-base pairs, safe prompts with compliant",
        "chosen replies) mixed into the same run.",
        "",
        "Replies and per-prompt verdicts: `runs/safety/redteam-*/responses.jsonl`.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-examples", type=int, default=100)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    rows = [("base", redteam(BASE, "base", args))]
    for label, config, run_dir in TUNED:
        if not (run_dir / "adapter").is_dir():
            tunesmith("train", config)
        rows.append((label, redteam(str(run_dir), run_dir.name, args)))
    DOC.write_text(write_doc(rows, args), encoding="utf-8")
    print(DOC.read_text())


if __name__ == "__main__":
    main()
