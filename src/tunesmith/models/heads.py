"""A model's output head: a causal LM's (tied or not to the input embedding) or a sequence classifier's, found the
same way through a PEFT wrapper by loading, the optimizer, the freeze adapter, scoring and inference."""

from __future__ import annotations

import torch

CLASSIFIER_HEADS = ("score", "classifier")


def is_head(name: str) -> bool:
    """Whether parameter `name` belongs to a sequence classifier's output head (also inside a PEFT wrapper, where
    the trained copy is `...score.modules_to_save.default.weight`)."""
    return any(part in CLASSIFIER_HEADS for part in name.split("."))


def classifier_head(model: torch.nn.Module) -> torch.nn.Module:
    """The sequence classifier's output head, through a PEFT wrapper (which trains and saves a copy of it)."""
    head = _classifier_head(base_model(model))
    if head is None:
        raise ValueError(f"{type(base_model(model)).__name__} has no classifier head ({', '.join(CLASSIFIER_HEADS)})")
    return head


def output_head(model: torch.nn.Module) -> torch.nn.Module | None:
    """The module that turns the last hidden states into outputs: the language-model head, or a classifier's."""
    base = base_model(model)
    return base.get_output_embeddings() or _classifier_head(base)


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PEFT wrapper, or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _classifier_head(base: torch.nn.Module) -> torch.nn.Module | None:
    found = (getattr(base, name, None) for name in CLASSIFIER_HEADS)
    return next((module for module in found if isinstance(module, torch.nn.Module)), None)
