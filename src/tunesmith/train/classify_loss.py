"""A classifier's loss: cross-entropy of each sequence's class, read at its last token (method classify)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunesmith.data.packing import Batch
from tunesmith.engine.reward_model import sequence_logits
from tunesmith.train.step import Objective


def balanced_weights(labels: list[int], classes: int) -> torch.Tensor:
    """(classes,) n / (classes x count) per class: each class weighs as much in total, and when every class has
    examples (as in the training data the labels come from) the examples' weights average 1. A class without
    examples gets weight 0."""
    counts = torch.bincount(torch.tensor(labels), minlength=classes).float()
    return torch.where(counts > 0, len(labels) / (classes * counts.clamp(min=1)), torch.zeros(()))


def class_loss(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Summed cross-entropy of (n, classes) logits against (n,) labels, each example scaled by its label's weight."""
    losses = F.cross_entropy(logits, labels, reduction="none", label_smoothing=label_smoothing)
    return (losses * weights.to(losses.device)[labels]).sum() if weights is not None else losses.sum()


class ClassifyObjective(Objective):
    """Cross-entropy of each sequence's label over the classifier's outputs (with `label_smoothing`, and per-class
    `weights`), summed over the sequences; a step averages over them. Logged: accuracy (means over the sequences
    since the last report)."""

    def __init__(self, label_smoothing: float = 0.0, weights: torch.Tensor | None = None):
        self.label_smoothing, self.weights = label_smoothing, weights

    def count(self, batch: Batch) -> int:
        return batch.num_units

    def __call__(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        logits = sequence_logits(model, batch)  # (segments, classes)
        labels = batch.labels.to(logits.device)
        self.record({"accuracy": (logits.detach().argmax(dim=-1) == labels).float()})
        return class_loss(logits, labels, self.weights, self.label_smoothing)
