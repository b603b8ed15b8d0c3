"""metrics.jsonl (one JSON object per logged step or evaluation) and the progress bar."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any


class MetricsLog:
    """Append-only JSONL log. On resume, lines past the checkpoint's step are dropped, so a resumed
    run's log reads exactly as the uninterrupted run's would. `records` holds what the file holds (the kept lines
    and those written since), for what reads the run's history as it trains (train/rl_monitors.py). With no path
    (a distributed run's other ranks) it writes and holds nothing."""

    def __init__(self, path: Path | None, resume_step: int | None = None):
        self.path = path
        self.records: list[dict[str, Any]] = []
        if path is None:
            return
        if resume_step is None:
            path.write_text("", encoding="utf-8")
        elif path.exists():
            lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            kept = [(line, record) for line in lines if (record := json.loads(line)).get("step", 0) <= resume_step]
            self.records = [record for _, record in kept]
            path.write_text("".join(line + "\n" for line, _ in kept), encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.records.append(clean)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(clean) + "\n")


class Progress:
    """A tqdm bar showing loss, lr, tokens/s and ETA; silent when disabled or not a terminal-friendly run."""

    def __init__(self, total: int, initial: int, enabled: bool, quiet: bool = False):
        self.bar, self.quiet = None, quiet  # quiet: no messages either (a distributed run's other ranks)
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr)
        self.last_time = time.perf_counter()

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float, val_loss: float | None) -> None:
        if self.bar is None:
            return
        fields = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}", "tok/s": f"{tokens_per_s:,.0f}"}
        if val_loss is not None:
            fields["val"] = f"{val_loss:.4f}"
        self.bar.set_postfix(fields, refresh=False)
        self.bar.update(step - self.bar.n)

    def write(self, message: str) -> None:
        if self.quiet:
            return
        (self.bar.write if self.bar is not None else lambda m: print(m, file=sys.stderr))(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
