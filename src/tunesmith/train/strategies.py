"""Training strategies against forgetting: gradual unfreezing, L2/L1 toward the pretrained weights, and
layer-wise learning-rate decay. Each works for full fine-tuning and for every layer-wise adapter.

All three see the model as groups ordered from the output down: the output head and final norm with
the top decoder layer, then each decoder layer below it, then the embeddings (a parameter's layer is
the number after `layers.` in its name).
"""

from __future__ import annotations

import re

import torch

from tunesmith.config.schema import RegularizationConfig, UnfreezeConfig
from tunesmith.models.heads import is_head

LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
EMBEDDING = re.compile(r"embed_tokens|wte|word_embeddings|prompt_encoder")


def depth(name: str, layers: int) -> int:
    """0 for the top (head, final norm, top layer), growing downwards; layers + 1 for the embeddings."""
    found = LAYER.search(name)
    if found:
        return layers - 1 - int(found.group(1))
    return layers if EMBEDDING.search(name) else 0


def trainable_groups(model: torch.nn.Module) -> list[list[tuple[str, torch.nn.Parameter]]]:
    """The trainable parameters by depth, top first; empty depths are skipped."""
    layers = _layer_count(model)
    groups: dict[int, list] = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            groups.setdefault(depth(name, layers), []).append((name, parameter))
    return [groups[key] for key in sorted(groups)]


def _layer_count(model: torch.nn.Module) -> int:
    config = getattr(model, "config", None)
    return int(getattr(config, "num_hidden_layers", 0)) or 1 + max(
        (int(m.group(1)) for name, _ in model.named_parameters() if (m := LAYER.search(name))), default=0
    )


class GradualUnfreezing:
    """ULMFiT-style: only the top `start` groups train at first; one more every `every` steps (or epochs).

    The trainable set is a function of the step (or epoch) alone, so a resumed run freezes exactly what
    the uninterrupted one did. Frozen groups get no gradient at all (autograd stops above them).
    """

    def __init__(self, model: torch.nn.Module, config: UnfreezeConfig):
        self.groups = trainable_groups(model)
        self.config = config

    def unfrozen_at(self, step: int, epoch: int) -> int:
        clock = step if self.config.unit == "steps" else epoch
        return min(len(self.groups), self.config.start + clock // self.config.every)

    def apply(self, step: int, epoch: int, step_in_epoch: int) -> int | None:
        """Freeze what this step must not train; the number of unfrozen groups when this step opens a new
        stage (the first step, or one more group), else None. A function of the position alone."""
        count = self.unfrozen_at(step, epoch)
        for index, group in enumerate(self.groups):
            for _, parameter in group:
                parameter.requires_grad_(index < count)
        clock, at_boundary = (step, True) if self.config.unit == "steps" else (epoch, step_in_epoch == 0)
        opens = (
            at_boundary
            and clock % self.config.every == 0
            and self.config.start + clock // self.config.every <= len(self.groups)
        )
        return count if step == 0 or opens else None

    def release(self) -> None:
        """Every group trainable again, between steps: checkpoints and the final save store them all."""
        for group in self.groups:
            for _, parameter in group:
                parameter.requires_grad_(True)


class Regularization:
    """L2-SP and L1 penalties toward the starting point: weight * sum (w - w0)^2 and weight * sum |w - w0|.

    For LoRA-style adapters the starting point is the pretrained weight, so the penalty is on the
    update s B A itself (A's random start is not a reference); L2 uses ||B A||^2 = sum((B^T B) * (A A^T)),
    which never forms the (out, in) matrix. Every other trainable tensor is held near its value at the
    start of training (pretrained weights for full and freeze; initial values for other adapters).
    """

    def __init__(self, model: torch.nn.Module, config: RegularizationConfig):
        self.config = config
        self.lora: list[tuple[torch.Tensor, torch.Tensor, float]] = []
        lora_parameters: set[int] = set()
        for module in model.modules():
            if hasattr(module, "lora_A") and hasattr(module, "scaling"):  # LoRA, QLoRA and DoRA's direction
                for adapter, scaling in module.scaling.items():
                    if adapter in module.lora_A and module.lora_A[adapter].weight.requires_grad:
                        a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
                        self.lora.append((a, b, scaling))
                        lora_parameters.update((id(a), id(b)))
        self.anchored = [
            (parameter, parameter.detach().clone())
            for parameter in model.parameters()
            if parameter.requires_grad and id(parameter) not in lora_parameters
        ]

    def penalty(self) -> torch.Tensor:
        l2, l1 = self.config.l2_sp, self.config.l1_sp
        device = (self.lora[0][0] if self.lora else self.anchored[0][0]).device
        total = torch.zeros((), device=device)
        for a, b, scaling in self.lora:
            if not a.requires_grad:  # frozen for now by gradual unfreezing
                continue
            if l2:
                total = total + l2 * scaling**2 * ((b.T @ b) * (a @ a.T)).sum()
            if l1:
                total = total + l1 * scaling * (b @ a).abs().sum()
        for parameter, start in self.anchored:
            if not parameter.requires_grad:
                continue
            delta = parameter - start
            if l2:
                total = total + l2 * delta.pow(2).sum()
            if l1:
                total = total + l1 * delta.abs().sum()
        return total


def layer_lr_groups(model: torch.nn.Module, weight_decay: float, decay: float | None) -> list[dict]:
    """AdamW parameter groups: lr scaled by decay^depth (top layer 1, each layer below times `decay`);
    no weight decay on biases and norms (1-D tensors); a sequence classifier's head in groups of its own
    (`head`: True), which train at train.head_lr. Groups keep their depth order, top first."""
    layers = _layer_count(model)
    groups: dict[tuple[int, bool, bool], list] = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            level = depth(name, layers) if decay is not None else 0
            groups.setdefault((level, parameter.ndim >= 2, is_head(name)), []).append(parameter)
    return [
        {
            "params": params,
            "weight_decay": weight_decay if matrix else 0.0,
            "lr_scale": (decay**level) if decay is not None else 1.0,
            "head": head,
        }
        for (level, matrix, head), params in sorted(
            groups.items(), key=lambda item: (item[0][0], not item[0][1], item[0][2])
        )
    ]
