"""The process-level setup a run needs: its device, seeds, threads, and graceful stop on signals (its dtype:
models/precision.py)."""

from __future__ import annotations

import contextlib
import os
import random
import signal
from typing import Iterator

import torch

from tunesmith.config.schema import TrainConfig


def pick_device(config: TrainConfig) -> torch.device:
    """The CPU, or this process's GPU: under torchrun, the one numbered by its rank on the node (LOCAL_RANK)."""
    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def seed_everything(seed: int, threads: int | None) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if threads is not None:
        torch.set_num_threads(threads)


class StopFlag:
    """Set by SIGINT/SIGTERM so the loop can finish its step, checkpoint and exit; a second signal is immediate."""

    def __init__(self) -> None:
        self.signal_number: int | None = None

    def __bool__(self) -> bool:
        return self.signal_number is not None


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopFlag]:
    flag = StopFlag()
    previous = {}

    def request_stop(number: int, frame: object) -> None:
        if flag:  # asked twice: stop now
            signal.signal(number, previous[number])
            signal.raise_signal(number)
        flag.signal_number = number

    for number in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[number] = signal.signal(number, request_stop)
        except ValueError:  # not the main thread (e.g. inside a service worker): no handlers
            pass
    try:
        yield flag
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
