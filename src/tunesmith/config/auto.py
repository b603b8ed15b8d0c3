"""The training settings a config leaves "auto" (its defaults): epochs, batch size and learning rate, resolved from
the data before training (train/session.py: `open_session`) and printed with the reason for each value. The
service's "auto" hyperparameters are the same rules (serve/jobs.py).

* **batch size**: about EXAMPLES_PER_STEP examples per optimizer step, fewer on small data (one per 50 examples,
  at least 1), so a step's gradient is neither noise nor one average of everything. With packing, a row holds
  several examples, and the batch counts rows.
* **epochs**: enough passes for MIN_STEPS optimizer steps (1 to MAX_EPOCHS): the default model needs a few hundred
  updates to learn a task, and a small file in one pass gives it a handful (issue 23: 1,500 banking77 rows in one
  epoch of batch 8 x 1,024 packed tokens made 7 steps, and learned nothing).
* **learning rate**: by adapter type and method. LoRA's family trains small low-rank updates and takes a rate
  near 1e-3 (the main job's, measured on SmolLM2-135M); full fine-tuning moves every weight and takes 5e-5;
  soft prompts learn a few embeddings from scratch and take 3e-2; preference and RL objectives are steeper and
  take a tenth of the rate.
* **head learning rate**: a sequence classifier's head (classify, reward) starts from zero and learns from scratch,
  so it trains at train.lr but at least HEAD_LR, whatever the body's rate (full fine-tuning's 5e-5 left it at
  60.7% on banking77 in bench/classify.py's 150 steps).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

from tunesmith.config.schema import Config

EXAMPLES_PER_STEP = 16
EXAMPLES_PER_BATCH_UNIT = 50  # small data: one example per step for every 50 in the file
MIN_STEPS = 200
MAX_EPOCHS = 10
ADAPTER_LR = {
    "lora": 1e-3,
    "qlora": 1e-3,
    "dora": 1e-3,
    "ia3": 3e-3,
    "llama_adapter": 3e-3,
    "prompt_tuning": 3e-2,
    "prefix_tuning": 3e-2,
    "full": 5e-5,
    "freeze": 5e-5,
}
HEAD_LR = 1e-3  # the least a zero-initialised classifier head trains at (full fine-tuning's 5e-5 barely moves it)
HEAD_METHODS = ("classify", "reward")  # the methods that train a sequence classifier's new head
STEEP_METHODS = ("dpo", "ppo", "grpo", "rft")  # their objectives take a tenth of the supervised rate
RL_METHODS, RL_BATCH = ("ppo", "grpo", "rft"), 8
AUTO_FIELDS = ("epochs", "batch_size", "lr")


@dataclass(frozen=True)
class Setting:
    value: int | float
    reason: str


def resolve_settings(
    method: str, adapter: str, examples: int, per_row: float, *, max_steps: int | None = None
) -> dict[str, Setting]:
    """epochs, batch_size and lr for `examples` training examples packed `per_row` to a row (1 without packing).
    RL methods (ppo, grpo) count prompts, each answered with generated replies: RL_BATCH prompts a step, one pass."""
    if method in RL_METHODS:
        return {
            "batch_size": Setting(RL_BATCH, f"{RL_BATCH} prompts per step, each answered with generated replies"),
            "epochs": Setting(1, "one pass over the prompts (RL steps generate, which costs most)"),
            "lr": learning_rate(method, adapter),
        }
    wanted = max(1, min(EXAMPLES_PER_STEP, examples // EXAMPLES_PER_BATCH_UNIT))
    batch = max(1, round(wanted / per_row))
    per_step = batch * per_row
    steps = max(1, math.ceil(examples / per_step))
    aim = f"aiming at {wanted}" + (
        f" = {examples:,} examples / {EXAMPLES_PER_BATCH_UNIT}" if wanted < EXAMPLES_PER_STEP else ""
    )
    shape = (
        f"{batch} packed row{'s' if batch > 1 else ''} per step, about {per_step:.0f} examples"
        if per_row > 1
        else f"{batch} example{'s' if batch > 1 else ''} per step"
    )
    settings = {"batch_size": Setting(batch, f"{shape}, {aim}")}
    if max_steps is not None:
        settings["epochs"] = Setting(1, f"train.max_steps={max_steps} sets the length")
    else:
        epochs = max(1, min(MAX_EPOCHS, math.ceil(MIN_STEPS / steps)))
        if epochs == 1:
            why = f"one pass is at least {MIN_STEPS}"
        elif epochs == MAX_EPOCHS and steps * epochs < MIN_STEPS:
            why = f"at most {MAX_EPOCHS} passes"
        else:
            why = f"at least {MIN_STEPS} to learn"
        made = f"{epochs} epoch{'s make' if epochs > 1 else ' makes'} {steps * epochs:,} steps"
        settings["epochs"] = Setting(epochs, f"{steps:,} steps per epoch; {made}, {why}")
    settings["lr"] = learning_rate(method, adapter)
    return settings


def learning_rate(method: str, adapter: str) -> Setting:
    rate = ADAPTER_LR.get(adapter, ADAPTER_LR["lora"])
    steep = method in STEEP_METHODS
    return Setting(
        rate / 10 if steep else rate, f"adapter {adapter}" + (f", method {method} (a tenth)" if steep else "")
    )


def head_learning_rate(train) -> float:
    """The peak learning rate of a sequence classifier's head: train.head_lr, or for "auto" train.lr but at least
    HEAD_LR."""
    return max(train.lr, HEAD_LR) if train.head_lr == "auto" else train.head_lr


def resolve_training(config: Config, examples: int, per_row: float, announce: bool = True) -> dict[str, Setting]:
    """Replace the config's "auto" epochs, batch size and learning rate with their values for `examples` training
    examples packed `per_row` to a row (in place, so the run's config.yaml records them), printing each with its
    reason; returns what it resolved."""
    train = config.train
    auto = [name for name in AUTO_FIELDS if getattr(train, name) == "auto"]
    chosen = {}
    if auto:
        settings = resolve_settings(config.method, config.adapter.type, examples, per_row, max_steps=train.max_steps)
        for name in auto:
            setattr(train, name, settings[name].value)
            chosen[name] = settings[name]
    if train.head_lr == "auto":
        train.head_lr = head_learning_rate(train)
        if config.method in HEAD_METHODS and train.head_lr != train.lr:
            chosen["head_lr"] = Setting(train.head_lr, f"at least {HEAD_LR:g}: the new head starts from zero")
    if announce:
        for name, setting in chosen.items():
            print(f"auto: train.{name}={setting.value:g} ({setting.reason})", file=sys.stderr)
    return chosen
