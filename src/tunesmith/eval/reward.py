"""Scoring replies with a reward model: a sequence classifier with one output (what `method: reward` trains).

The conversation is rendered with the reward model's own chat template, tokenised exactly as training
tokenised it, and scored at its last token that is not padding, as transformers' `*ForSequenceClassification`
heads do; higher is better. A reward model trained on scores reports them in the data's units (its
reward_scale.json); one trained on pairs reports the model's output as it is.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml

from tunesmith.data.tokenize import ChatTokenizer
from tunesmith.errors import UserError
from tunesmith.models.adapters import load_adapter, load_options
from tunesmith.models.loading import load_model, resolve_model
from tunesmith.serve.engine import is_run_dir
from tunesmith.train.reward import ScoreScale


class RewardScorer:
    def __init__(self, model: torch.nn.Module, tokenizer: Any, system_prompt: str | None = None,
                 scale: ScoreScale | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.chat = ChatTokenizer(tokenizer, system_prompt=system_prompt)
        self.scale = scale

    @classmethod
    def load(cls, spec: str) -> "RewardScorer":
        """A reward run directory (its base + adapter/, or its model/) or a sequence-classifier model directory."""
        if is_run_dir(Path(spec)):
            return cls.load_run(Path(spec))
        directory = resolve_model(spec)
        check_reward_model(directory, spec)
        model, tokenizer = load_model(directory, num_labels=1)
        return cls(model, tokenizer, scale=ScoreScale.load(directory))

    @classmethod
    def load_run(cls, run_dir: Path) -> "RewardScorer":
        config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
        if config.get("method") != "reward":
            raise UserError(f"{run_dir} is a run of method {config.get('method')}, not a reward model; fix: pass a run "
                            f"trained with method: reward, or a sequence-classification model directory")
        system_prompt = config.get("data", {}).get("system_prompt")
        if (run_dir / "adapter").is_dir():  # the base as it trained (QLoRA: 4-bit) as a classifier, then the adapter
            options = load_options(config.get("adapter", {}).get("type", "lora"))
            model, tokenizer = load_model(config["model"], num_labels=1, **options)
            return cls(load_adapter(model, run_dir / "adapter"), tokenizer, system_prompt,
                       ScoreScale.load(run_dir / "adapter"))
        model, tokenizer = load_model(run_dir / "model", num_labels=1)
        return cls(model, tokenizer, system_prompt, ScoreScale.load(run_dir / "model"))

    @torch.no_grad()
    def score(self, conversations: list[list[dict[str, str]]], batch_size: int = 16) -> list[float]:
        scores: list[float] = []
        pad = self.model.config.pad_token_id
        for start in range(0, len(conversations), batch_size):
            rows = [self.chat.tokenize_chat(c, last_turn_only=True).input_ids
                    for c in conversations[start: start + batch_size]]
            width = max(len(row) for row in rows)
            input_ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows])  # right padding
            attention = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
            rewards = self.model(input_ids=input_ids, attention_mask=attention).logits[:, 0].float()
            scores += (self.scale.to_data_units(rewards) if self.scale else rewards).tolist()
        return scores


def check_reward_model(directory: Path, spec: str) -> None:
    """A UserError unless `directory` holds a sequence classifier with one output."""
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    architectures = config.get("architectures") or []
    labels = len(config.get("id2label") or {}) or config.get("num_labels", 2)
    if not any(name.endswith("ForSequenceClassification") for name in architectures):
        raise UserError(f"{spec}: not a reward model: its config.json names {', '.join(architectures) or 'no architecture'}; "
                        f"a reward model is a sequence classifier with one output; fix: pass a run trained with "
                        f"method: reward, or a directory saved by AutoModelForSequenceClassification")
    if labels != 1:
        raise UserError(f"{spec}: a reward model has one output (num_labels=1), this one has {labels}; fix: pass a reward "
                        f"model directory")


def is_reward_model(target: str) -> bool:
    """A reward run directory, or a model directory whose config is a one-output sequence classifier."""
    path = Path(target)
    if is_run_dir(path):
        return yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8")).get("method") == "reward"
    if not (path / "config.json").is_file():
        return False
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    return any(name.endswith("ForSequenceClassification") for name in config.get("architectures") or [])
