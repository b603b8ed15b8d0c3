"""A classifier's loss: cross-entropy of each sequence's class, read at its last token (method classify)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunesmith.data.packing import Batch
from tunesmith.engine.reward_model import sequence_logits
from tunesmith.train.step import Objective


class ClassifyObjective(Objective):
    """Cross-entropy of each sequence's label over the classifier's outputs (with `label_smoothing`), summed over
    the sequences; a step averages over them. Logged: accuracy (means over the sequences since the last report)."""

    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = label_smoothing

    def count(self, batch: Batch) -> int:
        return batch.num_units

    def __call__(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        logits = sequence_logits(model, batch)  # (segments, classes)
        labels = batch.labels.to(logits.device)
        self.record({"accuracy": (logits.detach().argmax(dim=-1) == labels).float()})
        return F.cross_entropy(logits, labels, reduction="sum", label_smoothing=self.label_smoothing)
