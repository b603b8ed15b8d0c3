"""Batched generation for the service: per base model, one scheduler thread owns the model and decodes the
rows of many requests together, each through its own adapter (PEFT's mixed-adapter batches).

Rows wait in one FIFO queue. The scheduler takes up to `max_batch` of them from its head (in arrival order,
and no more distinct adapters than the pool keeps resident), prefills them as one left-padded batch and
decodes them step by step with the model's own forward and a KV cache, so that every row has its own
sampling, seed, stopping and log-probabilities. A row leaves the batch as soon as it ends (an end-of-turn
token, its token budget, its `cancel` event, its deadline or the server's `close`) and its consumer hears of it
at once; the batch runs until its last row leaves, then the queue's head goes next: no row starts before one
queued earlier. New rows do not join a running batch (no continuous batching): simpler caches, and the wait is
bounded by the longest row of the running batch, which `max_tokens` and the request deadline bound in turn.

Adapters are loaded, pinned and evicted between batches, in this thread, under the base's lock; a step
holds the same lock, so other users of the model (prompt scoring) run between steps, never during one.
The thread exits when the queue is empty and starts again with the next request.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from tunesmith.engine.generation import Sampling

DEFAULT_MAX_BATCH = 8
BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed batch
AdapterLoader = Callable[[], dict[str, bytes]]


@dataclass(eq=False)  # a row is itself: compared by identity
class Row:
    """One reply to generate. `top_logprobs`: how many alternatives each token reports (0..20)."""

    prompt: list[int]
    sampling: Sampling
    adapter_key: str | None = None  # None: the base model
    load: AdapterLoader | None = None
    seed: int | None = None
    top_logprobs: int = 0
    deadline: float | None = None  # time.monotonic() past which the row ends with reason "length"
    cancel: threading.Event = field(default_factory=threading.Event)  # this row's consumer is done with it
    index: int = 0  # which of its request's n replies
    tokens: list[int] = field(default_factory=list)  # generated so far (filled by the scheduler)
    done: threading.Event = field(default_factory=threading.Event)  # set once the row has left its batch
    thread: threading.Thread | None = None  # the scheduler thread that ran it
    events: Any = None  # its ticket's queue of events
    abandoned: threading.Event | None = None  # its request's client has left (every row of the request)

    def cancelled(self) -> bool:
        return self.cancel.is_set() or (self.abandoned is not None and self.abandoned.is_set())


@dataclass
class Token:
    """One generated token: its log-probability under the model (before temperature and top_p, as OpenAI
    reports it) and the row's `top_logprobs` likeliest tokens as {token id: log-probability}, likeliest first."""

    id: int
    logprob: float
    top: dict[int, float]


@dataclass
class End:
    """The row is over: reason "stop" (an end-of-turn token), "length" (its budget or its deadline),
    "cancelled" (its consumer left), or an error that its consumer re-raises."""

    reason: str
    error: BaseException | None = None


Event = tuple[int, Token | End]  # (row index, what happened)


class Ticket:
    """A request's rows in the scheduler: iterate for its events; closing cancels every row still running and
    returns once they have all left their batches."""

    def __init__(self, scheduler: "Scheduler", rows: list[Row]):
        self.scheduler, self.rows, self.events = scheduler, rows, queue.SimpleQueue()
        for row in rows:
            row.events = self.events

    def __iter__(self) -> Iterator[Event]:
        ended = 0
        while ended < len(self.rows):
            index, event = self.events.get()
            ended += isinstance(event, End)
            yield index, event

    def close(self) -> None:
        for row in self.rows:
            row.cancel.set()
        self.scheduler.withdraw(self.rows)
        for row in self.rows:
            row.done.wait()
        self.scheduler.settle(self.rows)


