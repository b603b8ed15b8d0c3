"""Continued pre-training: the SFT loop on raw text, where every token is a target.

Documents are separated by the end-of-sequence token; with `data.truncation: split` a long document
is cut into `max_length` pieces, and packing never lets one document attend to another.
"""

from __future__ import annotations

from tunesmith.config.schema import Config
from tunesmith.recipes.sft import train_loop
from tunesmith.registry import methods
from tunesmith.train.session import RunResult


@methods.register("pretrain", accepts=("text",))
def run_pretrain(config: Config) -> RunResult:
    return train_loop(config, accepts=("text",))
