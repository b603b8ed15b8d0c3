"""What a model holds as a run stores and runs it (`tunesmith plan` and train's memory check, train/plan.py): its
parameters' bytes, counted on the model built on the meta device with the adapter applied (Structure: no weight is
read), a distillation teacher's, and a training step's activation peak, measured rather than modelled (Probe).

For the activations, every family, adapter, dtype, fused path and recompute setting counts as it runs: copies of the
model with one and with two decoder layers of each kind (Gemma's sliding and full layers are kinds), zero weights,
run a forward and backward of a micro-batch's shape (its examples' lengths) through the run's own path, and torch's
profiler records every allocation and free. Two layers less one is a layer's share; the rest is the embeddings', the
head's and the transients' (the head's chunk of logits, the gradients flowing through a layer, a recomputed layer).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from tunesmith.config.schema import Config
from tunesmith.errors import UserError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4 bits, an 8-bit scale per 64 weights, a float32 per 256 scales


@dataclass(frozen=True)
class Probe:
    """What one step over the largest micro-batch holds at its peak beyond weights, gradients and optimizer state:
    the part outside the decoder layers (embeddings, head, the transients of backward and of a recomputed layer),
    and each layer's share (per kind of layer, in the model's order)."""

    outside: float
    per_layer: list[float]

    @property
    def activations(self) -> float:
        return self.outside + sum(self.per_layer)


def probe_activations(
    config: Config, amp_dtype: torch.dtype | None, num_labels: int | None, segments: tuple[int, ...]
) -> Probe:
    """Measure a step's activation peak for a micro-batch of `segments` (its examples' lengths) on copies of the
    model with one and two decoder layers of each kind (zero weights: shapes are what count). The random state is
    left as it was, so a run that plans before it trains draws what it would have drawn."""
    from tunesmith.models.loading import resolve_model

    directory = resolve_model(config.model)
    key = (
        str(directory),
        (directory / "config.json").stat().st_mtime_ns,
        config.adapter.model_dump_json(),
        str(amp_dtype),
        str(config.train.gradient_checkpointing),
        num_labels,
        tuple(segments),
    )
    if key not in PROBED:  # a process that trains several runs (the service's worker, the tests) probes each once
        PROBED[key] = measure_probe(config, amp_dtype, num_labels, segments, layer_kinds(directory))
    return PROBED[key]


PROBED: dict[tuple, Probe] = {}


def measure_probe(
    config: Config, amp_dtype: torch.dtype | None, num_labels: int | None, segments: tuple[int, ...], kinds: list[str]
) -> Probe:
    """probe_activations' measurement, on copies of the model with `kinds` layers."""
    share, outside = {}, 0.0
    with torch.random.fork_rng(devices=[]):
        for kind in dict.fromkeys(kinds):
            one = step_peak(config, amp_dtype, num_labels, segments, [kind])
            two = step_peak(config, amp_dtype, num_labels, segments, [kind, kind])
            share[kind] = max(0.0, two - one)
            outside = max(outside, one - share[kind])
    return Probe(outside=outside, per_layer=[share[kind] for kind in kinds])


def layer_kinds(directory: Path) -> list[str]:
    """Each decoder layer's kind (config.layer_types: sliding or full attention, ...), or one kind for all."""
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    text = config.get("text_config", config)
    types = text.get("layer_types")
    count = text.get("num_hidden_layers", 1)
    return list(types[:count]) if types else ["full_attention"] * count