class Scheduler:
    """The generation loop of one base model. `resolve(key, loader)` makes an adapter resident and pinned and
    returns its PEFT name; `release(key)` unpins it; both run under `lock`, which every forward holds too."""

    def __init__(
        self,
        engine: Any,
        lock: threading.Lock,
        resolve: Callable[[str, AdapterLoader | None], str],
        release: Callable[[str], None],
        max_adapters: int,
        max_batch: int = DEFAULT_MAX_BATCH,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch}: at least one row must fit in a batch")
        self.engine, self.lock, self.resolve, self.release = engine, lock, resolve, release
        self.max_adapters, self.max_batch = max_adapters, max_batch
        self._waiting: list[Row] = []
        self._guard = threading.Lock()  # guards _waiting and _thread
        self._thread: threading.Thread | None = None
        self._batch: list[Row] = []  # the rows of the batch being decoded
        self.closing_at: float | None = None  # set by `close`: every row's deadline is at most this

    def close(self, grace: float) -> None:
        """The server is stopping: every row, running or queued, ends within `grace` seconds (reason "length")."""
        self.closing_at = time.monotonic() + grace

    def _expired(self, row: Row, now: float) -> bool:
        deadline = min((d for d in (row.deadline, self.closing_at) if d is not None), default=None)
        return deadline is not None and now >= deadline

    def submit(self, rows: list[Row]) -> Ticket:
        """Queue `rows` (one request's replies, kept together in arrival order) and return their ticket."""
        ticket = Ticket(self, rows)
        with self._guard:
            self._waiting += rows
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="tunesmith-batching", daemon=True)
                self._thread.start()
        return ticket

    def withdraw(self, rows: list[Row]) -> None:
        """Take those of `rows` still waiting out of the queue: they never start."""
        with self._guard:
            for row in rows:
                if row in self._waiting:
                    self._waiting.remove(row)
                    row.done.set()

    def settle(self, rows: list[Row]) -> None:
        """Wait for the threads that ran `rows` to end if they are on their way out: the thread stays only while it
        has rows to decode (others' rows of its batch, or rows waiting), so a closed request leaves no thread of
        its own behind."""
        for thread in {row.thread for row in rows if row.thread is not None} - {threading.current_thread()}:
            while thread.is_alive():
                with self._guard:
                    working = thread is self._thread and (
                        self._waiting or not all(r.done.is_set() for r in self._batch)
                    )
                if working:
                    break
                thread.join(timeout=0.01)

    def _run(self) -> None:
        while True:
            with self._guard:
                batch = self._batch = self._take()
                if not batch:
                    self._thread = None
                    return
            self._run_batch(batch)

    def _take(self) -> list[Row]:
        """Up to max_batch rows from the head of the queue, with at most max_adapters distinct adapters."""
        batch, keys = [], set()
        while self._waiting and len(batch) < self.max_batch:
            key = self._waiting[0].adapter_key
            if key is not None and key not in keys and len(keys) == self.max_adapters:
                break
            if key is not None:
                keys.add(key)
            row = self._waiting.pop(0)
            row.thread = threading.current_thread()
            batch.append(row)
        return batch

    def _run_batch(self, rows: list[Row]) -> None:
        now = time.monotonic()
        for row in [row for row in rows if row.cancelled() or self._expired(row, now)]:
            self._finish([row], End("cancelled" if row.cancelled() else "length"))  # left or timed out waiting
            rows.remove(row)
        if not rows:
            return
        names, pinned = {}, []
        try:
            for row in rows:
                if row.adapter_key is not None and row.adapter_key not in names:
                    with self.lock:
                        names[row.adapter_key] = self.resolve(row.adapter_key, row.load)
                    pinned.append(row.adapter_key)
        except Exception as error:  # noqa: BLE001 - an adapter that cannot load fails the rows of this batch
            self._finish(rows, End("error", error))
            self._unpin(pinned)
            return
        try:
            self._decode(rows, [names.get(row.adapter_key, BASE_ADAPTER) for row in rows])
        except Exception as error:  # noqa: BLE001 - the consumers re-raise it
            self._finish([row for row in rows if not row.done.is_set()], End("error", error))
        finally:
            self._unpin(pinned)

    def _unpin(self, keys: list[str]) -> None:
        with self.lock:
            for key in keys:
                self.release(key)

    @torch.no_grad()
    @torch.compiler.set_stance("force_eager")
    def _decode(self, rows: list[Row], adapter_names: list[str]) -> None:
        engine = self.engine
        device, stop_ids = engine.device, set(engine.stop_ids())
        pad = (
            engine.tokenizer.pad_token_id
            if engine.tokenizer.pad_token_id is not None
            else engine.tokenizer.eos_token_id
        )
        width = max(len(row.prompt) for row in rows)
        input_ids = torch.tensor([[pad] * (width - len(r.prompt)) + r.prompt for r in rows], device=device)  # (B, T)
        mask = torch.tensor([[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r in rows], device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding shifts no position
        generators = [_generator(row, device) for row in rows]
        live = list(range(len(rows)))  # indices into rows of those still in the batch
        cache = None
        while True:
            with self.lock:
                names = [adapter_names[i] for i in live]
                extra = {"adapter_names": names} if hasattr(engine.model, "peft_config") else {}
                output = engine.model(
                    input_ids=input_ids,
                    attention_mask=mask,
                    position_ids=positions,
                    cache=cache,
                    use_cache=True,
                    logits_to_keep=1,
                    **extra,
                )
            cache = output.cache
            logits = output.logits[:, -1].float()  # (B, vocab)
            scores = torch.log_softmax(logits, dim=-1)
            chosen, keep = [], []
            for slot, i in enumerate(live):
                row = rows[i]
                token = _sample(logits[slot], row.sampling, generators[i])
                row.tokens.append(token)
                top = scores[slot].topk(row.top_logprobs) if row.top_logprobs else None
                row.events.put(
                    (
                        row.index,
                        Token(
                            token,
                            float(scores[slot, token]),
                            dict(zip(top.indices.tolist(), top.values.tolist())) if top else {},
                        ),
                    )
                )
                reason = (
                    "stop"
                    if token in stop_ids
                    else "length"
                    if len(row.tokens) >= row.sampling.max_new_tokens
                    else "cancelled"
                    if row.cancelled()
                    else "length"
                    if self._expired(row, time.monotonic())
                    else None
                )
                if reason is None:
                    keep.append(slot)
                    chosen.append(token)
                else:
                    self._finish([row], End(reason))
            if not keep:
                return
            if len(keep) < len(live):  # finished rows leave the batch and its cache
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                mask, positions = mask[index], positions[index]
                live = [live[slot] for slot in keep]
            input_ids = torch.tensor(chosen, device=device)[:, None]  # (B, 1)
            mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=-1)
            positions = positions[:, -1:] + 1

    @staticmethod
    def _finish(rows: list[Row], end: End) -> None:
        for row in rows:
            row.events.put((row.index, end))
            row.done.set()


def _generator(row: Row, device: torch.device) -> torch.Generator | None:
    """A generator per sampled row: a seeded request samples the same tokens batched or alone; each of its n
    replies gets its own stream."""
    if row.sampling.temperature <= 0:
        return None
    generator = torch.Generator(device=device)
    if row.seed is None:
        generator.seed()
    else:
        generator.manual_seed((row.seed + row.index * 0x9E3779B97F4A7C15) % (1 << 64))
    return generator


def _sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """The next token from one row's (vocab,) logits: greedy at temperature 0, else nucleus sampling."""
    if sampling.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(0) - sorted_probs > sampling.top_p  # the smallest set reaching top_p stays
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
