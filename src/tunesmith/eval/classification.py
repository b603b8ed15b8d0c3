"""Base vs tuned on classification-style data: exact-match accuracy with a 95% Wilson interval.

Issue 3 grows this into the full evaluation (more metrics, bootstrap intervals, report.html); the
shape of eval.json already follows DESIGN.md: each metric is {"value", "ci95", "n"}.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from tunesmith.data.dataset import load_examples
from tunesmith.data.formats import Example
from tunesmith.serve.engine import Engine, Sampling


def normalise(text: str) -> str:
    return " ".join(text.strip().lower().split()).strip(" .")


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a proportion (sound at 0%, 100% and small n, unlike the normal one)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy(predictions: list[str], references: list[str]) -> dict[str, Any]:
    correct = sum(normalise(p) == normalise(r) for p, r in zip(predictions, references))
    low, high = wilson_interval(correct, len(references))
    return {"value": correct / max(len(references), 1), "ci95": [low, high], "n": len(references)}


def predict(engine: Engine, examples: list[Example], sampling: Sampling, batch_size: int) -> list[str]:
    predictions: list[str] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start: start + batch_size]
        predictions += engine.generate([prompt_of(example) for example in chunk], sampling)
    return predictions


def prompt_of(example: Example) -> list[dict[str, str]]:
    """The conversation up to (not including) the final assistant turn."""
    last = max(i for i, m in enumerate(example.messages) if m["role"] == "assistant")
    return example.messages[:last]


def evaluate_base_vs_tuned(engine: Engine, data: Path, max_examples: int | None, sampling: Sampling,
                           batch_size: int, output: Path | None) -> dict[str, Any]:
    examples = load_examples(data)[:max_examples]
    references = [example.messages[-1]["content"] for example in examples]
    results: dict[str, Any] = {"data": str(data), "metrics": {}, "predictions": []}
    columns: dict[str, list[str]] = {}
    for name in ("base", "tuned") if engine.has_adapter else ("model",):
        started = time.perf_counter()
        if name == "base":
            with engine.base_model():
                columns[name] = predict(engine, examples, sampling, batch_size)
        else:
            columns[name] = predict(engine, examples, sampling, batch_size)
        results["metrics"][name] = {"accuracy": accuracy(columns[name], references),
                                    "seconds": round(time.perf_counter() - started, 1)}
    for index, example in enumerate(examples):
        row = {"line": example.line, "prompt": prompt_of(example)[-1]["content"], "reference": references[index]}
        row.update({name: column[index] for name, column in columns.items()})
        results["predictions"].append(row)
    if output is not None:
        output.write_text(json.dumps(results, indent=1), encoding="utf-8")
    return results


def format_table(results: dict[str, Any]) -> str:
    lines = [f"{'model':<8} {'accuracy':>9}  {'95% CI':<17} {'n':>5}"]
    for name, metrics in results["metrics"].items():
        acc = metrics["accuracy"]
        lines.append(f"{name:<8} {acc['value']:>9.1%}  [{acc['ci95'][0]:.1%}, {acc['ci95'][1]:.1%}]  {acc['n']:>5}")
    return "\n".join(lines)
