"""The model families whose fused training paths are checked against the family's own transformers model
(tests/test_architectures.py, docs/models.md), by transformers' `model_type`.

Any other architecture loads and trains on the unfused paths: PEFT's own LoRA layers, transformers' SDPA attention
(packed rows masked by their restarting position ids) and the output head's logits, never tunesmith's kernels,
which nobody has shown exact on it. Training says so once, naming what is off (engine/forward.training_paths).
"""

from __future__ import annotations

from typing import Any

CHECKED = frozenset(
    {
        "llama",
        "qwen2",
        "qwen3",
        "gemma2",
        "gemma3_text",
        "mistral",
        "phi3",
        "olmo2",
        "granite",
        "smollm3",
        "qwen3_moe",
        "mixtral",
        "olmoe",
    }
)


def is_checked(config: Any) -> bool:
    """Whether a model (its config) is of a family the fused paths are checked on."""
    return getattr(config, "model_type", None) in CHECKED
