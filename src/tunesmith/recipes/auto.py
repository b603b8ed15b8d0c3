"""method: auto (the default): classify for classification data ({text, label} rows: a sequence classifier over the
labels names one in a single forward pass, and learns it far better than generating it), sft for everything else.
The choice is printed with its reason and recorded in the run's config.yaml."""

from __future__ import annotations

import sys

from tunesmith.config.schema import Config
from tunesmith.data.files import read_rows
from tunesmith.data.formats import detect_format
from tunesmith.recipes.classify import run_classify
from tunesmith.recipes.sft import SFT_ACCEPTS, run_sft
from tunesmith.registry import methods
from tunesmith.train.session import RunResult


@methods.register("auto", accepts=SFT_ACCEPTS)
def run_auto(config: Config) -> RunResult:
    found = data_format(config)
    config.method = "classify" if found == "classification" else "sft"
    reason = "{text, label} rows" if config.method == "classify" else f"format {found}, not {{text, label}} rows"
    print(f"auto: method={config.method} ({config.data.train}: {reason})", file=sys.stderr)
    return run_classify(config) if config.method == "classify" else run_sft(config)


def data_format(config: Config) -> str:
    """The training file's format: as the config names it, or as its first recognisable row shows (as loading
    decides it: one format per file), without reading the rest; "auto" when no row is recognisable (sft's loading
    then reports the file's problems)."""
    if config.data.format != "auto":
        return config.data.format
    for _, row in read_rows(config.data.train, columns=config.data.columns):
        if isinstance(row, dict) and (found := detect_format(row)) is not None:
            return found
    return "auto"
