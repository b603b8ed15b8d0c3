"""`POST /v1/classifications`: a served classifier run (method classify) labels texts.

A run served as `tunesmith serve --model NAME=RUN` that trained a classifier loads as a `Classifier`, not as a
generating model: it answers here, and chat or completions on it are a 400 that names this endpoint. A request is
{"model": NAME, "input": "text" | ["text", ...]}. Each text is read as one user message (after the run's system
prompt, as training read it); the reply lists, per text in order, its label (null when the classifier abstains
without an out-of-scope label), the top label's calibrated probability, whether it abstained, and every label's
probability.

`ClassifierPool` keeps each classifier run loaded once, as `AdapterPool` keeps a base model: a run loads under the
pool's lock, and its model runs one batch at a time under the run's own lock, so concurrent requests take turns
batch by batch and a request whose client has left stops at its next batch.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.engine.classifier import Answer, Classifier
from tunesmith.serve.request import RequestError, check_prompt_bytes

PARAMETERS = ("model", "input")
DEFAULT_BATCH_SIZE = 16  # texts per forward pass, as Classifier.classify's default


@dataclass
class LoadedClassifier:
    classifier: Classifier
    lock: threading.Lock = field(default_factory=threading.Lock)  # one batch at a time on this model

    def classify(self, texts: list[str], batch_size: int, cancel: threading.Event | None = None) -> list[Answer]:
        """Each text's answer, `batch_size` texts a forward pass, the lock taken per batch; setting `cancel` (the
        client has left) stops before the next batch."""
        answers: list[Answer] = []
        for start in range(0, len(texts), batch_size):
            if cancel is not None and cancel.is_set():
                break  # nobody is left to read the answer
            conversations = [[{"role": "user", "content": text}] for text in texts[start : start + batch_size]]
            with self.lock:
                answers += self.classifier.classify(conversations, batch_size)
        return answers


class ClassifierPool:
    def __init__(self, batch_size: int = DEFAULT_BATCH_SIZE):
        self.batch_size = batch_size
        self._loaded: dict[str, LoadedClassifier] = {}
        self._lock = threading.Lock()  # guards _loaded; held while a run loads (once per run)

    def get(self, run_dir: str) -> LoadedClassifier:
        """The classifier of `run_dir`, loaded on first use."""
        with self._lock:
            if run_dir not in self._loaded:
                self._loaded[run_dir] = LoadedClassifier(Classifier.load(Path(run_dir)))
            return self._loaded[run_dir]


def parse_inputs(request: dict[str, Any]) -> dict[str, str]:
    """The texts to classify, each under the parameter that names it (`input`, or `input[i]` of a list); any other
    key, a missing or empty input, or an item that is not a non-empty string is a RequestError naming it."""
    for key in request:
        if key not in PARAMETERS:
            raise RequestError(
                f"Unrecognized request argument supplied: {key}; fix: send only {' and '.join(PARAMETERS)}",
                key,
                "unknown_parameter",
            )
    if request.get("input") is None:
        raise RequestError("Missing required parameter: 'input'.", "input", "missing_required_parameter")
    value = request["input"]
    if not isinstance(value, (str, list)) or value == []:
        raise RequestError(
            f"'input' must be a string or a non-empty list of strings, got {type(value).__name__} "
            f"{str(value)[:40]!r}; fix: send the text, or a list of texts",
            "input",
        )
    inputs = {"input": value} if isinstance(value, str) else {f"input[{i}]": text for i, text in enumerate(value)}
    for param, text in inputs.items():
        if not isinstance(text, str):
            raise RequestError(
                f"'{param}' must be a string, got {type(text).__name__}; fix: send each text as a string", param
            )
        if not text.strip():
            raise RequestError(f"'{param}' is empty; fix: send the text to classify", param)
    return inputs


def classifications(
    pool: ClassifierPool, run_dir: str, request: dict[str, Any], cancel: threading.Event | None = None
) -> dict[str, Any]:
    """The reply to a classifications request for the classifier of `run_dir`: the request is checked, and texts
    too long for the classifier's context refused, before its model runs."""
    inputs = parse_inputs(request)
    loaded = pool.get(run_dir)
    for param, text in inputs.items():
        check_prompt_bytes(loaded.classifier, text, param)  # reads only the model's config
    answers = loaded.classify(list(inputs.values()), pool.batch_size, cancel)
    return {
        "object": "list",
        "model": request["model"],
        "data": [
            {
                "object": "classification",
                "index": index,
                "label": answer.label,
                "probability": answer.confidence,
                "abstained": answer.abstained,
                "probabilities": answer.probabilities,
            }
            for index, answer in enumerate(answers)
        ],
    }