def step_peak(
    config: Config, amp_dtype: torch.dtype | None, num_labels: int | None, segments: tuple[int, ...], kinds: list[str]
) -> float:
    """The most bytes alive at once, beyond the weights and their gradients, while the run's forward and backward
    go through a micro-batch of `segments` on a copy of the model with `kinds` decoder layers: every allocation and
    free on the way, as torch's profiler records them."""
    from torch.profiler import ProfilerActivity, profile

    from tunesmith.data.packing import Batch
    from tunesmith.models.adapters import load_options
    from tunesmith.models.loading import skeleton_model
    from tunesmith.models.precision import autocast
    from tunesmith.train import build

    adapter = config.adapter
    if adapter.type == "freeze":  # every probe layer stands for a trained one: its modules may name no probe layer
        adapter = adapter.model_copy(update={"layers": len(kinds), "modules": []})
    elif adapter.layers is not None:  # every probe layer stands for an adapted one
        adapter = adapter.model_copy(update={"layers": None})
    cpu = torch.device("cpu")
    if load_options(adapter.type):  # QLoRA: quantised as it loads, so loaded from a copy on disk
        with tempfile.TemporaryDirectory(prefix="tunesmith-probe-") as scratch:
            directory = probe_model_directory(config.model, kinds, Path(scratch))
            model = build.build_model(str(directory), adapter, cpu, num_labels, amp_dtype)
    else:
        base = skeleton_model(config.model, num_labels=num_labels, layer_types=kinds, device="cpu")
        model = build.build_model(str(config.model), adapter, cpu, num_labels, amp_dtype, base=base)
    if config.train.gradient_checkpointing:
        build.enable_gradient_checkpointing(model, config.train.gradient_checkpointing)
    model.train()
    tokens = sum(segments)
    ids = torch.arange(tokens).remainder(model.get_input_embeddings().num_embeddings)[None]
    positions = torch.cat([torch.arange(length) for length in segments])[None]
    batch = Batch(ids, ids.clone(), positions, tuple(segments), tokens, len(segments))
    if num_labels is not None:
        batch.labels = torch.zeros(len(segments), dtype=torch.long)
        batch.scores = torch.zeros(len(segments))
    objective = probe_objective(num_labels)
    gradients = 4.0 * sum(p.numel() for p in model.parameters() if p.requires_grad)
    with autocast(torch.device("cpu"), amp_dtype):  # a pass first: what only a process's first pass allocates
        objective(model, batch).backward()  # (kernels' buffers, recompute's state) is no step's
    model.zero_grad(set_to_none=True)
    with stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as recorded:
        with autocast(torch.device("cpu"), amp_dtype):
            loss = objective(model, batch)
        loss.backward()
    changes = sorted(
        (event.start_ns(), event.nbytes())
        for event in recorded.profiler.kineto_results.events()
        if event.name() == "[memory]"
    )
    alive = peak = 0
    for _, change in changes:
        alive += change
        peak = max(peak, alive)
    return max(0.0, peak - gradients)


