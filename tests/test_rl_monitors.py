"""The RL recipes' health monitors (train/rl_monitors.py): each fires on a history that shows its pattern and stays
silent on a healthy one; finish_step logs a firing once, the same in a resumed run; the service turns it into an
event (the dashboard's browser check is in tests/test_dashboard.py)."""

from __future__ import annotations

from test_rl import PROMPTS, records, spaces_reward
from test_training import straight_and_resumed

from tunesmith.serve import progress
from tunesmith.train import rl_monitors
from tunesmith.train.metrics import MetricsLog

STEPS = 12


def history(reward=None, entropy=None, length=None, truncated=None, val_reward=None, eval_every=4) -> list[dict]:
    """Step records 1..STEPS whose figures are `figure(step)` (defaults: flat, healthy), and an evaluation every
    `eval_every` steps."""
    reward, entropy = reward or (lambda s: 0.5), entropy or (lambda s: 2.0)
    length, truncated = length or (lambda s: 40.0), truncated or (lambda s: 0.1)
    lines: list[dict] = [{"step": 0, "event": "data", "total_steps": STEPS}]
    for step in range(1, STEPS + 1):
        lines.append(
            {
                "step": step,
                "loss": 0.1,
                "reward": reward(step),
                "entropy": entropy(step),
                "response_length": length(step),
                "truncated_fraction": truncated(step),
            }
        )
        if val_reward is not None and step % eval_every == 0:
            lines.append({"step": step, "val_reward": val_reward(step)})
    return lines


def test_healthy_runs_fire_no_monitor():
    assert rl_monitors.fired_monitors(history()) == []
    improving = history(
        reward=lambda s: 0.1 * s, entropy=lambda s: 2.0 - 0.05 * s, length=lambda s: 40 + s, val_reward=lambda s: s / 20
    )
    assert rl_monitors.fired_monitors(improving) == []
    # both rewards falling together is a bad run, not reward hacking
    assert rl_monitors.reward_hacking(history(reward=lambda s: -s, val_reward=lambda s: -s)) is None
    # a short run has no start to compare with
    assert rl_monitors.fired_monitors(history(entropy=lambda s: 0.0)[: rl_monitors.WINDOW]) == []


def test_reward_hacking_fires_when_training_reward_rises_as_validation_reward_falls():
    hacked = history(reward=lambda s: 0.1 * s, val_reward=lambda s: 1.0 - 0.05 * s)  # val 0.6 at 8, 0.4 at 12
    warning = rl_monitors.reward_hacking(hacked)
    assert warning and "val_reward fell" in warning and "step 8" in warning and "step 12" in warning
    assert rl_monitors.reward_hacking(history(reward=lambda s: 0.1 * s)) is None  # no validation: no verdict
    slight = history(reward=lambda s: 0.1 * s, val_reward=lambda s: 1.0 - 0.001 * s)  # within HACKING_DROP
    assert rl_monitors.reward_hacking(slight) is None


def test_length_drift_fires_on_growing_lengths_and_on_truncation():
    assert "response_length went from" in rl_monitors.length_drift(history(length=lambda s: 10.0 * s))
    assert "response_length" in rl_monitors.length_drift(history(length=lambda s: 400.0 / s))  # shrinking too
    assert "stopped at rl.max_new_tokens" in rl_monitors.length_drift(history(truncated=lambda s: 0.9))
    assert rl_monitors.length_drift(history(length=lambda s: 40 + 2 * s)) is None  # 42 -> 62: under 3x


def test_entropy_collapse_fires_on_a_fall_to_a_fraction_or_below_the_floor():
    assert "entropy collapse" in rl_monitors.entropy_collapse(history(entropy=lambda s: 2.0 if s <= 5 else 0.1))
    assert rl_monitors.entropy_collapse(history(entropy=lambda s: 0.005)) is not None  # under ENTROPY_FLOOR throughout
    assert rl_monitors.entropy_collapse(history(entropy=lambda s: 2.0 if s <= 5 else 0.5)) is None  # 0.25x: fine


def test_a_monitor_fires_once_per_run():
    collapsed = history(entropy=lambda s: 0.001)
    assert [name for name, _ in rl_monitors.fired_monitors(collapsed)] == ["entropy_collapse"]
    collapsed.append({"step": STEPS, "monitor": "entropy_collapse", "warning": "..."})
    assert rl_monitors.fired_monitors(collapsed) == []


def test_metrics_log_rebuilds_its_records_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    for line in history(val_reward=lambda s: 0.5):
        log.write(line)
    kept = [line for line in log.records if line["step"] <= 4]
    assert MetricsLog(path, resume_step=4).records == kept
    assert MetricsLog(None).records == []


def test_finish_step_logs_a_firing_once_and_a_resumed_run_logs_it_alike(tmp_path, tiny_model, monkeypatch):
    # forced: the first step is "the start", the second "now", and any entropy is under the floor; the tiny
    # model's replies all run to rl.max_new_tokens, so length drift's truncation check is put out of reach
    monkeypatch.setattr(rl_monitors, "WINDOW", 1)
    monkeypatch.setattr(rl_monitors, "ENTROPY_FLOOR", 1e9)
    monkeypatch.setattr(rl_monitors, "TRUNCATED_SHARE", 1.0)
    overrides = ["method=grpo", "rl.max_new_tokens=12", spaces_reward(tmp_path), "train.max_steps=3"]
    straight, resumed = straight_and_resumed(tmp_path, tiny_model, PROMPTS, overrides, 2, monkeypatch)
    fired = [line for line in records(straight.output_dir) if "monitor" in line]
    assert [(line["step"], line["monitor"]) for line in fired] == [(2, "entropy_collapse")]
    assert "entropy collapse" in fired[0]["warning"]
    # stopped right after the firing: the resumed run's rebuilt records hold it, so step 3 does not fire again
    assert [line for line in records(resumed.output_dir) if "monitor" in line] == fired


def test_a_monitor_line_becomes_one_keyed_event():
    line = {"step": 7, "monitor": "length_drift", "warning": "length drift: ..."}
    (event,) = progress.events_of(line, progress.Progress())
    assert (event.key, event.type, event.level) == ("monitor-length_drift", "message", "warning")
    assert event.data == {"step": 7, "monitor": "length_drift", "warning": "length drift: ..."}
    assert event.message == "Step 7: warning: length drift: ..."
