"""Reward model: the base model with a one-output score head, trained on preference pairs or on scored replies.

The loop is the SFT loop (`train_loop`) with the base loaded as a sequence classifier (`num_labels=1`, its new
head at zero) and `RewardObjective` (train/reward_loss.py) as its loss and validation loss. The data picks the
loss: {prompt, chosen, rejected} pairs train Bradley-Terry, {prompt, response, score} rows regress on the
scores, standardised with the training set's mean and standard deviation (kept beside the weights in
reward_scale.json).

What it saves loads in plain transformers as a sequence classifier with one output: full fine-tuning (and
`freeze`) writes RUN/model/ for `AutoModelForSequenceClassification.from_pretrained`; LoRA (and QLoRA,
DoRA) writes RUN/adapter/ in PEFT's SEQ_CLS format, the trained score head inside it, for
`PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(BASE, num_labels=1), ADAPTER)`.
`tunesmith score RUN`, `tunesmith eval RUN` and `rl.reward_model: RUN` load the run itself (engine/reward_model.py).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from tunesmith.config.schema import Config
from tunesmith.data.dataset import PreparedData
from tunesmith.data.tokenize import TokenizedPair, Unit
from tunesmith.engine.reward_model import ScoreScale
from tunesmith.errors import UserError
from tunesmith.recipes.sft import train_loop
from tunesmith.registry import methods
from tunesmith.train.distributed import World
from tunesmith.train.reward_loss import RewardObjective
from tunesmith.train.session import RunResult, check_classifier_settings

ACCEPTS = ("preference", "score")


@methods.register("reward", accepts=ACCEPTS)
def run_reward(config: Config) -> RunResult:
    check_classifier_settings(config, "reward model", "val_reward_accuracy or val_mse")
    return train_loop(
        config,
        accepts=ACCEPTS,
        build_objective=partial(build_reward_objective, config),
        validate_objective=True,
        num_labels=1,
    )


def build_reward_objective(
    config: Config, data: PreparedData, runner: torch.nn.Module, tokenizer: Any, device: torch.device, world: World
) -> RewardObjective:
    kind = data_kind(data.train)
    if data.validation and data_kind(data.validation) != kind:
        raise UserError(
            f"{config.data.validation or config.data.train}: the validation rows hold {data_kind(data.validation)} "
            f"data and the training rows {kind} data; fix: validate on the same kind of rows you train on"
        )
    if kind == "pairs":
        return RewardObjective(margin=config.reward.margin)
    if config.reward.margin:
        raise UserError(
            f"reward.margin={config.reward.margin} applies to pairs, and {config.data.train} holds scored "
            f"replies; fix: remove reward.margin"
        )
    return RewardObjective(scale=ScoreScale.of([unit.score for unit in data.train], config.data.train))


def data_kind(units: list[Unit]) -> str:
    return "pairs" if isinstance(units[0], TokenizedPair) else "scores"
