"""Tokenised examples → packed rows → micro-batches, in a deterministic order that a checkpoint can resume.

A row holds whole examples up to `capacity` tokens (packing) or one example; a micro-batch is
`batch_size` rows, laid end to end as one flat sequence with no padding (`Batch`). Rows bound the
tokens a micro-batch holds (its memory); the flat layout means no token is ever padding. With a token
budget (train.micro_batch_tokens), a step's units are instead cut into the fewest even pieces of at most
that many tokens: activation memory follows the budget, and the step's gradient is the same.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import torch

from tunesmith.data.tokenize import TokenizedExample, Unit

IGNORE = -100  # target value that the loss skips
PACKING_WINDOW = 2048  # examples sorted together when packing: bounds the shuffle's locality, keeps O(n log n)


@dataclass
class Batch:
    """A micro-batch as one flat row: its examples back to back, no padding anywhere.

    Attention stays inside each example (models/attention.py reads `segment_lengths`), positions restart
    at 0 for each example and targets are shifted per example, so the row computes exactly what each
    example would compute alone, and every token the model sees is a real one.
    """

    input_ids: torch.Tensor  # (1, T) long
    targets: torch.Tensor  # (1, T) long: the next token where it is trained, else IGNORE
    position_ids: torch.Tensor  # (1, T) long: restarts at 0 for each example
    segment_lengths: tuple[int, ...]  # the examples' lengths, in order; they sum to T
    num_loss_tokens: int
    num_units: int = 0  # examples, or preference pairs (each two segments, chosen then rejected)
    scores: torch.Tensor | None = None  # (segments,) float: pointwise reward data's scores
    labels: torch.Tensor | None = None  # (segments,) long: classification data's class indices
    filler: bool = False  # a copy that only keeps the ranks in step (train/distributed.py): it counts for nothing

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(
            self.input_ids.to(device),
            self.targets.to(device),
            self.position_ids.to(device),
            self.segment_lengths,
            self.num_loss_tokens,
            self.num_units,
            self.scores.to(device) if self.scores is not None else None,
            self.labels.to(device) if self.labels is not None else None,
            self.filler,
        )

    def example_index(self) -> torch.Tensor:
        """(T,) which example each position belongs to."""
        lengths = torch.tensor(self.segment_lengths, device=self.input_ids.device)
        return torch.repeat_interleave(torch.arange(len(self.segment_lengths), device=lengths.device), lengths)


def pack_rows(lengths: list[int], capacity: int, order: list[int]) -> list[list[int]]:
    """Group example indices into rows of at most `capacity` tokens, first-fit decreasing per window.

    Within each window of the (shuffled) order, longest examples are placed first into the first row
    with room; this leaves only a few tokens of padding per row while keeping the order random overall.
    """
    rows: list[list[int]] = []
    for window_start in range(0, len(order), PACKING_WINDOW):
        window = sorted(order[window_start : window_start + PACKING_WINDOW], key=lambda i: -lengths[i])
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


def collate(units: list[Unit]) -> Batch:
    """One flat micro-batch of `units` (examples, or pairs as chosen then rejected), back to back."""
    examples = [segment for unit in units for segment in unit.segments()]
    input_ids = torch.tensor([token for example in examples for token in example.input_ids], dtype=torch.long)
    targets = torch.tensor([target for example in examples for target in shifted_targets(example)], dtype=torch.long)
    position_ids = torch.cat([torch.arange(len(example)) for example in examples])
    scores = None
    if any(example.score is not None for example in examples):
        scores = torch.tensor([example.score for example in examples], dtype=torch.float32)
    labels = None
    if any(example.label is not None for example in examples):
        labels = torch.tensor([example.label for example in examples], dtype=torch.long)
    return Batch(
        input_ids[None],
        targets[None],
        position_ids[None],
        tuple(len(example) for example in examples),
        int((targets != IGNORE).sum()),
        len(units),
        scores,
        labels,
    )


def micro_batch_units(
    examples: list[Unit], rows: list[list[int]], batch_size: int, max_tokens: int | None = None
) -> list[list[Unit]]:
    """The units of each micro-batch: `batch_size` rows each (rows hold indices into `examples`), in order; with
    `max_tokens`, the rows' units in even pieces of at most that many tokens (`even_pieces`) instead."""
    if max_tokens is None:
        return [
            [examples[index] for row in rows[start : start + batch_size] for index in row]
            for start in range(0, len(rows), batch_size)
        ]
    return even_pieces([examples[index] for row in rows for index in row], max_tokens)


