"""Knowledge distillation: the student learns the teacher's next-token distribution besides the data's tokens.

    loss = (1 - alpha) * CE(student, data targets) + alpha * T^2 * D(teacher, student, both at temperature T)

summed (not averaged) over the batch's target positions; the caller divides by the step's target count, as
for `token_loss_sum`. D is a registered divergence between two log-distributions over one support:

- on the fly (`LiveTeacher`): the teacher runs on every batch and the support is the whole vocabulary;
- cached (`CachedTeacher`, `distill.cache: disk`): the teacher ran once over the training data and kept its
  top-k log-probabilities per target position; the support is those k tokens and both distributions are
  renormalised over them. That drops the teacher's tail (the mass outside its top k): exact when k covers
  the vocabulary, an approximation otherwise, and the usual one (the stored logits of most KD pipelines).

Scaling by T^2 keeps the KD gradients the size of the cross-entropy's as T grows (Hinton et al., 2015).
Logits exist for HEAD_CHUNK target positions at a time, and in training each chunk is recomputed in
backward (activation checkpointing), so no (tokens, vocab) matrix is ever held, not even for backward.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tunesmith.data.packing import IGNORE, Batch, collate, consecutive_runs
from tunesmith.data.tokenize import TokenizedExample
from tunesmith.engine.forward import (
    HEAD_CHUNK,
    balanced_hidden_states,
    decoder_and_head,
    hidden_states,
    target_logits,
)
from tunesmith.registry import distill_losses
from tunesmith.train.step import Objective

Divergence = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (student, teacher) log-probs (N, S) -> sum


@distill_losses.register("forward_kl")
def forward_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """sum over rows of KL(teacher || student) = sum p_t (log p_t - log p_s): mass-covering, Hinton's KD."""
    return (teacher.exp() * (teacher - student)).sum()


@distill_losses.register("reverse_kl")
def reverse_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """sum over rows of KL(student || teacher) = sum p_s (log p_s - log p_t): mode-seeking (MiniLLM)."""
    return (student.exp() * (student - teacher)).sum()


def tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / T) over the last dimension, in float32."""
    return F.log_softmax(logits.float() / temperature, dim=-1)


class LiveTeacher:
    """The teacher model, run on every batch under no_grad in eval mode: the KL spans the full vocabulary."""

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval().requires_grad_(False)
        _, self.head = decoder_and_head(model)

    @torch.no_grad()
    def rows(self, batch: Batch) -> tuple[torch.Tensor, ...]:
        """(N, H_teacher) teacher hidden states at the batch's target positions; the head is applied per chunk."""
        return (hidden_states(self.model, batch)[batch.targets != IGNORE],)

    def log_probs(
        self, student_logits: torch.Tensor, rows: tuple[torch.Tensor, ...], temperature: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        (teacher_hidden,) = rows
        with torch.no_grad():
            teacher_logits = self.head(teacher_hidden)  # (n, V)
        return tempered(student_logits, temperature), tempered(teacher_logits, temperature)


class CachedTeacher:
    """The teacher's top-k log-probabilities (at T = 1) per target position, looked up by example content.

    Examples are found by a hash of their tokens and targets (`example_key`), not by their place in the
    data: a batch in any order, packing or epoch finds its rows, and resuming needs no bookkeeping.
    """

    def __init__(self, logprobs: torch.Tensor, indices: torch.Tensor, keys: list[str], counts: list[int]):
        self.logprobs, self.indices = (
            logprobs,
            indices,
        )  # (P, k) float32, (P, k) int32: every example's targets, in order
        offsets = [0]
        for count in counts:
            offsets.append(offsets[-1] + count)
        assert offsets[-1] == logprobs.shape[0], "cache rows do not match the examples' target counts"
        self.spans = {key: (offsets[i], offsets[i + 1]) for i, key in enumerate(keys)}

    def rows(self, batch: Batch) -> tuple[torch.Tensor, ...]:
        """(N, k) log-probabilities and (N, k) token ids for the batch's target positions, in order."""
        spans = []
        for key in segment_keys(batch):
            if key not in self.spans:
                raise RuntimeError(
                    "a training example is missing from the teacher cache; the cache was built from "
                    "other data (delete RUN/teacher-cache/ to rebuild it)"
                )
            spans.append(torch.arange(*self.spans[key]))
        picks = torch.cat(spans)
        device = batch.targets.device
        return self.logprobs[picks].to(device), self.indices[picks].to(device, torch.long)

    def log_probs(
        self, student_logits: torch.Tensor, rows: tuple[torch.Tensor, ...], temperature: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Both renormalised over the teacher's k tokens: log_softmax(log p / T) over k is the top-k of
        # softmax(z / T) renormalised, since log p = z - logsumexp(z) and the constant cancels.
        logprobs, indices = rows
        return tempered(student_logits.gather(1, indices), temperature), tempered(logprobs, temperature)


@dataclass
class Distiller(Objective):
    """The training loss of `method: distill`: summed over target tokens, like the token loss it extends."""

    teacher: LiveTeacher | CachedTeacher
    divergence: Divergence
    temperature: float
    alpha: float

    def __call__(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        _, head = decoder_and_head(model)
        keep = batch.targets != IGNORE
        hidden, balance = balanced_hidden_states(model, batch)
        hidden, targets = hidden[keep], batch.targets[keep]  # (N, H), (N,)
        teacher_rows = self.teacher.rows(batch)  # tensors of N rows each
        total = torch.zeros((), dtype=torch.float32, device=targets.device)
        for start in range(0, targets.shape[0], HEAD_CHUNK):
            chunk = slice(start, start + HEAD_CHUNK)
            args = (head, hidden[chunk], targets[chunk], *(rows[chunk] for rows in teacher_rows))
            if torch.is_grad_enabled():  # keep only this chunk's inputs; its logits are recomputed in backward
                total = total + checkpoint(self.chunk_loss, *args, use_reentrant=False)
            else:
                total = total + self.chunk_loss(*args)
        if balance is not None:  # a mixture of experts: its routers' balance loss, once per target, as the token loss
            total = total + balance * targets.shape[0]
        return total

    def chunk_loss(
        self, head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, *teacher_rows: torch.Tensor
    ) -> torch.Tensor:
        logits = head(hidden).float()  # (n, V)
        cross_entropy = F.cross_entropy(logits, targets, reduction="sum")
        student, teacher = self.teacher.log_probs(logits, teacher_rows, self.temperature)
        distill = self.divergence(student, teacher) * self.temperature**2
        return (1.0 - self.alpha) * cross_entropy + self.alpha * distill


def example_key(input_ids: torch.Tensor, targets: torch.Tensor) -> str:
    """Content address of one example as a batch holds it: its (T,) token ids and (T,) targets."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(input_ids.cpu().numpy().tobytes())
    digest.update(targets.cpu().numpy().tobytes())
    return digest.hexdigest()


def segment_keys(batch: Batch) -> list[str]:
    """The `example_key` of each example packed into `batch`, in order."""
    lengths = list(batch.segment_lengths)
    pieces = zip(batch.input_ids[0].cpu().split(lengths), batch.targets[0].cpu().split(lengths))
    return [example_key(ids, targets) for ids, targets in pieces]


@torch.no_grad()
def teacher_top_k(
    teacher: torch.nn.Module, examples: list[TokenizedExample], top_k: int, device: torch.device, max_tokens: int
) -> dict[str, torch.Tensor]:
    """The teacher's top-k log-probabilities (T = 1) and token ids at every target position of `examples`, in
    order: {"logprobs": (P, k) float32, "indices": (P, k) int32}, P the examples' target count."""
    teacher.eval()
    logprobs, indices = [], []
    for group in consecutive_runs(examples, max_tokens):
        for logits, _, _ in target_logits(teacher, collate(group).to(device)):
            top = F.log_softmax(logits, dim=-1).topk(min(top_k, logits.shape[-1]), dim=-1)
            logprobs.append(top.values.cpu())
            indices.append(top.indices.to(torch.int32).cpu())
    return {"logprobs": torch.cat(logprobs).contiguous(), "indices": torch.cat(indices).contiguous()}
