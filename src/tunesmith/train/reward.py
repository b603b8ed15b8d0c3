"""Reward models: one number per reply, read from the final hidden state of its last token, trained on pairs or scores.

A reward model is the base model loaded as a sequence classifier with one output (transformers'
`*ForSequenceClassification`; its `score` head maps a hidden state to a number). A sequence's reward is
the head applied at its last token that is not padding: the position transformers' classifier reads,
so a saved model gives plain transformers the same numbers. Each kind of data has its loss:

    pairs    {prompt, chosen, rejected}   -log sigmoid(r_chosen - r_rejected - margin)   Bradley-Terry
    scores   {prompt, response, score}    (r - (score - mean) / std)^2                   regression

Scores are standardised with the training set's mean and standard deviation (`ScoreScale`): the head
starts at zero, so the first prediction of every reply is the mean score, and the loss has the same
size whatever the data's units. The scale ships beside the weights; the model's raw output times std
plus mean is the score in the data's units.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from tunesmith.data.packing import Batch
from tunesmith.errors import UserError
from tunesmith.models.loading import CLASSIFIER_HEADS
from tunesmith.train.loss import hidden_states
from tunesmith.train.step import Objective

SCALE_FILE = "reward_scale.json"


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """(pairs,) Bradley-Terry: minus the log-probability that the chosen reply wins, by at least `margin`."""
    return -F.logsigmoid(chosen - rejected - margin)


def pointwise_loss(rewards: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(examples,) squared error against the (standardised) scores."""
    return (rewards - targets) ** 2


@dataclass(frozen=True)
class ScoreScale:
    """The training scores' mean and standard deviation: reward in the data's units = mean + std * model output."""

    mean: float
    std: float

    @classmethod
    def of(cls, scores: list[float], where: Path) -> "ScoreScale":
        mean = sum(scores) / len(scores)
        std = math.sqrt(sum((score - mean) ** 2 for score in scores) / len(scores))  # population: the data's spread
        if std == 0:
            raise UserError(f"{where}: every training score is {scores[0]:g}, so there is nothing to tell the replies "
                            f"apart by; fix: give replies of different quality different scores, or use pairs "
                            f"{{prompt, chosen, rejected}}")
        return cls(mean, std)

    def standardise(self, scores: torch.Tensor) -> torch.Tensor:
        return (scores - self.mean) / self.std

    def to_data_units(self, rewards: torch.Tensor) -> torch.Tensor:
        return rewards * self.std + self.mean

    def save(self, directory: Path) -> None:
        text = json.dumps({"mean": self.mean, "std": self.std, "meaning": "score = mean + std * model output"}, indent=1)
        (directory / SCALE_FILE).write_text(text, encoding="utf-8")

    @classmethod
    def load(cls, directory: Path) -> "ScoreScale | None":
        """The scale saved beside a reward model's weights; None for one trained on pairs (its output is the reward)."""
        path = directory / SCALE_FILE
        if not path.is_file():
            return None
        saved = json.loads(path.read_text(encoding="utf-8"))
        return cls(float(saved["mean"]), float(saved["std"]))


def classifier_head(model: torch.nn.Module) -> torch.nn.Module:
    """The sequence classifier's output head, through a PEFT wrapper (which trains and saves a copy of it)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for name in CLASSIFIER_HEADS:
        if isinstance(getattr(base, name, None), torch.nn.Module):
            return getattr(base, name)
    raise ValueError(f"{type(base).__name__} has no classifier head ({', '.join(CLASSIFIER_HEADS)})")


def pad_token_id(model: torch.nn.Module) -> int | None:
    """The padding id the classifier skips when it looks for a sequence's last token."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.config.pad_token_id


def reward_positions(batch: Batch, pad_id: int | None) -> torch.Tensor:
    """(segments,) the flat position of each segment's last token that is not `pad_id`, as transformers'
    classifiers choose it (a template may end a reply with the padding token; it is then skipped)."""
    lengths = torch.tensor(batch.segment_lengths, device=batch.input_ids.device)
    ends = lengths.cumsum(0)  # exclusive
    if pad_id is None:
        return ends - 1
    positions = torch.arange(batch.num_tokens, device=lengths.device)
    real = batch.input_ids[0] != pad_id
    last = torch.full_like(lengths, -1).scatter_reduce(0, batch.example_index()[real], positions[real], reduce="amax")
    return torch.where(last >= 0, last, ends - lengths)  # all padding: the first token, as transformers does


def sequence_rewards(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """(segments,) each sequence's reward (the model's raw output), differentiable, in float32."""
    hidden = hidden_states(model, batch)[0]  # (T, H)
    last = hidden[reward_positions(batch, pad_token_id(model))]  # (segments, H)
    return classifier_head(model)(last)[:, 0].float()


class RewardObjective(Objective):
    """A reward model's loss: Bradley-Terry on pairs (two segments per unit, chosen then rejected), or squared
    error on standardised scores (one segment per unit). Both are per unit, so a step averages over pairs or
    replies.

    Logged (means over the units since the last report): on pairs, how often the chosen reply scores higher
    (reward accuracy), the mean margin and the mean chosen and rejected rewards; on scores, the squared and
    absolute errors in the data's units.
    """

    def __init__(self, margin: float = 0.0, scale: ScoreScale | None = None):
        self.margin, self.scale = margin, scale

    def count(self, batch: Batch) -> int:
        return batch.num_units

    def __call__(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        rewards = sequence_rewards(model, batch)
        if batch.scores is None:
            if len(batch.segment_lengths) != 2 * batch.num_units:
                raise ValueError("a pair batch holds two segments per unit, chosen then rejected")
            chosen, rejected = rewards[0::2], rewards[1::2]
            self.record({"reward_accuracy": (chosen > rejected).float(), "reward_margin": chosen - rejected,
                         "reward_chosen": chosen, "reward_rejected": rejected})
            return pairwise_loss(chosen, rejected, self.margin).sum()
        assert self.scale is not None, "scored replies are trained with the training set's scale"
        scores = batch.scores.to(rewards.device)
        error = self.scale.to_data_units(rewards.detach()) - scores
        self.record({"mse": error ** 2, "mae": error.abs()})
        return pointwise_loss(rewards, self.scale.standardise(scores)).sum()

    def save(self, directory: Path) -> None:
        if self.scale is not None:
            self.scale.save(directory)
