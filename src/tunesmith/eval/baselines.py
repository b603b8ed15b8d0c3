"""The systems a run is compared with, and what they read of the run: `base` (the run's base model: its adapter
switched off, or loaded once for a full fine-tuning run) and `few-shot:K` (the base model with K training examples
in its prompt, the prompt-engineering alternative to fine-tuning); the run's config, its data's column names and
its label set.
"""

from __future__ import annotations

import contextlib
import random
from pathlib import Path
from typing import Iterator

from tunesmith.config.schema import Config
from tunesmith.data.dataset import load_examples
from tunesmith.data.formats import Example
from tunesmith.engine.generation import Engine
from tunesmith.errors import UserError
from tunesmith.eval.tasks import Item, last_reply
from tunesmith.rundir import is_run_dir, read_run_config


def run_config(target: str) -> Config | None:
    """The config of the run `target` is; None for a model that is not a run."""
    return read_run_config(Path(target)) if is_run_dir(Path(target)) else None


def run_columns(config: Config | None) -> dict[str, str] | None:
    """The run's data.columns: how its own data files name the format's fields."""
    return (config.data.columns or None) if config else None


def label_set(items: list[Item], config: Config | None) -> list[str]:
    """Labels of the evaluation data together with those of the run's training data (if classification)."""
    labels = {str(item.expected) for item in items}
    train = config.data.train if config else None
    if train and Path(train).is_file():
        with contextlib.suppress(UserError):
            labels |= {
                last_reply(e)[1] for e in load_examples(Path(train), columns=run_columns(config)) if e.kind == "chat"
            }
    return sorted(labels)


def few_shot_prefix(
    shots: list[Example],
    k: int,
    labels: list[str],
    system_prompt: str | None,
    seed: int,
    task: str,
    source: str = "the shots file",
) -> list[dict[str, str]]:
    """K training examples as earlier turns (distinct answers first), after a system message naming the labels."""
    pool = [e for e in shots if e.kind == "chat"]
    if len(pool) < k:  # fewer shots than asked would be a different baseline under the asked-for name
        raise UserError(
            f"--baseline few-shot:{k} needs {k} example conversations, and {source} has {len(pool)} (of "
            f"{len(shots)} rows); fix: pass --shots FILE.jsonl with at least {k} conversations, or a "
            f"smaller K"
        )
    random.Random(f"tunesmith-shots:{seed}").shuffle(pool)
    chosen, seen = [], set()
    for example in pool:  # prefer examples with answers not yet shown: more of the label set in K shots
        if last_reply(example)[1] not in seen and len(chosen) < k:
            chosen.append(example)
            seen.add(last_reply(example)[1])
    chosen += [e for e in pool if e not in chosen][: k - len(chosen)]
    instruction = system_prompt or "You are a helpful assistant."
    if task == "classification":
        instruction += " Answer with exactly one of these labels: " + ", ".join(labels) + "."
    prefix = [{"role": "system", "content": instruction}]
    for example in chosen:
        prompt, reply = last_reply(example)
        prefix += [m for m in prompt if m["role"] != "system"] + [{"role": "assistant", "content": reply}]
    return prefix


@contextlib.contextmanager
def system_context(engine: Engine, name: str, config: Config | None, loaded: dict[str, Engine]) -> Iterator[Engine]:
    """The engine a system runs on: the target as it is; a baseline on the base model, which is the
    target with its adapter switched off, or (a full fine-tuning run) the run's base model loaded once.
    A model that is not a run is its own base: few-shot:K prompts it with shots, and `base` would be itself."""
    if name == "target":
        yield engine
        return
    if engine is not None and engine.has_adapter:
        with engine.base_model():
            yield engine
        return
    if config is None:
        if name != "base" and engine is not None:
            yield engine
            return
        raise UserError(
            f"--baseline {name} needs a run directory as the target (the baseline is its base "
            f"model); fix: evaluate a run, or evaluate the base model directly (few-shot:K then "
            f"prompts that model with K examples)"
        )
    if "base" not in loaded:
        loaded["base"] = Engine.load(config.model)
    yield loaded["base"]


def parse_baseline(name: str) -> int:
    """Shots for a baseline name: 0 for `base`, K for `few-shot:K`."""
    if name == "base":
        return 0
    prefix, _, count = name.partition(":")
    if prefix == "few-shot" and count.isdigit() and int(count) > 0:
        return int(count)
    raise UserError(f"--baseline {name!r} is not known; fix: use base or few-shot:K (e.g. few-shot:8)")
