"""An evaluation task run inside the training loop, every `eval.every` steps, on the live model.

It answers the first `eval.max_examples` rows of `eval.data` exactly as `tunesmith eval` would (same
task, same constrained decoding), so the metric logged during training is the metric reported after it.
"""

from __future__ import annotations

from typing import Any

import torch

from tunesmith.config.schema import Config
from tunesmith.data.dataset import load_examples
from tunesmith.engine.generation import Engine, Sampling
from tunesmith.eval import metrics as metric_functions
from tunesmith.eval.tasks import Context, metric_task_of
from tunesmith.registry import tasks

LOWER_IS_BETTER = {"val_loss", "loss", "perplexity", "mse", "mae"}
RESAMPLES = 200  # enough for a logged interval; the final report uses the full 1000


class InTrainingEval:
    @classmethod
    def if_asked(cls, config: Config, tokenizer: Any, main: bool) -> "InTrainingEval | None":
        """The eval task during training, when eval.every and eval.data ask for it, on the main process only."""
        return cls(config, tokenizer) if config.eval.every and config.eval.data and main else None

    def __init__(self, config: Config, tokenizer: Any):
        from tunesmith.eval.baselines import label_set  # the same label set as `tunesmith eval` on this run

        self.task = tasks.get(config.eval.task)
        self.items = self.task.items(
            load_examples(config.eval.data, columns=config.data.columns)[: config.eval.max_examples]
        )
        self.tokenizer = tokenizer
        self.system_prompt = config.data.system_prompt
        labels = label_set(self.items, config) if config.eval.task == "classification" else []
        self.context = Context(
            Sampling(max_new_tokens=config.eval.max_new_tokens), config.eval.batch_size, labels=labels
        )

    def __call__(self, model: torch.nn.Module, seed: int) -> dict[str, Any]:
        """{metric: {"value", "ci95", "n"}} for the model as it is now; the model is left in training mode."""
        rng = torch.get_rng_state()  # generation is greedy, but keep the training RNG stream untouched anyway
        try:
            engine = Engine(model, self.tokenizer, self.system_prompt)
            predictions = self.task.predict(engine, self.items, self.context)
        finally:
            model.train()
            torch.set_rng_state(rng)
        metric_task = metric_task_of(self.task, self.items)
        if metric_task is None:  # generation without references: nothing to score, only replies to read
            return {}
        return metric_functions.score(
            metric_task, predictions, [item.expected for item in self.items], resamples=RESAMPLES, seed=seed
        )


def higher_is_better(metric: str) -> bool:
    return metric not in LOWER_IS_BETTER
