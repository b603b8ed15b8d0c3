"""Knowledge distillation: the SFT loop, with a teacher's next-token distribution as a second target.

Setup loads the teacher (a model, or a finished run: its adapter on its base) and checks that it shares
the student's vocabulary; with `distill.cache: disk` the teacher runs once over the training data and its
top-k outputs go to RUN/teacher-cache/ (safetensors + manifest.json), reused by later epochs, resumed runs
and re-runs until the teacher, the data, the vocabulary or top_k change. The loop is `train_loop`
with the distillation loss (train/distill.py); the student is whatever `adapter.type` says, and the
validation loss stays the plain token cross-entropy, so a distilled run compares with an SFT run.
"""

from __future__ import annotations

import hashlib
import json
import sys
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch

from tunesmith.config.schema import Config
from tunesmith.data.dataset import PreparedData
from tunesmith.data.packing import collate
from tunesmith.data.tokenize import TokenizedExample
from tunesmith.engine.generation import Engine
from tunesmith.errors import UserError
from tunesmith.recipes.sft import train_loop
from tunesmith.registry import distill_losses, methods
from tunesmith.train import distributed
from tunesmith.train.distill import CachedTeacher, Distiller, LiveTeacher, example_key, teacher_top_k
from tunesmith.train.distributed import World
from tunesmith.train.session import RunResult
from tunesmith.train.tensor_cache import TEACHER_CACHE, model_identity, read_cache, write_cache

CACHE_FORMAT = 1  # bump when the files' layout changes, so old caches are rebuilt rather than misread
CACHE_FILE = "top_k.safetensors"


@methods.register("distill", accepts=("chat",))
def run_distill(config: Config) -> RunResult:
    return train_loop(config, accepts=("chat",), build_objective=partial(build_distill_loss, config))


def build_distill_loss(
    config: Config, data: PreparedData, runner: torch.nn.Module, tokenizer: Any, device: torch.device, world: World
) -> Distiller:
    """The distillation loss for this run, its teacher loaded (or its cache read) on `device`. Every rank holds
    the whole teacher; rank 0 alone fills the cache, which the others then read."""
    settings = config.distill
    divergence = distill_losses.get(settings.loss, key="distill.loss")
    load = partial(load_teacher, settings.teacher, config.model, distributed.inner(runner), tokenizer, device)
    if settings.cache == "disk":
        max_tokens = config.data.max_length * config.train.batch_size  # a training micro-batch's worth
        fill = partial(
            cached_teacher,
            config.output_dir / TEACHER_CACHE,
            load,
            settings.teacher,
            settings.top_k,
            data.train,
            tokenizer,
            device,
            max_tokens,
        )
        if world.main:
            fill()
        world.barrier()
        teacher = fill()
    else:
        teacher = LiveTeacher(load())
    return Distiller(teacher, divergence, settings.temperature, settings.alpha)


def load_teacher(
    spec: str, student_spec: str, student: torch.nn.Module, student_tokenizer: Any, device: torch.device
) -> torch.nn.Module:
    """The teacher on `device`, frozen: a run directory (base + adapter/, or model/) or any model spec."""
    try:
        engine = Engine.load(spec)  # the one place where a run directory or a model spec becomes a model
    except UserError as error:
        raise UserError(f"distill.teacher={spec}: {error.message}", error.problems) from None
    check_same_vocabulary(spec, engine.model, engine.tokenizer, student_spec, student, student_tokenizer)
    teacher = engine.model
    if next(teacher.parameters()).device != device:  # a 4-bit (QLoRA run) teacher is placed as it loads
        teacher = teacher.to(device)
    return teacher.requires_grad_(False)


def vocabulary_size(model: torch.nn.Module) -> int:
    """Rows of the model's output head (its logits' width)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return int(base.config.vocab_size)


def check_same_vocabulary(
    teacher_spec: str,
    teacher: torch.nn.Module,
    teacher_tokenizer: Any,
    student_spec: str,
    student: torch.nn.Module,
    student_tokenizer: Any,
) -> None:
    """KD compares two distributions token id by token id, so both models must read ids the same way."""
    theirs, mine = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    teacher_rows, student_rows = vocabulary_size(teacher), vocabulary_size(student)
    if theirs == mine and teacher_rows == student_rows:
        return
    differing = len(set(theirs.items()) ^ set(mine.items()))
    raise UserError(
        f"distill.teacher={teacher_spec} and model={student_spec} do not share a vocabulary (teacher: {len(theirs):,} "
        f"tokens, {teacher_rows:,} logits; student: {len(mine):,} tokens, {student_rows:,} logits; {differing:,} "
        f"token-id pairs in one and not the other); distillation compares their next-token distributions token by "
        f"token, so both must use the same tokenizer; fix: choose a teacher of the student's model family (the same "
        f"tokenizer), or train the student with method: sft on text the teacher generated"
    )


def cached_teacher(
    directory: Path,
    load: Callable[[], torch.nn.Module],
    teacher_spec: str,
    top_k: int,
    examples: list[TokenizedExample],
    tokenizer: Any,
    device: torch.device,
    max_tokens: int,
) -> CachedTeacher:
    """The teacher's top-k over the training examples: read from `directory` when its manifest matches this
    run, else computed (the teacher loaded only then) and written."""
    singles = [collate([example]) for example in examples]  # exactly as a batch holds each example
    keys = [example_key(single.input_ids[0], single.targets[0]) for single in singles]
    manifest = cache_manifest(teacher_spec, keys, top_k, tokenizer)
    tensors = read_cache(directory, manifest, CACHE_FILE)
    if tensors is None:
        print(
            f"distill: running the teacher once over {len(examples):,} examples (its top-{top_k} kept in {directory})",
            file=sys.stderr,
        )
        tensors = teacher_top_k(load(), examples, top_k, device, max_tokens)
        write_cache(directory, tensors, manifest, CACHE_FILE)
    return CachedTeacher(tensors["logprobs"], tensors["indices"], keys, [single.num_loss_tokens for single in singles])


def cache_manifest(teacher_spec: str, keys: list[str], top_k: int, tokenizer: Any) -> dict[str, Any]:
    """What a cache was computed from; a cache is reused only when all of it matches."""
    vocabulary = json.dumps(sorted(tokenizer.get_vocab().items()))
    return {
        "format": CACHE_FORMAT,
        "teacher": model_identity(teacher_spec),
        "data": hashlib.blake2b("".join(keys).encode(), digest_size=16).hexdigest(),
        "examples": len(keys),
        "vocabulary": hashlib.blake2b(vocabulary.encode(), digest_size=16).hexdigest(),
        "top_k": top_k,
        "log_probs": "natural log-softmax at temperature 1; distill.temperature is applied in training",
    }
