"""The run directory: creating it, refusing to clobber another run, and finding where to resume."""

from __future__ import annotations

import json
import resource
from pathlib import Path
from typing import Any

import yaml

from tunesmith.config.loading import write_config
from tunesmith.config.schema import Config
from tunesmith.errors import UserError
from tunesmith.rundir import CONFIG_FILE, latest_checkpoint, read_metrics

# Keys a resumed run may change: they steer how long and how loudly it runs, not what it computes.
# train.parallel and train.cpu_offload too: checkpoints reshard, so a run may resume under DDP or FSDP; and
# output_dir, so a run directory moved elsewhere resumes there.
RESUMABLE_CHANGES = {
    "output_dir",
    "train.resume",
    "train.progress",
    "train.max_steps",
    "train.epochs",
    "train.eval_every",
    "train.save_every",
    "train.keep_last",
    "train.log_every",
    "train.threads",
    "train.parallel",
    "train.cpu_offload",
    "eval",
}


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        flat: dict[str, Any] = {}
        for key, value in data.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: data}


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    old, new = _flatten(saved), _flatten(current)
    changed = sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))
    return [key for key in changed if key not in RESUMABLE_CHANGES and key.split(".")[0] not in RESUMABLE_CHANGES]


def with_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved config with today's defaults filled in, so a key added since it was written is no change."""
    from pydantic import ValidationError

    try:
        return Config.model_validate(saved).model_dump(mode="json")
    except ValidationError:
        return saved


def prepare_run_dir(config: Config, write: bool = True) -> Path | None:
    """Create output_dir and write config.yaml; return the checkpoint to resume from, if any. Every rank of a
    distributed run checks (so all stop on the same error); only rank 0 writes."""
    run_dir = config.output_dir
    checkpoint = latest_checkpoint(run_dir / "checkpoints")
    if checkpoint is not None:
        if config.train.resume == "never":
            raise UserError(
                f"output_dir={run_dir} already holds checkpoints of a run; fix: choose another output_dir, "
                f"delete that one, or set train.resume=auto to continue it"
            )
        saved = with_defaults(yaml.safe_load((run_dir / CONFIG_FILE).read_text(encoding="utf-8")))
        changes = config_changes(saved, config.model_dump(mode="json"))
        if changes:
            raise UserError(
                f"output_dir={run_dir} holds a run with a different config ({', '.join(changes)}), so it "
                f"cannot be resumed; fix: choose another output_dir or set train.resume=never with a new one"
            )
    if write:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_config(config, run_dir / CONFIG_FILE)
    return checkpoint


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def final_logged_loss(run_dir: Path) -> float | None:
    """The loss of the last step that metrics.jsonl records (None before any); a line a crash cut short is skipped."""
    steps = [record for record in read_metrics(run_dir) if "loss" in record and "event" not in record]
    return steps[-1]["loss"] if steps else None  # skipped steps are events


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