@contextlib.contextmanager
def stderr_silenced():
    """The profiler's own library prints a line as it starts and stops, to the process's stderr: not the user's."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def probe_model_directory(spec: str, kinds: list[str], directory: Path) -> Path:
    """A copy of model `spec` with `kinds` decoder layers and zero weights, saved in `directory` with its tokenizer
    files, so that the probe loads it as training loads the real one (QLoRA's quantisation included)."""
    import shutil

    from tunesmith.models.loading import quiet_transformers, resolve_model, skeleton_model

    source = resolve_model(spec)
    with quiet_transformers():
        skeleton_model(spec, layer_types=kinds, device="cpu").save_pretrained(directory)
    for path in source.iterdir():  # the tokenizer's files and the rest, not the weights or their config
        if path.is_file() and not (directory / path.name).exists() and path.suffix not in WEIGHT_SUFFIXES:
            shutil.copy(path, directory / path.name)
    return directory


def probe_objective(num_labels: int | None):
    """The loss the probe runs: the token loss, or a sequence classifier's."""
    from tunesmith.train.step import TOKEN_LOSS

    if num_labels is None:
        return TOKEN_LOSS
    from tunesmith.train.classify_loss import ClassifyObjective

    return ClassifyObjective()


@dataclass(frozen=True)
class Structure:
    """The model's parameters as a run stores them, from the model built on the meta device."""

    parameters: int
    trainable: int
    weight_bytes: float
    matmul_weights: int  # weights of the matrix products one token passes through (the head included)
    trained_matmul_weights: int  # those of them that train (their weight gradients double backward's work)
    largest_layer_bytes: float  # one decoder layer's weights in the compute dtype (FSDP gathers one at a time)
    file_bytes: float  # the checkpoint's weight files
    layers: int
    attention_width: int  # query heads x head size

    @classmethod
    def of(cls, config: Config, amp_dtype: torch.dtype | None, num_labels: int | None) -> "Structure":
        from tunesmith.models.adapters import apply_adapter
        from tunesmith.models.loading import resolve_model, skeleton_model
        from tunesmith.train.build import shard_units

        model = skeleton_model(config.model, num_labels=num_labels)
        quantized = config.adapter.type == "qlora"
        adapter = config.adapter.model_copy(update={"type": "lora"}) if quantized else config.adapter
        with torch.device("meta"):
            model = apply_adapter(model, adapter)
        frozen_bytes = 2 if amp_dtype is not None else 4
        layers = shard_units(model)  # the decoder layers
        in_layers = {id(p) for layer in layers for p in layer.parameters()}
        parameters = trainable = matmul = trained_matmul = 0
        weight_bytes = 0.0
        for name, parameter in model.named_parameters():
            count = parameter.numel()
            parameters += count
            if parameter.requires_grad:
                trainable += count
                weight_bytes += 4 * count
            elif parameter.ndim >= 2:
                nf4 = quantized and id(parameter) in in_layers and "lora_" not in name
                weight_bytes += (NF4_BYTES if nf4 else frozen_bytes) * count
            else:
                weight_bytes += 4 * count
            if parameter.ndim == 2 and "embed" not in name:
                matmul += count
                trained_matmul += count if parameter.requires_grad else 0
        embedding = model.get_input_embeddings().weight
        if getattr(model.config, "tie_word_embeddings", False) and num_labels is None:
            matmul += embedding.numel()  # the head multiplies by the embedding matrix
            trained_matmul += embedding.numel() if embedding.requires_grad else 0
        largest = max((sum(p.numel() for p in layer.parameters()) for layer in layers), default=0)
        text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        heads = getattr(text, "num_attention_heads", 0)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // max(1, heads)
        return cls(
            parameters,
            trainable,
            weight_bytes,
            matmul,
            trained_matmul,
            largest * frozen_bytes,
            sum(path.stat().st_size for path in resolve_model(config.model).iterdir() if path.suffix == ".safetensors"),
            len(layers),
            heads * head_dim,
        )

    def flops_per_token(self, config: Config, context: float) -> float:
        """Floating-point operations a trained token costs: forward 2 per matmul weight and 4 per attention
        position per query dimension; backward twice that for what trains, once for the inputs' gradients of the
        frozen rest; recompute adds a forward."""
        forward = 2 * self.matmul_weights + 4 * self.layers * self.attention_width * context
        backward = 2 * forward - 2 * (self.matmul_weights - self.trained_matmul_weights)
        extra = forward if config.train.gradient_checkpointing else 0
        return forward + backward + extra


def teacher_bytes(config: Config, amp_dtype: torch.dtype | None) -> float:
    """A distillation teacher's frozen weights (every process holds one), in the compute dtype: a model, or a run's
    base; 0 for the other methods."""
    from tunesmith import rundir
    from tunesmith.models.loading import skeleton_model

    if config.method != "distill":
        return 0.0
    spec = config.distill.teacher
    try:
        if rundir.is_run_dir(Path(spec)):
            spec = rundir.read_run_config(Path(spec)).model
        count = sum(parameter.numel() for parameter in skeleton_model(spec).parameters())
    except UserError:
        return 0.0  # a teacher that cannot be found: the recipe refuses it, naming distill.teacher, as it loads it
    return count * (2.0 if amp_dtype is not None else 4.0)
