"""A trained classifier (method classify): its label names, and each label's probability for a conversation, read
at the conversation's last token after the generation prompt, as training read it; with its calibration (a
temperature, and a confidence below which it abstains) when training fitted one.

The label names live beside the weights in labels.json ({"id2label", "label2id"}), the keyword arguments that name
a transformers classifier's outputs: `AutoModelForSequenceClassification.from_pretrained(BASE, **labels)` then
`PeftModel.from_pretrained(..., RUN/adapter)` loads an adapter run with its labels named; a full fine-tuning run's
model/config.json names them too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunesmith.data.dataset import keep_end
from tunesmith.data.files import write_atomically
from tunesmith.data.packing import collate
from tunesmith.data.tokenize import ChatTokenizer
from tunesmith.engine.reward_model import sequence_logits
from tunesmith.errors import UserError
from tunesmith.models.adapters import load_adapter, load_options
from tunesmith.models.loading import load_model
from tunesmith.models.precision import for_inference
from tunesmith.rundir import ADAPTER_DIR, MODEL_DIR, is_run_dir, read_run_config

LABELS_FILE = "labels.json"
CALIBRATION_FILE = "calibration.json"  # {"temperature", "threshold", "out_of_scope", "validation": {...}}
Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Calibration:
    """How a classifier's logits become its answer: probabilities softmax(logits / temperature); below `threshold`
    confidence (the top probability) it abstains, answering `out_of_scope` when set, else no label."""

    temperature: float = 1.0
    threshold: float | None = None
    out_of_scope: str | None = None

    @classmethod
    def read(cls, directory: Path) -> "Calibration":
        """The calibration saved beside a classifier's weights; none (temperature 1, never abstaining) without one."""
        path = directory / CALIBRATION_FILE
        if not path.is_file():
            return cls()
        saved = json.loads(path.read_text(encoding="utf-8"))
        return cls(saved["temperature"], saved.get("threshold"), saved.get("out_of_scope"))


@dataclass(frozen=True)
class Answer:
    """One classified input: its label (None when it abstained without an out-of-scope label), the top
    label's calibrated probability, whether it abstained, and every label's probability."""

    label: str | None
    confidence: float
    abstained: bool
    probabilities: dict[str, float]


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
    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        labels: list[str],
        system_prompt: str | None = None,
        calibration: Calibration = Calibration(),
        keep_last: int | None = None,
    ):
        self.model = model.eval()
        self.labels = labels
        self.chat = ChatTokenizer(tokenizer, system_prompt=system_prompt)
        self.calibration = calibration
        self.keep_last = keep_last  # data.truncation: truncate: an input keeps its last max_length tokens, as trained

    @classmethod
    def load(cls, run_dir: Path, calibrated: bool = True) -> "Classifier":
        """A classify run: its base as a classifier with its adapter (QLoRA: the 4-bit base), or its model/; with
        the calibration saved beside the weights unless `calibrated` is False."""
        run_dir = Path(run_dir)
        config = read_run_config(run_dir)
        if (run_dir / ADAPTER_DIR).is_dir():
            weights = run_dir / ADAPTER_DIR
            labels = read_labels(weights)
            options = load_options(config.adapter.type)
            model, tokenizer = load_model(config.model, num_labels=len(labels), **options)
            model = load_adapter(model, weights)
        else:
            weights = run_dir / MODEL_DIR
            labels = read_labels(weights)
            model, tokenizer = load_model(weights, num_labels=len(labels))
        calibration = Calibration.read(weights) if calibrated else Calibration()
        keep_last = config.data.max_length if config.data.truncation == "truncate" else None
        model = for_inference(model, config.train)
        return cls(model, tokenizer, labels, config.data.system_prompt, calibration, keep_last)

    @torch.no_grad()
    def unit_logits(self, units: list, batch_size: int = 16) -> torch.Tensor:
        """(n, labels) raw logits of tokenized inputs (as training's validation units hold them)."""
        device, rows = next(self.model.parameters()).device, []
        for start in range(0, len(units), batch_size):
            rows.append(
                sequence_logits(self.model, collate(units[start : start + batch_size]).to(device)).float().cpu()
            )
        return torch.cat(rows) if rows else torch.empty(0, len(self.labels))

    def logits(self, conversations: list[Messages], batch_size: int = 16) -> torch.Tensor:
        """(n, labels) raw logits of each conversation (the turns before the label)."""
        units = [self.chat.tokenize_input(messages) for messages in conversations]
        if self.keep_last is not None:
            units = [keep_end(unit, self.keep_last) for unit in units]
        return self.unit_logits(units, batch_size)

    def probabilities(self, conversations: list[Messages], batch_size: int = 16) -> torch.Tensor:
        """(n, labels) each label's calibrated probability for each conversation."""
        return torch.softmax(self.logits(conversations, batch_size) / self.calibration.temperature, dim=-1)

    def answers(self, probabilities: torch.Tensor) -> list[Answer]:
        """Each row of probabilities as an answer: the top label, or an abstention below the threshold."""
        confidence, top = probabilities.max(dim=-1)
        threshold, answers = self.calibration.threshold, []
        for row, (score, index) in enumerate(zip(confidence.tolist(), top.tolist())):
            abstained = threshold is not None and score < threshold
            label = self.calibration.out_of_scope if abstained else self.labels[index]
            shares = dict(zip(self.labels, probabilities[row].tolist()))
            answers.append(Answer(label, score, abstained, shares))
        return answers

    def classify(self, conversations: list[Messages], batch_size: int = 16) -> list[Answer]:
        return self.answers(self.probabilities(conversations, batch_size))

    def predict(self, conversations: list[Messages], batch_size: int = 16) -> list[str | None]:
        """Each conversation's label (None where it abstains without an out-of-scope label)."""
        return [answer.label for answer in self.classify(conversations, batch_size)]
