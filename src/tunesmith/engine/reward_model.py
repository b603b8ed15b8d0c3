"""Scoring replies with a reward model: a sequence classifier with one output (what `method: reward` trains).

The conversation is rendered with the reward model's own chat template, tokenised exactly as training
tokenised it, and scored at its last token that is not padding, as transformers' `*ForSequenceClassification`
heads do; higher is better. A reward model trained on scores reports them in the data's units (its
reward_scale.json); one trained on pairs reports the model's output as it is.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunesmith.data.packing import Batch
from tunesmith.data.tokenize import ChatTokenizer
from tunesmith.engine.forward import hidden_states
from tunesmith.errors import UserError
from tunesmith.models.adapters import load_adapter, load_options
from tunesmith.models.heads import classifier_head
from tunesmith.models.loading import load_model, resolve_model
from tunesmith.models.precision import for_inference
from tunesmith.rundir import ADAPTER_DIR, MODEL_DIR, is_run_dir, read_run_config

SCALE_FILE = "reward_scale.json"


@dataclass(frozen=True)
class ScoreScale:
    """The training scores' mean and standard deviation: reward in the data's units = mean + std * model output."""

    mean: float
    std: float

    @classmethod
    def of(cls, scores: list[float], where: Path) -> "ScoreScale":
        mean = sum(scores) / len(scores)
        std = math.sqrt(sum((score - mean) ** 2 for score in scores) / len(scores))  # population: the data's spread
        if std == 0:
            raise UserError(
                f"{where}: every training score is {scores[0]:g}, so there is nothing to tell the replies "
                f"apart by; fix: give replies of different quality different scores, or use pairs "
                f"{{prompt, chosen, rejected}}"
            )
        return cls(mean, std)

    def standardise(self, scores: torch.Tensor) -> torch.Tensor:
        return (scores - self.mean) / self.std

    def to_data_units(self, rewards: torch.Tensor) -> torch.Tensor:
        return rewards * self.std + self.mean

    def save(self, directory: Path) -> None:
        text = json.dumps(
            {"mean": self.mean, "std": self.std, "meaning": "score = mean + std * model output"}, indent=1
        )
        (directory / SCALE_FILE).write_text(text, encoding="utf-8")

    @classmethod
    def load(cls, directory: Path) -> "ScoreScale | None":
        """The scale saved beside a reward model's weights; None for one trained on pairs (its output is the reward)."""
        path = directory / SCALE_FILE
        if not path.is_file():
            return None
        saved = json.loads(path.read_text(encoding="utf-8"))
        return cls(float(saved["mean"]), float(saved["std"]))


def pad_token_id(model: torch.nn.Module) -> int | None:
    """The padding id the classifier skips when it looks for a sequence's last token."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.config.pad_token_id


def reward_positions(batch: Batch, pad_id: int | None) -> torch.Tensor:
    """(segments,) the flat position of each segment's last token that is not `pad_id`, as transformers'
    classifiers choose it (a template may end a reply with the padding token; it is then skipped)."""
    lengths = torch.tensor(batch.segment_lengths, device=batch.input_ids.device)
    ends = lengths.cumsum(0)  # exclusive
    if pad_id is None:
        return ends - 1
    positions = torch.arange(batch.num_tokens, device=lengths.device)
    real = batch.input_ids[0] != pad_id
    last = torch.full_like(lengths, -1).scatter_reduce(0, batch.example_index()[real], positions[real], reduce="amax")
    return torch.where(last >= 0, last, ends - lengths)  # all padding: the first token, as transformers does


def sequence_logits(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """(segments, outputs) the sequence classifier's outputs for each sequence, read at its last token that is not
    padding (as transformers' classifiers read it), differentiable, in float32."""
    hidden = hidden_states(model, batch)[0]  # (T, H)
    last = hidden[reward_positions(batch, pad_token_id(model))]  # (segments, H)
    return classifier_head(model)(last).float()


def sequence_rewards(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """(segments,) each sequence's reward (the model's raw output), differentiable, in float32."""
    return sequence_logits(model, batch)[:, 0]


class RewardScorer:
    def __init__(
        self, model: torch.nn.Module, tokenizer: Any, system_prompt: str | None = None, scale: ScoreScale | None = None
    ):
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
        return cls(for_inference(model), tokenizer, scale=ScoreScale.load(directory))

    @classmethod
    def load_run(cls, run_dir: Path) -> "RewardScorer":
        config = read_run_config(run_dir)
        if config.method != "reward":
            raise UserError(
                f"{run_dir} is a run of method {config.method}, not a reward model; fix: pass a run "
                f"trained with method: reward, or a sequence-classification model directory"
            )
        system_prompt = config.data.system_prompt
        if (run_dir / ADAPTER_DIR).is_dir():  # the base as it trained (QLoRA: 4-bit) as a classifier, then the adapter
            model, tokenizer = load_model(config.model, num_labels=1, **load_options(config.adapter.type))
            return cls(
                for_inference(load_adapter(model, run_dir / ADAPTER_DIR), config.train),
                tokenizer,
                system_prompt,
                ScoreScale.load(run_dir / ADAPTER_DIR),
            )
        model, tokenizer = load_model(run_dir / MODEL_DIR, num_labels=1)
        return cls(for_inference(model, config.train), tokenizer, system_prompt, ScoreScale.load(run_dir / MODEL_DIR))

    @torch.no_grad()
    def score(
        self, conversations: list[list[dict[str, str]]], batch_size: int = 16, rows: list[dict] | None = None
    ) -> list[float]:
        """The reward of each conversation's last reply (`rows`, the data rows, are a grader's; unused here)."""
        scores: list[float] = []
        pad = self.model.config.pad_token_id
        for start in range(0, len(conversations), batch_size):
            rows = [
                self.chat.tokenize_chat(c, last_turn_only=True).input_ids
                for c in conversations[start : start + batch_size]
            ]
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
        raise UserError(
            f"{spec}: not a reward model: its config.json names {', '.join(architectures) or 'no architecture'}; "
            f"a reward model is a sequence classifier with one output; fix: pass a run trained with "
            f"method: reward, or a directory saved by AutoModelForSequenceClassification"
        )
    if labels != 1:
        raise UserError(
            f"{spec}: a reward model has one output (num_labels=1), this one has {labels}; fix: pass a reward "
            f"model directory"
        )


def is_reward_model(target: str) -> bool:
    """A reward run directory, or a model directory whose config is a one-output sequence classifier."""
    path = Path(target)
    if is_run_dir(path):
        return read_run_config(path).method == "reward"
    if not (path / "config.json").is_file():
        return False
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    return any(name.endswith("ForSequenceClassification") for name in config.get("architectures") or [])
