"""Atomic checkpoints in safetensors + JSON only (never pickle).

A checkpoint is written into a hidden temporary directory and renamed into place only when every
file is on disk, so `checkpoints/step-N/` exists only when complete. It holds what an exact resume
needs: trainable weights, optimizer moments, scheduler position, RNG states and the data position.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tunesmith.models.adapters import load_trainable_state, trainable_state

STEP_DIR = re.compile(r"^step-(\d+)$")
BEST_DIR = re.compile(r"^best-step-(\d+)$")


@dataclass
class TrainState:
    """Loop counters that a resume must restore; everything here is plain JSON."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    step_in_epoch: int = 0  # position in the epoch's deterministic batch plan
    tokens_seen: int = 0
    best_val_loss: float | None = None
    best_score: float | None = None  # the selection metric (train.early_stopping.metric), lower is better
    best_step: int | None = None
    evals_without_improvement: int = 0
    bad_steps_in_a_row: int = 0
    skipped_steps: int = 0
    elapsed_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")


def _fsync_tree(directory: Path) -> None:
    for path in directory.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())


def _commit(temporary: Path, final: Path) -> None:
    _fsync_tree(temporary)
    os.rename(temporary, final)
    descriptor = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors (safetensors) and the rest (JSON)."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = tensor
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{index}"] = cuda_state
    version, internal, gauss = random.getstate()
    return tensors, {"python": [version, list(internal), gauss]}


def load_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[key] for key in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(directory: Path, name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, state: TrainState) -> Path:
    """Write checkpoints/<name>/ atomically and return its path."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / name
    temporary = directory / f".tmp-{name}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    save_file({k: v.contiguous() for k, v in trainable_state(model).items()}, temporary / "trainable.safetensors")
    optimizer_tensors, optimizer_meta = optimizer_state(optimizer)
    save_file(optimizer_tensors, temporary / "optimizer.safetensors")
    _write_json(temporary / "optimizer.json", optimizer_meta)
    _write_json(temporary / "scheduler.json", scheduler.state_dict())
    rng_tensors, rng_meta = rng_state()
    save_file(rng_tensors, temporary / "rng.safetensors")
    _write_json(temporary / "rng.json", rng_meta)
    _write_json(temporary / "state.json", asdict(state))
    if final.exists():  # the same step saved again (e.g. a resumed run that stops at once)
        shutil.rmtree(final)
    _commit(temporary, final)
    return final


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> TrainState:
    load_trainable_state(model, load_file(path / "trainable.safetensors"))
    load_optimizer_state(optimizer, load_file(path / "optimizer.safetensors"), json.loads((path / "optimizer.json").read_text()))
    scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
    load_rng_state(load_file(path / "rng.safetensors"), json.loads((path / "rng.json").read_text()))
    return TrainState(**json.loads((path / "state.json").read_text()))


def _numbered(directory: Path, pattern: re.Pattern[str]) -> list[tuple[int, Path]]:
    if not directory.is_dir():
        return []
    found = [(int(match.group(1)), path) for path in directory.iterdir() if (match := pattern.match(path.name))]
    return sorted(found)


def latest_checkpoint(directory: Path) -> Path | None:
    checkpoints = _numbered(directory, STEP_DIR)
    return checkpoints[-1][1] if checkpoints else None


def best_checkpoint(directory: Path) -> Path | None:
    best = _numbered(directory, BEST_DIR)
    return best[-1][1] if best else None


def prune(directory: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` step checkpoints and all but the newest best checkpoint."""
    for _, path in _numbered(directory, STEP_DIR)[:-keep_last]:
        shutil.rmtree(path)
    for _, path in _numbered(directory, BEST_DIR)[:-1]:
        shutil.rmtree(path)
    for leftover in directory.glob(".tmp-*"):  # an interrupted write: never a valid checkpoint
        shutil.rmtree(leftover, ignore_errors=True)


def save_best_weights(directory: Path, model: torch.nn.Module, step: int) -> Path:
    """The trainable weights at the best validation loss so far (weights only: the run ends with them)."""
    name = f"best-step-{step}"
    temporary = directory / f".tmp-{name}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in trainable_state(model).items()}, temporary / "trainable.safetensors")
    final = directory / name
    if final.exists():
        shutil.rmtree(final)
    _commit(temporary, final)
    return final


def load_best_weights(path: Path, model: torch.nn.Module) -> None:
    load_trainable_state(model, load_file(path / "trainable.safetensors"))
