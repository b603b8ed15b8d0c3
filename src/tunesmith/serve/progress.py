"""What a job's run reports, as the job's events: each line of the run's metrics.jsonl becomes OpenAI-style events
(a step's training loss, and for reinforcement its reward per grader, KL and reply length; an evaluation's
validation loss or reward; an RL monitor's warning, train/rl_monitors.py), each with a key so that a resumed run's
lines, read again, are stored once. The closing evaluation's report is summed up in one line (`headline`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

EVAL_HEADLINE = {  # the closing evaluation's task -> the metric its event names
    "perplexity": "perplexity",
    "preference": "preference_accuracy",
    "reward": "mean_reward",
}
RL_FIGURES = ("kl", "entropy", "response_length", "truncated_fraction", "clip_fraction")  # besides the rewards
CHECKPOINT_FIGURES = ("train_loss", "valid_loss", "valid_reward")  # what a checkpoint's record carries


@dataclass
class Event:
    message: str
    data: dict[str, Any]
    key: str
    type: str = "metrics"
    level: str = "info"


@dataclass
class Progress:
    """The newest figures of a run, as its lines are read: what each checkpoint's record shows."""

    known: dict[str, Any] = field(default_factory=dict)

    def checkpoint_metrics(self, step: int) -> dict[str, Any]:
        return {"step": step, **{key: self.known[key] for key in CHECKPOINT_FIGURES if key in self.known}}


def events_of(row: dict[str, Any], progress: Progress) -> list[Event]:
    """The events of one metrics line (none for a line without a step); `progress` learns its figures."""
    step = row.get("step")
    if step is None:
        return []
    if row.get("event") == "data":  # the run's opening line: what it trains on, how long, on how many processes
        data = {key: row.get(key) for key in ("total_steps", "processes", "examples", "rows")}
        return [
            Event(f"Training {data['total_steps']} steps on {data['processes']} process(es)", data, "data", "message")
        ]
    if "monitor" in row:  # once per run and monitor: its name is its key
        data = {"step": step, "monitor": row["monitor"], "warning": row.get("warning")}
        message = f"Step {step}: warning: {row.get('warning')}"
        return [Event(message, data, f"monitor-{row['monitor']}", "message", "warning")]
    events = []
    if "loss" in row:
        progress.known["train_loss"] = row["loss"]
        data = {
            "step": step,
            "train_loss": row["loss"],
            "total_steps": row.get("total_steps"),
            "tokens_per_s": row.get("tokens_per_s"),
            "lr": row.get("lr"),
            **rl_figures(row, ""),
        }
        said = f", reward={row['reward']:.4f}" if "reward" in row else ""
        events.append(Event(f"Step {step}: training loss={row['loss']:.4f}{said}", data, f"train-{step}"))
    if "val_reward" in row:
        progress.known["valid_reward"] = row["val_reward"]
        data = {"step": step, **rl_figures(row, "val_")}
        events.append(Event(f"Step {step}: validation reward={row['val_reward']:.4f}", data, f"val-reward-{step}"))
    if "val_loss" in row:
        progress.known["valid_loss"] = row["val_loss"]
        data = {"step": step, "valid_loss": row["val_loss"]}
        events.append(Event(f"Step {step}: validation loss={row['val_loss']:.4f}", data, f"val-{step}"))
    return events


def rl_figures(row: dict[str, Any], prefix: str) -> dict[str, float]:
    """An RL step's figures from its metrics line (`prefix` val_: its evaluation's): the reward and each of its
    sources' (reward_grader, and a multi grader's reward_grader_<name>), KL, entropy and reply length."""
    names = [name for name in row if name.startswith(f"{prefix}reward")] + [f"{prefix}{name}" for name in RL_FIGURES]
    return {name: row[name] for name in names if isinstance(row.get(name), (int, float))}


def headline(result: dict[str, Any]) -> str:
    """The report's first metric for the tuned model and the base, and their difference, with 95% intervals."""
    from tunesmith.eval.stats import cell, difference

    name = EVAL_HEADLINE.get(result.get("task"), "")
    tuned = result.get("metrics", {}).get(name)
    if tuned is None:
        return "no metric"
    parts = [f"{name} {cell(tuned, rate=False)} fine-tuned"]
    base = result.get("baselines", {}).get("base", {}).get("metrics", {}).get(name)
    if base is not None:
        parts.append(f"{cell(base, rate=False)} base")
    diff = result.get("comparisons", {}).get("base", {}).get(name)
    if diff and diff.get("diff") is not None:
        parts.append(f"difference {difference(diff, '+.4g')}")
    return "; ".join(parts)