def collate_rows(
    examples: list[Unit], rows: list[list[int]], batch_size: int, max_tokens: int | None = None
) -> list[Batch]:
    """The micro-batches `micro_batch_units` describes, collated."""
    return [collate(units) for units in micro_batch_units(examples, rows, batch_size, max_tokens)]


def consecutive_runs(units: list[Unit], max_tokens: int) -> list[list[Unit]]:
    """`units` in order, each run filled until the next unit would pass `max_tokens` (a longer unit runs alone):
    the fewest runs under that cap."""
    runs: list[list[Unit]] = []
    size = 0
    for unit in units:
        if not runs or size + len(unit) > max_tokens:
            runs.append([])
            size = 0
        runs[-1].append(unit)
        size += len(unit)
    return runs


def even_pieces(units: list[Unit], max_tokens: int) -> list[list[Unit]]:
    """`units` in order, cut into the fewest runs of at most `max_tokens` tokens (a longer unit is a run alone),
    with the largest run as small as that number of runs allows: [1500, 1500] rather than [2048, 952] tokens,
    so every piece of a step needs about the same memory and none is a sliver."""
    fewest = len(consecutive_runs(units, max_tokens))
    low, high = 1, max_tokens
    while low < high:  # the smallest cap that still needs no more runs (a unit over the cap runs alone)
        middle = (low + high) // 2
        low, high = (low, middle) if len(consecutive_runs(units, middle)) <= fewest else (middle + 1, high)
    return consecutive_runs(units, low)


@dataclass
class BatchPlan:
    """Which rows go into which micro-batch and optimizer step, for every epoch; resumable by position."""

    examples: list[Unit]
    capacity: int
    packing: bool
    batch_size: int
    grad_accum: int
    seed: int
    max_tokens: int | None = None  # train.micro_batch_tokens: a step's units run in pieces of at most this many

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

    def step(self, epoch: int, step_in_epoch: int, rank: int = 0, world_size: int = 1) -> list[Batch]:
        """This rank's micro-batches of one optimizer step (the last step of an epoch may be smaller).

        The step's rows are the same on any number of processes; rank r takes every world_size-th from row r,
        so the effective batch is the config's. Every rank gets as many micro-batches as rank 0 (which has the
        most rows), the missing ones as filler copies."""
        shares = self.step_units(epoch, step_in_epoch, world_size)
        batches = [collate(units) for units in shares[rank]]
        count = max(len(share) for share in shares)
        if len(batches) < count:
            first = step_in_epoch * self.rows_per_step  # a rank with no rows copies the step's first
            spare = batches[0] if batches else collate_rows(self.examples, self.rows(epoch)[first : first + 1], 1)[0]
            batches += [replace(spare, filler=True)] * (count - len(batches))
        return batches

    def step_units(self, epoch: int, step_in_epoch: int, world_size: int = 1) -> list[list[list[Unit]]]:
        """Every rank's micro-batches of one optimizer step, as their units (not collated): what `step` collates for
        one rank, and what `tunesmith plan` counts for all of them."""
        rows = self.rows(epoch)
        first = step_in_epoch * self.rows_per_step
        step_rows = rows[first : first + self.rows_per_step]
        return [
            micro_batch_units(self.examples, step_rows[other::world_size], self.batch_size, self.max_tokens)
            for other in range(world_size)
        ]

    def eval_batches(self) -> list[Batch]:
        """Validation micro-batches: every example once, in file order."""
        rows = (
            pack_rows(self.lengths, self.capacity, list(range(len(self.examples))))
            if self.packing
            else [[index] for index in range(len(self.examples))]
        )
        return collate_rows(self.examples, rows, self.batch_size)
