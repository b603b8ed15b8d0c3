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

from pathlib import Path

import torch
import torch.nn.functional as F

from tunesmith.data.packing import Batch
from tunesmith.engine.reward_model import ScoreScale, sequence_rewards
from tunesmith.train.step import Objective


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """(pairs,) Bradley-Terry: minus the log-probability that the chosen reply wins, by at least `margin`."""
    return -F.logsigmoid(chosen - rejected - margin)


def pointwise_loss(rewards: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(examples,) squared error against the (standardised) scores."""
    return (rewards - targets) ** 2


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
            self.record(
                {
                    "reward_accuracy": (chosen > rejected).float(),
                    "reward_margin": chosen - rejected,
                    "reward_chosen": chosen,
                    "reward_rejected": rejected,
                }
            )
            return pairwise_loss(chosen, rejected, self.margin).sum()
        assert self.scale is not None, "scored replies are trained with the training set's scale"
        scores = batch.scores.to(rewards.device)
        error = self.scale.to_data_units(rewards.detach()) - scores
        self.record({"mse": error**2, "mae": error.abs()})
        return pointwise_loss(rewards, self.scale.standardise(scores)).sum()

    def save(self, directory: Path) -> None:
        if self.scale is not None:
            self.scale.save(directory)
