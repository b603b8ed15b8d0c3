"""Adapter types: how a loaded model is made trainable, saved and reloaded. Each is registered by name.

LoRA goes through PEFT, so the saved adapter is PEFT's own format that plain transformers + peft load.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tunesmith.config import AdapterConfig
from tunesmith.models.fused_lora import fuse_lora_layers
from tunesmith.registry import adapters


@adapters.register("lora", output="adapter")
def apply_lora(model: torch.nn.Module, config: AdapterConfig) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=config.target,
                      bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    fuse_lora_layers(model)
    return model


@adapters.register("full", output="model")
def apply_full(model: torch.nn.Module, config: AdapterConfig) -> torch.nn.Module:
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return model


def apply_adapter(model: torch.nn.Module, config: AdapterConfig) -> torch.nn.Module:
    return adapters.get(config.type, key="adapter.type")(model, config)


def output_name(adapter_type: str) -> str:
    """The run-directory folder the final weights go to: adapter/ or model/."""
    return adapters.info(adapter_type)["output"]


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train, by name: what a checkpoint must hold besides the frozen base."""
    return {name: parameter.detach() for name, parameter in model.named_parameters() if parameter.requires_grad}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    parameters = dict(model.named_parameters())
    missing = [name for name in parameters if parameters[name].requires_grad and name not in state]
    unexpected = [name for name in state if name not in parameters]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        for name, tensor in state.items():
            parameters[name].copy_(tensor)


def save_final(model: torch.nn.Module, tokenizer: Any, directory: Path) -> None:
    """PEFT format (adapter_config.json + adapter_model.safetensors) or a full HF model directory."""
    unwrapped = getattr(model, "module", model)
    unwrapped.save_pretrained(directory, safe_serialization=True)
    if not hasattr(unwrapped, "peft_config"):
        tokenizer.save_pretrained(directory)


def load_adapter(model: torch.nn.Module, directory: Path) -> torch.nn.Module:
    """Apply a saved PEFT adapter to a base model (inference)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, str(directory), is_trainable=False)
    fuse_lora_layers(model)
    return model
