"""method: auto (the default): classify for classification data ({text, label} rows: a sequence classifier over the
labels names one in a single forward pass, and learns it far better than generating it), sft for everything else.
The choice is printed with its reason and recorded in the run's config.yaml."""

from __future__ import annotations

import sys

from tunesmith.config.schema import Config
from tunesmith.data.validate import load_file
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
    """The training file's format: as the config names it, or as its rows show."""
    if config.data.format != "auto":
        return config.data.format
    return load_file(config.data.train, "auto", columns=config.data.columns).format
