"""Direct preference optimisation: learn from {prompt, chosen, rejected} pairs without a reward model.

The loop is the SFT loop (`train_loop`) with `PreferenceObjective` (train/preference.py) as its loss and
as its validation loss. The reference model is the model before training, never a second copy in memory:
for an adapter it is the base with the adapter switched off; for full fine-tuning, the starting weights.
With `dpo.reference: cached` (the default) its log-probabilities over the training and validation pairs are
computed once, before the first step, and kept in RUN/reference/ (safetensors + manifest.json), so
resumed runs and later epochs reuse them; `live` recomputes them on every batch (adapters only).
"""

from __future__ import annotations

import hashlib
import sys
from functools import partial
from typing import Any

import torch

from tunesmith.config.schema import Config
from tunesmith.data.dataset import PreparedData
from tunesmith.data.packing import Batch, collate, consecutive_runs
from tunesmith.data.tokenize import Unit
from tunesmith.errors import UserError
from tunesmith.recipes.sft import train_loop
from tunesmith.registry import methods, preference_losses
from tunesmith.train import distributed
from tunesmith.train.distill import segment_keys
from tunesmith.train.distributed import World
from tunesmith.train.preference import PreferenceObjective, adapter_off_logprobs, sequence_logprobs
from tunesmith.train.session import RunResult
from tunesmith.train.tensor_cache import REFERENCE_CACHE, model_identity, read_cache, write_cache

CACHE_FILE = "logprobs.safetensors"
CACHE_FORMAT = 1  # bump when the files' layout changes, so old caches are rebuilt rather than misread


@methods.register("dpo", accepts=("preference",))
def run_dpo(config: Config) -> RunResult:
    return train_loop(
        config, accepts=("preference",), build_objective=partial(build_dpo_objective, config), validate_objective=True
    )


def build_dpo_objective(
    config: Config, data: PreparedData, runner: torch.nn.Module, tokenizer: Any, device: torch.device, world: World
) -> PreferenceObjective:
    settings = config.dpo
    adapter = hasattr(distributed.inner(runner), "disable_adapter")
    reference_of = adapter_off_logprobs if adapter else no_grad_logprobs
    if settings.reference == "live":
        if not adapter:
            raise UserError(
                f"dpo.reference=live needs an adapter to switch off, and adapter.type={config.adapter.type} "
                f"trains the model itself; fix: set dpo.reference=cached (the starting model's "
                f"log-probabilities are computed once, before training)"
            )
        reference = reference_of
    else:
        max_tokens = config.data.max_length * 2 * config.train.batch_size  # a training micro-batch's worth
        reference = cached_reference(
            config, data.train + data.validation, runner, reference_of, device, max_tokens, world
        )
    return PreferenceObjective(
        preference_losses.get(settings.loss, key="dpo.loss"),
        settings.beta,
        settings.label_smoothing,
        reference,
        preference_losses.info(settings.loss).get("per_token", False),
    )


@torch.no_grad()
def no_grad_logprobs(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        return sequence_logprobs(model, batch).float()
    finally:
        model.train(was_training)


class CachedReference:
    """Reference log-probabilities looked up by each segment's content, as a batch holds it."""

    def __init__(self, keys: list[str], logprobs: torch.Tensor):
        self.index = {key: position for position, key in enumerate(keys)}
        self.logprobs = logprobs

    def __call__(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        rows = [self.index[key] for key in segment_keys(batch)]
        return self.logprobs[rows].to(batch.input_ids.device)


def cached_reference(
    config: Config,
    units: list[Unit],
    runner: torch.nn.Module,
    reference_of,
    device: torch.device,
    max_tokens: int,
    world: World,
) -> CachedReference:
    """Read RUN/reference/ when it was made from this run's model and pairs, else compute and write it (the
    ranks share the passes; rank 0 writes)."""
    keys = [key for unit in units for key in segment_keys(collate([unit]))]
    manifest = {
        "format": CACHE_FORMAT,
        "model": model_identity(config.model),
        "adapter": config.adapter.type,
        "data": hashlib.blake2b("".join(keys).encode(), digest_size=16).hexdigest(),
        "segments": len(keys),
    }
    directory = config.output_dir / REFERENCE_CACHE
    tensors = read_cache(directory, manifest, CACHE_FILE)
    if tensors is None:
        if world.main:
            print(
                f"dpo: computing the reference log-probabilities of {len(units):,} pairs once (kept in {directory})",
                file=sys.stderr,
            )
        groups = consecutive_runs(units, max_tokens)
        mine = [(runner(reference_of, collate(group).to(device)).cpu(), real) for group, real in world.share(groups)]
        values = world.gather([value for value, real in mine if real], len(groups))
        tensors = {"logprobs": torch.cat(values).contiguous()}
        if world.main:
            write_cache(directory, tensors, manifest, CACHE_FILE)
    return CachedReference(keys, tensors["logprobs"])
