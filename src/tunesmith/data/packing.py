"""Tokenised examples → packed rows → micro-batches, in a deterministic order that a checkpoint can resume.

A row holds whole examples back to back (packing) or one example; a micro-batch is `batch_size` rows
padded only to its longest row. Attention is block-diagonal causal: a token sees earlier tokens of
its own example only, and positions restart at 0 for each example, so a packed row computes exactly
what the examples would compute alone.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from tunesmith.data.tokenize import TokenizedExample

IGNORE = -100  # target value that the loss skips
PACKING_WINDOW = 2048  # examples sorted together when packing: bounds the shuffle's locality, keeps O(n log n)


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) long
    targets: torch.Tensor  # (B, T) long: the next token where it is trained, else IGNORE
    position_ids: torch.Tensor  # (B, T) long: restarts at 0 for each example
    attention_mask: torch.Tensor | None  # (B, 1, T, T) bool, True where a query may attend to a key; None: plain causal
    num_loss_tokens: int
    num_tokens: int  # real (non-padding) tokens

    def to(self, device: torch.device | str) -> "Batch":
        mask = self.attention_mask.to(device) if self.attention_mask is not None else None
        return Batch(self.input_ids.to(device), self.targets.to(device), self.position_ids.to(device), mask,
                     self.num_loss_tokens, self.num_tokens)


def pack_rows(lengths: list[int], capacity: int, order: list[int]) -> list[list[int]]:
    """Group example indices into rows of at most `capacity` tokens, first-fit decreasing per window.

    Within each window of the (shuffled) order, longest examples are placed first into the first row
    with room; this leaves only a few tokens of padding per row while keeping the order random overall.
    """
    rows: list[list[int]] = []
    for window_start in range(0, len(order), PACKING_WINDOW):
        window = sorted(order[window_start: window_start + PACKING_WINDOW], key=lambda i: -lengths[i])
        window_rows: list[list[int]] = []
        room: list[int] = []
        for index in window:
            for row_number, free in enumerate(room):
                if lengths[index] <= free:
                    window_rows[row_number].append(index)
                    room[row_number] -= lengths[index]
                    break
            else:
                window_rows.append([index])
                room.append(capacity - lengths[index])
        rows.extend(window_rows)
    return rows


def epoch_rows(lengths: list[int], capacity: int, packing: bool, seed: int, epoch: int) -> list[list[int]]:
    """The rows of one epoch in training order; the same (seed, epoch) always gives the same rows."""
    rng = random.Random(f"tunesmith:{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if not packing:
        return [[index] for index in order]
    rows = pack_rows(lengths, capacity, order)
    rng.shuffle(rows)
    return rows


def shifted_targets(example: TokenizedExample) -> list[int]:
    """targets[t] = input_ids[t+1] where that token is trained; the last position predicts nothing.

    Shifting per example (not per row) means no example is ever asked to predict its neighbour's first token.
    """
    ids, mask = example.input_ids, example.loss_mask
    return [ids[t + 1] if mask[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]


def collate(rows: list[list[TokenizedExample]], pad_id: int) -> Batch:
    """Build one micro-batch from rows of examples (each row's examples are packed back to back)."""
    width = max(sum(len(example) for example in row) for row in rows)
    batch_size = len(rows)
    input_ids = torch.full((batch_size, width), pad_id, dtype=torch.long)
    targets = torch.full((batch_size, width), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((batch_size, width), dtype=torch.long)
    segment = torch.full((batch_size, width), -1, dtype=torch.long)  # which example each token belongs to
    for row_number, row in enumerate(rows):
        cursor = 0
        for example_number, example in enumerate(row):
            n = len(example)
            input_ids[row_number, cursor: cursor + n] = torch.tensor(example.input_ids)
            targets[row_number, cursor: cursor + n] = torch.tensor(shifted_targets(example))
            position_ids[row_number, cursor: cursor + n] = torch.arange(n)
            segment[row_number, cursor: cursor + n] = example_number
            cursor += n
    num_tokens = int((segment >= 0).sum())
    if all(len(row) == 1 for row in rows):
        # One example per row, padding only at the tail: plain causal attention is exact for every real token
        # (none attends to a later position), and it lets SDPA use its fused kernel instead of a (B, H, T, T)
        # mask and saved attention probabilities (~1 GB at 4 x 512 on the default model).
        # Positions run on through the padding: restarting positions would read as packed sequences to transformers.
        position_ids = torch.arange(width).expand(batch_size, width).contiguous()
        return Batch(input_ids, targets, position_ids, None, int((targets != IGNORE).sum()), num_tokens)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same_example = segment[:, :, None] == segment[:, None, :]
    padding = segment < 0
    # Padding queries attend only to themselves: a fully masked row would give NaN in softmax.
    eye = torch.eye(width, dtype=torch.bool)
    attention = (same_example & ~padding[:, None, :] & causal) | (padding[:, :, None] & eye)
    return Batch(input_ids, targets, position_ids, attention[:, None], int((targets != IGNORE).sum()), num_tokens)


@dataclass
class BatchPlan:
    """Which rows go into which micro-batch and optimizer step, for every epoch; resumable by position."""

    examples: list[TokenizedExample]
    capacity: int
    packing: bool
    batch_size: int
    grad_accum: int
    seed: int
    pad_id: int

    def __post_init__(self) -> None:
        self.lengths = [len(example) for example in self.examples]
        self._rows_cache: dict[int, list[list[int]]] = {}

    def rows(self, epoch: int) -> list[list[int]]:
        if epoch not in self._rows_cache:
            self._rows_cache = {epoch: epoch_rows(self.lengths, self.capacity, self.packing, self.seed, epoch)}
        return self._rows_cache[epoch]

    @property
    def rows_per_step(self) -> int:
        return self.batch_size * self.grad_accum

    def steps_in_epoch(self, epoch: int) -> int:
        return -(-len(self.rows(epoch)) // self.rows_per_step)

    def step(self, epoch: int, step_in_epoch: int) -> list[Batch]:
        """The micro-batches of one optimizer step (the last step of an epoch may be smaller)."""
        rows = self.rows(epoch)
        first = step_in_epoch * self.rows_per_step
        step_rows = rows[first: first + self.rows_per_step]
        micro = [step_rows[i: i + self.batch_size] for i in range(0, len(step_rows), self.batch_size)]
        return [collate([[self.examples[index] for index in row] for row in rows_], self.pad_id) for rows_ in micro]

    def eval_batches(self) -> list[Batch]:
        """Validation micro-batches: every example once, in file order."""
        rows = pack_rows(self.lengths, self.capacity, list(range(len(self.examples)))) if self.packing \
            else [[index] for index in range(len(self.examples))]
        chunks = [rows[i: i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
        return [collate([[self.examples[index] for index in row] for row in chunk], self.pad_id) for chunk in chunks]
