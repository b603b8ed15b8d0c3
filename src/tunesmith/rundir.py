"""What a run directory holds, for the code that reads one (DESIGN.md, "A run directory"): metrics.jsonl's records.

metrics.jsonl is appended to while a run trains, so a reader may meet a last line a killed run cut short; it is
skipped, never an error, and so are blank lines and anything that is not a JSON object.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a metrics.jsonl, in order; `path` is the file or the run directory. [] when there is none."""
    path = Path(path)
    path = path / METRICS_FILE if path.is_dir() else path
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records
