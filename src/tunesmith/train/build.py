"""What a run trains, built from its config: the model (its base, adapter, dtype, recompute and compilation) and the
batch plans (steps of packed rows, in micro-batches of train.micro_batch_tokens). train/session.py opens a run with
these; train/plan.py builds the same pieces to predict a run's memory and time before it starts.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from tunesmith.config.auto import RL_METHODS
from tunesmith.config.schema import AdapterConfig, Config, TrainConfig
from tunesmith.data.dataset import PreparedData
from tunesmith.data.packing import BatchPlan, epoch_rows
from tunesmith.engine.forward import decoder_and_head
from tunesmith.models import load_model
from tunesmith.models.adapters import apply_adapter, load_options, output_name
from tunesmith.models.precision import store_frozen_in


def examples_per_row(config: Config, data: PreparedData) -> float:
    """How many training examples a row of the first epoch holds (1 without packing), for "auto" settings."""
    lengths = [len(unit) for unit in data.train]
    if not (config.data.packing and lengths) or config.method in RL_METHODS:
        return 1.0
    return len(lengths) / max(1, len(epoch_rows(lengths, config.data.max_length, True, config.train.seed, 0)))


def build_model(
    model_spec: str,
    adapter: AdapterConfig,
    device: torch.device,
    num_labels: int | None = None,
    dtype: torch.dtype | None = None,
    base: torch.nn.Module | None = None,
) -> torch.nn.Module:
    """The model to train, on `device`: the base `model_spec` (QLoRA: 4-bit, placed as it loads) with `adapter`;
    with `num_labels`, the base as a sequence classifier with that many outputs. With a compute `dtype` (bf16
    training on one process; FSDP keeps its own copies), the frozen weight matrices are stored in it and the
    trainable ones in float32 (store_frozen_in); a base the adapter leaves frozen loads in `dtype` directly, so
    no float32 copy of it ever exists. `base`: that model already built (not QLoRA's), instead of loading it."""
    quantized = load_options(adapter.type)
    trains_base = output_name(adapter.type) == "model"  # full, freeze: the base's own weights train
    stored = dtype if dtype is not None and not trains_base else torch.float32
    if base is not None and not quantized:
        model = base.to(stored)
    else:
        model, _ = load_model(model_spec, device=device, num_labels=num_labels, dtype=stored, **quantized)
    model = apply_adapter(model, adapter)
    if dtype is not None:
        store_frozen_in(model, dtype)
    return model if quantized else model.to(device)


AUTO_MICRO_BATCH_TOKENS = 1024  # train.micro_batch_tokens: auto on a CPU (BENCHMARKS.md, the budget sweep)


def build_plans(config: Config, data: PreparedData, device: torch.device) -> tuple[BatchPlan, list]:
    """The training batch plan and the validation batches (every validation example once).

    A row holds data.max_length tokens per sequence of a unit: one example, or both sides of a pair."""
    per_unit = len(data.train[0].segments()) if data.train else 1
    options = dict(capacity=config.data.max_length * per_unit, packing=config.data.packing, seed=config.train.seed)
    plan = BatchPlan(
        data.train,
        batch_size=config.train.batch_size,
        grad_accum=config.train.grad_accum,
        max_tokens=micro_batch_tokens(config.train, device),
        **options,
    )
    validation = BatchPlan(data.validation, batch_size=config.train.batch_size, grad_accum=1, **options).eval_batches()
    return plan, validation


def micro_batch_tokens(train: TrainConfig, device: torch.device) -> int | None:
    """train.micro_batch_tokens with auto resolved for `device`: a CPU's budget, or no limit on a GPU (whose
    throughput wants the largest batch that fits)."""
    value = train.micro_batch_tokens
    if value == "auto":
        return AUTO_MICRO_BATCH_TOKENS if device.type == "cpu" else None
    return value


def shard_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers, which FSDP shards one by one (each gathered only while it runs)."""
    return [module for name, module in model.named_modules() if re.fullmatch(r"(.*\.)?layers\.\d+", name)]


def count_steps(plan: BatchPlan, epochs: int, max_steps: int | None) -> int:
    """The run's optimizer steps: train.max_steps when set, exactly (HF Trainer's rule: it overrides epochs, and
    `advance` carries the data position into as many further epochs, each shuffled anew, as that takes);
    else every step of `epochs` epochs. The learning-rate schedule spans this count."""
    if max_steps is not None:
        return max_steps
    return sum(plan.steps_in_epoch(epoch) for epoch in range(epochs))


def compile_layers(model: torch.nn.Module) -> None:
    """torch.compile every decoder layer, shapes dynamic (one graph for every packed length).

    The padding-free attention stays eager (it loops over examples); generation runs eagerly too
    (engine/generation.py), so only training and scoring passes use the compiled layers.
    """
    decoder, _ = decoder_and_head(model)
    for layer in decoder.layers:
        layer.compile(dynamic=True)


def enable_gradient_checkpointing(model: torch.nn.Module, mode: bool | str = True) -> None:
    """Recompute each decoder layer's activations in backward: all of them (`True`), or with `"selective"` only
    the element-wise ops, the layer keeping its matrix products' and attention's outputs (`keep_products`)."""
    import functools

    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    from tunesmith.models import fused_lora

    options: dict[str, Any] = {"use_reentrant": False}
    if mode == "selective":
        options["context_fn"] = functools.partial(create_selective_checkpoint_contexts, keep_products)
        fused_lora.accumulate_out_of_place(model)  # an output kept for recompute must not change afterwards
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()


PRODUCTS = {"mm": 0, "addmm": 1, "bmm": 0}  # matrix products -> the argument holding their left operand


ATTENTION = ("scaled_dot_product", "flash_attention", "efficient_attention", "cudnn_attention", "causal_attention")


def keep_products(context: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
    """Selective recompute's policy: which op outputs a checkpointed layer keeps.

    Kept: attention, and matrix products worth more than their memory; everything else (norms, activations,
    rotary embeddings, residual adds) is recomputed in backward from them, which costs a few element-wise
    passes. A low-rank product (inner dimension at most 1/8 of its output width, a LoRA up-projection) is
    recomputed too: redoing it is cheap, and its output is as large as the layer's.
    """
    from torch.utils.checkpoint import CheckpointPolicy

    name = op._overloadpacket.__name__
    if any(part in name for part in ATTENTION):
        return CheckpointPolicy.MUST_SAVE
    if name in PRODUCTS:
        left, right = args[PRODUCTS[name]], args[PRODUCTS[name] + 1]
        low_rank = left.shape[-1] * 8 <= right.shape[-1]
        return CheckpointPolicy.PREFER_RECOMPUTE if low_rank else CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE
