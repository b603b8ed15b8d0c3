"""Does training in bfloat16 give the same model quality as float32? Pairs two evaluated runs of one config, trained
in each dtype and scored on the same examples, and writes bench/dtype_parity.json.

    tunesmith train examples/banking77-classify.yaml train.dtype=float32 output_dir=runs/banking77-classify
    tunesmith train examples/banking77-classify.yaml train.dtype=bfloat16 output_dir=runs/banking77-classify-bf16
    tunesmith eval runs/banking77-classify && tunesmith eval runs/banking77-classify-bf16
    python bench/dtype_parity.py main-job runs/banking77-classify runs/banking77-classify-bf16

(the same with examples/banking77-best.yaml, name banking77-best). The difference is bf16 minus float32 for every
metric of the eval task, with a paired bootstrap interval (the same resampled examples for both runs: eval.metrics'
compare) and McNemar's exact p for per-example correctness. Parity holds where the interval includes 0. Each named
comparison is kept in the JSON, so the file holds every config measured. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tunesmith.eval.metrics import compare

ROOT = Path(__file__).resolve().parents[1]


def examples_of(run: Path) -> tuple[dict, list[dict]]:
    scored = json.loads((run / "eval.json").read_text(encoding="utf-8"))
    return scored, sorted(scored["examples"], key=lambda example: example["index"])


def dtype_of(run: Path) -> str:
    for line in (run / "config.yaml").read_text(encoding="utf-8").splitlines():
        if line.strip().startswith("dtype:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help="what the pair is, e.g. main-job")
    parser.add_argument("float32_run", type=Path)
    parser.add_argument("bfloat16_run", type=Path)
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "dtype_parity.json")
    args = parser.parse_args()
    scored_a, examples_a = examples_of(args.bfloat16_run)
    scored_b, examples_b = examples_of(args.float32_run)
    if [e["input"] for e in examples_a] != [e["input"] for e in examples_b]:
        raise SystemExit("the two runs were scored on different examples: evaluate both on the same data")
    references = [e["expected"] for e in examples_a]
    difference = compare(
        scored_a["task"], [e["predicted"] for e in examples_a], [e["predicted"] for e in examples_b], references
    )
    both = sum(a["correct"] and b["correct"] for a, b in zip(examples_a, examples_b))
    only_bf16 = sum(a["correct"] and not b["correct"] for a, b in zip(examples_a, examples_b))
    only_fp32 = sum(b["correct"] and not a["correct"] for a, b in zip(examples_a, examples_b))
    entry = {
        "runs": {"float32": str(args.float32_run), "bfloat16": str(args.bfloat16_run)},
        "dtypes": {"float32": dtype_of(args.float32_run), "bfloat16": dtype_of(args.bfloat16_run)},
        "data": scored_a["data"],
        "n": len(references),
        "float32": scored_b["metrics"],
        "bfloat16": scored_a["metrics"],
        "bf16_minus_fp32": difference,
        "agreement": {
            "same_prediction": sum(a["predicted"] == b["predicted"] for a, b in zip(examples_a, examples_b)),
            "both_correct": both,
            "only_bf16_correct": only_bf16,
            "only_fp32_correct": only_fp32,
        },
    }
    known = json.loads(args.output.read_text()) if args.output.exists() else {}
    known[args.name] = entry
    args.output.write_text(json.dumps(known, indent=1) + "\n")
    accuracy = difference["accuracy"]
    low, high = (100 * bound for bound in accuracy["ci95"])
    print(
        f"{args.name}: accuracy float32 {100 * scored_b['metrics']['accuracy']['value']:.1f}%, "
        f"bfloat16 {100 * scored_a['metrics']['accuracy']['value']:.1f}%; bf16 - fp32 = "
        f"{100 * accuracy['diff']:+.1f} points [{low:+.1f}, {high:+.1f}], McNemar p = {difference['mcnemar_p']:.3f}; "
        f"same prediction on {entry['agreement']['same_prediction']} of {entry['n']}"
    )


if __name__ == "__main__":
    main()
