"""Health monitors of the RL recipes (grpo, rft, ppo), read from the run's metrics.jsonl records.

Each monitor is a plain function of the records logged so far (MetricsLog.records, which a resumed run rebuilds from
the file up to its checkpoint), so a resumed run warns at the same steps as the uninterrupted one. A monitor fires
once per run: rl_loop.finish_step prints its warning and logs `{"step", "monitor": name, "warning": text}`, and a
monitor already in the records stays silent. Step records are the lines with a `loss`; evaluations the ones with a
`val_reward`. The windows count logged steps (train.log_every).
"""

from __future__ import annotations

from typing import Any, Callable

WINDOW = 5  # logged steps whose mean is "the start" (the first ones) and "now" (the latest ones)
HACKING_DROP = 0.05  # reward hacking: val_reward fell by more than this (reward units) between the last two evaluations
LENGTH_FACTOR = 3.0  # length drift: the mean response_length now is over 3x, or under 1/3 of, its start
TRUNCATED_SHARE = 0.5  # length drift: over half the replies now stop at rl.max_new_tokens (truncated_fraction)
ENTROPY_FRACTION = 0.1  # entropy collapse: the mean per-token entropy now is under 0.1x its start...
ENTROPY_FLOOR = 0.01  # ...or under 0.01 nats per token

Records = list[dict[str, Any]]


def step_figures(records: Records, name: str) -> list[tuple[int, float]]:
    """(step, value) of `name` in every logged step's record."""
    return [(r["step"], r[name]) for r in records if "loss" in r and isinstance(r.get(name), (int, float))]


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def start_and_now(records: Records, name: str) -> tuple[float, float] | None:
    """The means of `name` over the first WINDOW logged steps and the last WINDOW ones; None before 2 * WINDOW
    (the two windows never overlap)."""
    values = [value for _, value in step_figures(records, name)]
    if len(values) < 2 * WINDOW:
        return None
    return mean(values[:WINDOW]), mean(values[-WINDOW:])


def reward_hacking(records: Records) -> str | None:
    """The held-out reward fell by more than HACKING_DROP between the last two evaluations while the training reward
    rose: its mean over the steps since the earlier evaluation is above its mean over as many steps before it."""
    evaluations = [(r["step"], r["val_reward"]) for r in records if isinstance(r.get("val_reward"), (int, float))]
    if len(evaluations) < 2:
        return None
    (before_step, before), (after_step, after) = evaluations[-2:]
    span = after_step - before_step
    rewards = step_figures(records, "reward")
    earlier = [value for step, value in rewards if before_step - span < step <= before_step]
    later = [value for step, value in rewards if before_step < step <= after_step]
    if not earlier or not later or not before - after > HACKING_DROP or not mean(later) > mean(earlier):
        return None
    return (
        f"possible reward hacking: the training reward rose ({mean(earlier):.4g} -> {mean(later):.4g}) while "
        f"val_reward fell ({before:.4g} at step {before_step} -> {after:.4g} at step {after_step}); the policy may be "
        f"exploiting the reward rather than solving the task: read some replies, raise rl.kl_coef, or keep the "
        f"checkpoint with the best val_reward"
    )


def length_drift(records: Records) -> str | None:
    """The mean response_length moved past LENGTH_FACTOR of its start, or most replies now hit rl.max_new_tokens."""
    truncated = [value for _, value in step_figures(records, "truncated_fraction")][-WINDOW:]
    if len(truncated) == WINDOW and mean(truncated) > TRUNCATED_SHARE:
        return (
            f"length drift: {mean(truncated):.0%} of the replies of the last {WINDOW} logged steps stopped at "
            f"rl.max_new_tokens (truncated_fraction); raise rl.max_new_tokens, or reward shorter replies"
        )
    lengths = start_and_now(records, "response_length")
    if lengths is None or lengths[0] <= 0:
        return None
    start, now = lengths
    if 1 / LENGTH_FACTOR <= now / start <= LENGTH_FACTOR:
        return None
    return (
        f"length drift: the mean response_length went from {start:.4g} to {now:.4g} tokens (over {LENGTH_FACTOR:g}x "
        f"apart); the reward may favour length itself: check it, or add a length_penalty reward"
    )


def entropy_collapse(records: Records) -> str | None:
    """The mean per-token entropy fell under ENTROPY_FRACTION of its start or under ENTROPY_FLOOR."""
    entropies = start_and_now(records, "entropy")
    if entropies is None:
        return None
    start, now = entropies
    if now >= ENTROPY_FRACTION * start and now >= ENTROPY_FLOOR:
        return None
    return (
        f"entropy collapse: the per-token entropy fell from {start:.4g} to {now:.4g} nats; the policy samples "
        f"nearly the same replies and GRPO's groups stop teaching: raise rl.temperature or rl.kl_coef, or lower "
        f"train.lr"
    )


MONITORS: dict[str, Callable[[Records], str | None]] = {
    "reward_hacking": reward_hacking,
    "length_drift": length_drift,
    "entropy_collapse": entropy_collapse,
}


def fired_monitors(records: Records) -> list[tuple[str, str]]:
    """(name, warning) of each monitor that fires on `records` and has not fired before in them.
    O(records) per call: a scan of a few dicts per logged line, nothing beside an RL step's sampling."""
    earlier = {r["monitor"] for r in records if "monitor" in r}
    found = ((name, monitor(records)) for name, monitor in MONITORS.items() if name not in earlier)
    return [(name, warning) for name, warning in found if warning]
