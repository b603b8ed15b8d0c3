"""The run directory (DESIGN.md, "A run directory"): its layout, and the readers of what a run leaves.

    config.yaml        the fully resolved config the run trained with (`read_run_config`)
    metrics.jsonl      one JSON record per logged step or evaluation (`read_metrics`)
    checkpoints/       step-N/ (and best-step-N/): trainable weights, optimizer state, counters; written by
                       train/checkpoint.py into a hidden directory and renamed into place whole
    adapter/ | model/  the final weights: a PEFT adapter, or a whole model (full fine-tuning, freeze)
    eval.json          `tunesmith eval`'s report, beside report.html

metrics.jsonl is appended to while a run trains, so a reader may meet a last line a killed run cut short; it is
skipped, never an error, and so are blank lines and anything that is not a JSON object.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.config.loading import load_config
from tunesmith.config.schema import Config

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
ADAPTER_DIR, MODEL_DIR = "adapter", "model"
EVAL_FILE = "eval.json"
STEP_DIR = re.compile(r"^step-(\d+)$")
BEST_DIR = re.compile(r"^best-step-(\d+)$")
WEIGHTS, OPTIMIZER = "weights.", "optimizer."  # the prefixes of a checkpoint's two state dicts in its shard files


@dataclass(frozen=True)
class Run:
    """A finished run directory: its resolved config and where its final weights are."""

    directory: Path
    config: Config
    adapter_dir: Path | None  # adapter/: a PEFT adapter over config.model
    model_dir: Path | None  # model/: a full fine-tuned model

    @property
    def base_model(self) -> str:
        return self.config.model


def is_run_dir(path: Path) -> bool:
    """A finished run: its config.yaml beside its adapter/ or its model/."""
    return (path / CONFIG_FILE).is_file() and ((path / ADAPTER_DIR).is_dir() or (path / MODEL_DIR).is_dir())


def read_run_config(run_dir: Path) -> Config:
    """The config a run trained with, validated as `tunesmith train` validates one (errors name FILE:LINE)."""
    return load_config(Path(run_dir) / CONFIG_FILE)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a metrics.jsonl, in order; `path` is the file or the run directory. [] when there is none."""
    path = Path(path)
    path = path / METRICS_FILE if path.is_dir() else path
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


# ------------------------------------------------------------------------------------------------ checkpoints


def numbered(directory: Path, pattern: re.Pattern[str]) -> list[tuple[int, Path]]:
    """(N, path) of the entries of `directory` whose names `pattern` numbers (step-N, best-step-N), oldest first."""
    if not directory.is_dir():
        return []
    found = [(int(match.group(1)), path) for path in directory.iterdir() if (match := pattern.match(path.name))]
    return sorted(found)


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest step-N/ in a checkpoints/ directory."""
    checkpoints = numbered(directory, STEP_DIR)
    return checkpoints[-1][1] if checkpoints else None


def best_checkpoint(directory: Path) -> Path | None:
    """The newest best-step-N/ (the best weights so far) in a checkpoints/ directory."""
    best = numbered(directory, BEST_DIR)
    return best[-1][1] if best else None


def checkpoint_steps(run_dir: Path) -> list[int]:
    """The steps of a run's checkpoints that are whole (a prune that is removing one may have taken its state)."""
    return [step for step, path in numbered(run_dir / CHECKPOINTS_DIR, STEP_DIR) if (path / "state.json").is_file()]


def read_shards(tensors: dict[str, Any], directory: Path, local: bool = False) -> None:
    """Fill `tensors` (this rank's layout, or whole tensors when `local`) from a checkpoint's shards, whatever
    number of processes wrote them."""
    import torch
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is (disabled, )?unavailable or uninitialized")
        dcp.load(
            tensors,
            storage_reader=dcp.HuggingFaceStorageReader(str(directory)),
            no_dist=local or not torch.distributed.is_initialized(),
        )


def read_weights(path: Path) -> dict[str, Any]:
    """The trainable weights in a checkpoint, as whole tensors by parameter name (for tools, serving and tests)."""
    import torch
    import torch.distributed.checkpoint as dcp

    metadata = dcp.HuggingFaceStorageReader(str(path)).read_metadata().state_dict_metadata
    tensors = {
        key: torch.empty(entry.size, dtype=entry.properties.dtype)
        for key, entry in metadata.items()
        if key.startswith(WEIGHTS)
    }
    read_shards(tensors, path, local=True)
    return {key[len(WEIGHTS) :]: tensor for key, tensor in tensors.items()}
