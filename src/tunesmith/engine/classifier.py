"""A trained classifier (method classify): its label names, and each label's probability for a conversation, read
at the conversation's last token after the generation prompt, as training read it.

The label names live beside the weights in labels.json ({"id2label", "label2id"}), the keyword arguments that name
a transformers classifier's outputs: `AutoModelForSequenceClassification.from_pretrained(BASE, **labels)` then
`PeftModel.from_pretrained(..., RUN/adapter)` loads an adapter run with its labels named; a full fine-tuning run's
model/config.json names them too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tunesmith.data.files import write_atomically
from tunesmith.data.packing import collate
from tunesmith.data.tokenize import ChatTokenizer
from tunesmith.engine.reward_model import sequence_logits
from tunesmith.errors import UserError
from tunesmith.models.adapters import load_adapter, load_options
from tunesmith.models.loading import load_model
from tunesmith.rundir import ADAPTER_DIR, MODEL_DIR, is_run_dir, read_run_config

LABELS_FILE = "labels.json"
Messages = list[dict[str, str]]


def label_arguments(labels: list[str]) -> dict[str, Any]:
    """id2label and label2id for `labels`, as transformers' configs hold them."""
    return {"id2label": dict(enumerate(labels)), "label2id": {label: index for index, label in enumerate(labels)}}


def name_labels(model: torch.nn.Module, labels: list[str]) -> None:
    """Name a classifier's outputs in its config, so a saved model/ names its classes."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for key, value in label_arguments(labels).items():
        setattr(base.config, key, value)


def save_labels(directory: Path, labels: list[str]) -> None:
    arguments = label_arguments(labels)
    arguments["id2label"] = {str(index): label for index, label in arguments["id2label"].items()}
    write_atomically(directory / LABELS_FILE, json.dumps(arguments, indent=1, ensure_ascii=False) + "\n")


def read_labels(directory: Path) -> list[str]:
    """The label names saved beside a classifier's weights, in output order."""
    path = directory / LABELS_FILE
    if not path.is_file():
        raise UserError(
            f"{directory}: no {LABELS_FILE}, so the classifier's outputs have no names; fix: train it "
            f"again with method: classify"
        )
    id2label = json.loads(path.read_text(encoding="utf-8"))["id2label"]
    return [id2label[str(index)] for index in range(len(id2label))]


def is_classifier_run(target: str) -> bool:
    path = Path(target)
    return is_run_dir(path) and read_run_config(path).method == "classify"


class Classifier:
    def __init__(self, model: torch.nn.Module, tokenizer: Any, labels: list[str], system_prompt: str | None = None):
        self.model = model.eval()
        self.labels = labels
        self.chat = ChatTokenizer(tokenizer, system_prompt=system_prompt)

    @classmethod
    def load(cls, run_dir: Path) -> "Classifier":
        """A classify run: its base as a classifier with its adapter (QLoRA: the 4-bit base), or its model/."""
        run_dir = Path(run_dir)
        config = read_run_config(run_dir)
        if (run_dir / ADAPTER_DIR).is_dir():
            labels = read_labels(run_dir / ADAPTER_DIR)
            options = load_options(config.adapter.type)
            model, tokenizer = load_model(config.model, num_labels=len(labels), **options)
            model = load_adapter(model, run_dir / ADAPTER_DIR)
        else:
            labels = read_labels(run_dir / MODEL_DIR)
            model, tokenizer = load_model(run_dir / MODEL_DIR, num_labels=len(labels))
        return cls(model, tokenizer, labels, config.data.system_prompt)

    @torch.no_grad()
    def probabilities(self, conversations: list[Messages], batch_size: int = 16) -> torch.Tensor:
        """(n, labels) each label's probability for each conversation (the turns before the label)."""
        device, rows = next(self.model.parameters()).device, []
        for start in range(0, len(conversations), batch_size):
            units = [self.chat.tokenize_input(messages) for messages in conversations[start : start + batch_size]]
            logits = sequence_logits(self.model, collate(units).to(device))
            rows.append(torch.softmax(logits, dim=-1).cpu())
        return torch.cat(rows) if rows else torch.empty(0, len(self.labels))

    def predict(self, conversations: list[Messages], batch_size: int = 16) -> list[str]:
        """The most probable label of each conversation."""
        return [self.labels[index] for index in self.probabilities(conversations, batch_size).argmax(-1).tolist()]
