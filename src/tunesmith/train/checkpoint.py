"""Atomic, sharded checkpoints in safetensors + JSON only (never pickle).

A checkpoint is written into a hidden temporary directory and renamed into place only when every
file is on disk, so `checkpoints/step-N/` exists only when complete. It holds what an exact resume
needs: trainable weights, optimizer moments, scheduler position, RNG states and the data position.

Weights and optimizer moments go through torch.distributed.checkpoint with its safetensors storage: each
process writes its own shard file, and a load reshards them for however many processes resume (one, or
more than wrote them). Its own metadata format is pickled, so it is not used: the safetensors headers hold
the shard offsets, and everything that is not a tensor is JSON.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from tunesmith.rundir import BEST_DIR, OPTIMIZER, STEP_DIR, WEIGHTS, numbered, read_shards
from tunesmith.train.distributed import ONE_PROCESS, World


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


def _options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, flatten_optimizer_state_dict=True, strict=False)


def _state_dicts(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The trainable weights and the optimizer state, flat, keyed by parameter name: in this process's layout
    (whole tensors; DTensor shards under FSDP), which torch.distributed.checkpoint reshards on load."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        weights, optimizer_state = get_model_state_dict(model, options=_options()), {}
    else:
        weights, optimizer_state = get_state_dict(model, optimizer, options=_options())
    # A weight tied to another name (tied embeddings and output head) is kept once, under its first name.
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    return {name: value for name, value in weights.items() if name in trainable}, optimizer_state


def _tensors(weights: dict[str, Any], optimizer: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {
        **{WEIGHTS + key: value for key, value in weights.items()},
        **{OPTIMIZER + key: value for key, value in optimizer.items() if isinstance(value, torch.Tensor)},
    }


def _write_shards(tensors: dict[str, torch.Tensor], directory: Path) -> None:
    """Every rank writes its own shards in parallel (one safetensors file each, the shard offsets in its
    header), replicated tensors once."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # one process: torch warns it is "assuming" what we asked for
        warnings.filterwarnings("ignore", message="torch.distributed is (disabled, )?unavailable or uninitialized")
        dcp.save(
            tensors,
            storage_writer=dcp.HuggingFaceStorageWriter(str(directory), save_distributed=True),
            no_dist=not torch.distributed.is_initialized(),
        )


def rng_state() -> dict[str, Any]:
    """This process's random state as JSON: torch's (and each GPU's) generator bytes, Python's."""
    cuda = [state.tolist() for state in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []
    version, internal, gauss = random.getstate()
    return {"torch": torch.get_rng_state().tolist(), "cuda": cuda, "python": [version, list(internal), gauss]}


def load_rng_state(saved: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(saved["torch"], dtype=torch.uint8))
    if saved["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(state, dtype=torch.uint8) for state in saved["cuda"]])
    version, internal, gauss = saved["python"]
    random.setstate((version, tuple(internal), gauss))


def _start_writing(directory: Path, name: str, world: World) -> tuple[Path, Path]:
    final, temporary = directory / name, directory / f".tmp-{name}"
    if world.main:
        directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir()
    world.barrier()
    return final, temporary


def _finish_writing(temporary: Path, final: Path, world: World) -> Path:
    """Rank 0 commits once every rank's files are on disk; no rank goes on before the checkpoint exists."""
    world.barrier()
    if world.main:
        if final.exists():  # the same step saved again (e.g. a resumed run that stops at once)
            shutil.rmtree(final)
        _commit(temporary, final)
    world.barrier()
    return final


def save_checkpoint(
    directory: Path,
    name: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: TrainState,
    world: World = ONE_PROCESS,
) -> Path:
    """Write checkpoints/<name>/ atomically (every rank its shards, in parallel) and return its path."""
    final, temporary = _start_writing(directory, name, world)
    weights, optimizer_state = _state_dicts(model, optimizer)
    _write_shards(_tensors(weights, optimizer_state), temporary)
    _write_json(
        temporary / f"rng-{world.rank}.json", rng_state()
    )  # each rank's: dropout and sampling go on as they were
    if world.main:
        _write_json(
            temporary / "optimizer.json",
            {key: value for key, value in optimizer_state.items() if not isinstance(value, torch.Tensor)},
        )
        _write_json(temporary / "scheduler.json", scheduler.state_dict())
        _write_json(temporary / "state.json", {**asdict(state), "processes": world.size})
    return _finish_writing(temporary, final, world)


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, world: World = ONE_PROCESS
) -> TrainState:
    """Restore a checkpoint written by any number of processes. The random state is restored for the ranks
    that wrote one; on more processes than before, the new ranks keep their seeded state."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    weights, optimizer_state = _state_dicts(model, optimizer)
    tensors = _tensors(weights, optimizer_state)
    read_shards(tensors, path)
    scalars = json.loads((path / "optimizer.json").read_text())
    set_state_dict(
        model,
        optimizer,
        model_state_dict={key: tensors[WEIGHTS + key] for key in weights},
        optim_state_dict={
            **scalars,
            **{key: tensors[OPTIMIZER + key] for key in optimizer_state if OPTIMIZER + key in tensors},
        },
        options=_options(),
    )
    scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
    if (path / f"rng-{world.rank}.json").exists():
        load_rng_state(json.loads((path / f"rng-{world.rank}.json").read_text()))
    saved = json.loads((path / "state.json").read_text())
    saved.pop("processes", None)
    return TrainState(**saved)


def prune(directory: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` step checkpoints and all but the newest best checkpoint."""
    for _, path in numbered(directory, STEP_DIR)[:-keep_last]:
        shutil.rmtree(path)
    for _, path in numbered(directory, BEST_DIR)[:-1]:
        shutil.rmtree(path)
    for leftover in directory.glob(".tmp-*"):  # an interrupted write: never a valid checkpoint
        shutil.rmtree(leftover, ignore_errors=True)


def save_best_weights(directory: Path, model: torch.nn.Module, step: int, world: World = ONE_PROCESS) -> Path:
    """The trainable weights at the best validation loss so far (weights only: the run ends with them)."""
    final, temporary = _start_writing(directory, f"best-step-{step}", world)
    weights, _ = _state_dicts(model, None)
    _write_shards(_tensors(weights, {}), temporary)
    return _finish_writing(temporary, final, world)


def load_best_weights(path: Path, model: torch.nn.Module) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    weights, _ = _state_dicts(model, None)
    tensors = _tensors(weights, {})
    read_shards(tensors, path)
    set_model_state_dict(model, {key: tensors[WEIGHTS + key] for key in weights}, options=_options())
