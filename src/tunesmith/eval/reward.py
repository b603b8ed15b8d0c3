"""Scoring replies with a reward model: a sequence classifier with one output (what `method: reward` trains).

The conversation is rendered with the reward model's own chat template and scored at its last token, as
transformers' `*ForSequenceClassification` heads do; higher is better.
"""
from __future__ import annotations

from typing import Any

import torch

from tunesmith.data.tokenize import ChatTokenizer
from tunesmith.errors import UserError
from tunesmith.models.loading import quiet_transformers, resolve_model


class RewardScorer:
    def __init__(self, model: torch.nn.Module, tokenizer: Any):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.chat = ChatTokenizer(tokenizer)

    @classmethod
    def load(cls, spec: str) -> "RewardScorer":
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        directory = resolve_model(spec)
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
            model = AutoModelForSequenceClassification.from_pretrained(directory, local_files_only=True,
                                                                       trust_remote_code=False)
        if model.config.num_labels != 1:
            raise UserError(f"--reward-model {spec}: a reward model has one output (num_labels=1), this one has "
                            f"{model.config.num_labels}; fix: pass a reward model directory")
        if model.config.pad_token_id is None:  # the head reads the last non-padding token
            model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return cls(model, tokenizer)

    @torch.no_grad()
    def score(self, conversations: list[list[dict[str, str]]], batch_size: int = 16) -> list[float]:
        scores: list[float] = []
        pad = self.model.config.pad_token_id
        for start in range(0, len(conversations), batch_size):
            rows = [self.chat.tokenize_chat(c).input_ids for c in conversations[start: start + batch_size]]
            width = max(len(row) for row in rows)
            input_ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows])  # right padding
            attention = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
            scores += self.model(input_ids=input_ids, attention_mask=attention).logits[:, 0].float().tolist()
        return scores
