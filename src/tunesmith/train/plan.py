"""`tunesmith plan`: what a run will hold in memory, and how long it will take, before it trains.

Memory is predicted per process, in bytes, part by part:

* **runtime**: the process before any model exists: Python, torch, transformers, the tokenizer and the data. The
  plan reads its own resident set after loading those, as training does first (on a GPU: CUDA_CONTEXT), and a
  distillation teacher's weights.
* **weights**: every parameter as training stores it (models/precision.store_frozen_in): trainable ones and vectors
  in float32, frozen weight matrices in the compute dtype, QLoRA's 4-bit matrices at NF4_BYTES a weight. Counted on
  the model built on the meta device with the adapter applied: no weight is read (train/footprint.py).
* **gradients** (float32, one per trainable parameter) and the **optimizer** state (AdamW: two float32 moments).
* **activations**: the most a step holds at once beyond those, for the largest micro-batch of the run's own batch
  plan: measured on one- and two-layer copies of the model through the run's own path (train/footprint.py).

The resident set is more than the live tensors, and a step is not the only peak, so the plan takes the largest of
three phases: a **training step** (all the above, plus the freed pages the allocator keeps, RETAINED of the
activations), **loading the model** (QLoRA holds the whole checkpoint as it quantises: the default model's 0.5 GiB
file made a 0.6 GiB transient) and **writing a checkpoint** (its trainable weights and optimizer state serialised,
SAVE_COPIES times: full fine-tuning peaks there).

Several processes: DDP adds a copy of the gradients (its buckets); FSDP shards weights, gradients and optimizer
state over the processes and gathers one layer at a time. On a CPU the processes share the machine's memory; on
GPUs each holds its own.

Time: tokens per step and steps come from the run's own batch plan. Without a measurement the estimate is the
step's floating-point work (6 x parameters per token for full fine-tuning, 4 x for a frozen base, one more forward
with recompute, plus attention) over the device's matmul peak, timed here, at the share of it training reaches
(EFFICIENCY, measured by bench/plan.py); `--measure` runs the config for MEASURED_STEPS real steps in a scratch
directory and scales their time instead.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from tunesmith import hardware
from tunesmith.config.auto import RL_METHODS, resolve_training
from tunesmith.config.schema import Config
from tunesmith.errors import UserError
from tunesmith.train.footprint import NF4_BYTES, Probe, Structure, probe_activations, teacher_bytes

MIB = 2**20
GIB = 2**30
ADAM_STATES = 2  # AdamW's first and second moments, float32 each
CUDA_CONTEXT = 600 * MIB  # what a process's CUDA context and kernels take on a GPU before any tensor
# The share of matmul_peak a training step reaches: on a CPU, LoRA and full fine-tuning of 512-token micro-batches
# on the default model (bench/plan.py, a 2-core Xeon with AMX: float32 0.63, bfloat16 0.19-0.20: its small matrices
# keep AMX's tiles half idle); a GPU's is the field's usual figure for small models, unmeasured here.
EFFICIENCY = {("cpu", "float32"): 0.6, ("cpu", "bfloat16"): 0.2, ("cuda", "float32"): 0.3, ("cuda", "bfloat16"): 0.3}
MEASURED_STEPS = 5  # --measure: a run this long; the first WARMUP_STEPS warm up (kernels, allocator pages)
WARMUP_STEPS = 2  # full fine-tuning's steps 2-3 of 2,048 tokens took 5.60 s, steps 2-8 4.15 s (docs/plan.md)
# Freed pages an allocator keeps beyond a step's live peak, as a share of it: jemalloc's FreedPages returns them past
# 1.25x a step's need (allocator.py); measured on the default model's LoRA and QLoRA steps of 512 and 2,048 tokens
# (docs/plan.md). glibc's malloc fragments far more (allocator.py: 5.7 GB of RSS for 2 GB of live tensors).
RETAINED = {"jemalloc": 0.35, "system": 1.8}
SAVE_COPIES = 2  # a checkpoint's tensors are gathered flat, then serialised into one buffer (train/checkpoint.py)


@dataclass(frozen=True)
class Memory:
    """Bytes one process holds at its peak, part by part."""

    runtime: float
    weights: float
    gradients: float
    optimizer: float
    activations: float  # a step's peak beyond the rest: saved activations and backward's transients (live bytes)
    retained: float  # what the allocator keeps of the pages steps free, as a share of `activations` (RETAINED)
    loading: float  # loading's transient beyond the stored weights (QLoRA: the checkpoint, read before quantising)
    saving: float  # a checkpoint's transient: its trainable weights and optimizer state, serialised

    @property
    def training(self) -> float:
        return self.runtime + self.weights + self.gradients + self.optimizer + self.activations * (1 + self.retained)

    @property
    def peak(self) -> float:
        """The largest of the run's three phases: loading the model, a training step, writing a checkpoint."""
        load = self.runtime + self.weights + self.loading
        save = self.runtime + self.weights + self.optimizer + self.saving
        return max(load, self.training, save)

    @property
    def phase(self) -> str:
        if self.peak == self.training:
            return "a training step"
        return "loading the model" if self.peak == self.runtime + self.weights + self.loading else "a checkpoint"


@dataclass
class Plan:
    method: str
    adapter: str
    model: str
    device: str
    dtype: str
    recompute: str
    processes: int
    parallel: str
    parameters: int
    trainable: int
    memory: Memory
    micro_batch_tokens: int  # the largest micro-batch's
    micro_batches: int  # per optimizer step, on each process
    tokens_per_step: float  # mean over the first epoch
    steps: int
    flops_per_token: float
    available: float | None  # bytes the processes may use on this machine (None: unknown)
    seconds_per_step: float | None = None
    estimate: str = ""  # how seconds_per_step was found
    measured: dict[str, float] = field(default_factory=dict)  # --measure: the short run's own figures
    fits_hint: list[str] = field(default_factory=list)

    @property
    def machine_peak(self) -> float:
        """Bytes the run needs of one machine's memory: every process on a CPU; one GPU's share on GPUs."""
        return self.memory.peak * (self.processes if self.device == "cpu" else 1)


def plan_run(config: Config, processes: int = 1, measure: bool = False) -> Plan:
    """The plan for `config` on this machine with `processes` processes (train.parallel says how they split):
    memory, tokens and steps, and the time from the device's peak or (`measure`) from real steps."""
    from tunesmith.models import load_tokenizer
    from tunesmith.models.precision import compute_dtype
    from tunesmith.train import build
    from tunesmith.train.runtime import pick_device

    if config.method in RL_METHODS:
        raise UserError(
            f"method {config.method}: tunesmith plan covers the methods that train on fixed examples (sft, pretrain, "
            f"classify, reward, dpo, distill); an RL run's memory depends on what it generates; fix: plan its update "
            f"as method sft on the same model and adapter, or run it with train.max_steps=3 and read peak memory"
        )
    data, labels = load_data(config, load_tokenizer(config.model))
    resolve_training(config, len(data.train), build.examples_per_row(config, data), announce=False)
    device = pick_device(config.train)
    amp_dtype, _ = compute_dtype(config.train, device)
    num_labels = len(labels) if labels is not None else (1 if config.method == "reward" else None)
    result = plan_memory(config, data, device, amp_dtype, processes, num_labels)
    if measure:
        measure_steps(result, config)
    else:
        peak = hardware.matmul_peak(device, amp_dtype)
        share = EFFICIENCY[(device.type, result.dtype)]
        result.seconds_per_step = result.tokens_per_step * result.flops_per_token / (peak * share * processes)
        result.estimate = (
            f"from the device's peak: {peak / 1e9:,.0f} GFLOP/s measured ({result.dtype} matmul) at the "
            f"{share:.0%} a step reaches (bench/plan.py); --measure times real steps"
        )
    return result


def plan_memory(
    config: Config,
    data: Any,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    processes: int,
    num_labels: int | None = None,
) -> Plan:
    """The plan's memory, tokens and steps for `config` (its "auto" settings resolved) over its prepared `data`;
    `num_labels`: the outputs of the sequence classifier it trains (classify, reward), else None."""
    from tunesmith.allocator import FREED_PAGES
    from tunesmith.data.packing import BatchPlan
    from tunesmith.train import build

    train = config.train
    plan = BatchPlan(
        data.train,
        batch_size=train.batch_size,
        grad_accum=train.grad_accum,
        max_tokens=build.micro_batch_tokens(train, device),
        capacity=config.data.max_length * (len(data.train[0].segments()) if data.train else 1),
        packing=config.data.packing,
        seed=train.seed,
    )
    per_step, largest, micro = [], (), 0  # largest: the segment lengths of the largest micro-batch of any rank
    for index in range(plan.steps_in_epoch(0)):
        shares = plan.step_units(0, index, processes)
        micro = max(micro, *(len(share) for share in shares))
        per_step.append(sum(len(unit) for share in shares for units in share for unit in units))
        for units in (units for share in shares for units in share):
            segments = tuple(len(segment) for unit in units for segment in unit.segments())
            largest = max(largest, segments, key=sum)
    if not largest:
        raise UserError(f"{config.data.train}: no training examples; fix: give data.train a file with examples")
    structure = Structure.of(config, amp_dtype, num_labels)
    probe = probe_activations(config, amp_dtype, num_labels, largest)
    gc.collect()  # the probe's models (a PEFT model holds reference cycles) and their pages: a run that planned
    FREED_PAGES.release()  # must not start out holding them
    # Measured after the probe, which imported what training imports too (peft, the model's classes).
    runtime = CUDA_CONTEXT if device.type == "cuda" else hardware.resident_bytes()
    result = Plan(
        method=config.method,
        adapter=config.adapter.type,
        model=str(config.model),
        device=device.type,
        dtype="float32" if amp_dtype is None else "bfloat16",
        recompute=recompute_name(train.gradient_checkpointing),
        processes=processes,
        parallel=train.parallel if processes > 1 else "one process",
        parameters=structure.parameters,
        trainable=structure.trainable,
        memory=predict_memory(
            structure, probe, runtime + teacher_bytes(config, amp_dtype), processes, train.parallel, config.adapter.type
        ),
        micro_batch_tokens=sum(largest),
        micro_batches=micro,
        tokens_per_step=sum(per_step) / len(per_step),
        steps=build.count_steps(plan, train.epochs, train.max_steps),
        flops_per_token=structure.flops_per_token(config, mean_context(data.train)),
        available=hardware.available_memory(device),
    )
    if result.available is not None and result.machine_peak > result.available:
        result.fits_hint = knobs(result, structure, config, amp_dtype, num_labels, largest)
    return result


def check_fits(plan: Plan) -> None:
    """Refuse a run whose predicted peak exceeds what this machine has free, with the prediction and what would
    fit; train.memory_check=false trains anyway."""
    if plan.available is None or plan.machine_peak <= plan.available:
        return
    where = "CPU RAM" if plan.device == "cpu" else "GPU memory"
    memory = plan.memory
    parts = ", ".join(
        f"{name} {gib(value)}"
        for name, value in (
            ("runtime", memory.runtime),
            ("weights", memory.weights),
            ("gradients", memory.gradients),
            ("optimizer", memory.optimizer),
            (f"activations of {plan.micro_batch_tokens:,} tokens", memory.activations),
        )
    )
    options = "; ".join(plan.fits_hint + ["or train.memory_check=false to train anyway"])
    raise UserError(
        f"this run needs about {gib(plan.machine_peak)} of {where} ({parts}"
        + (f"; x {plan.processes} processes" if plan.processes > 1 and plan.device == "cpu" else "")
        + f"), and {gib(plan.available)} is available (tunesmith plan shows the whole prediction); fix: {options}"
    )


def load_data(config: Config, tokenizer: Any) -> tuple[Any, list[str] | None]:
    """The training data as the method's recipe prepares it (its formats), and a classifier's labels."""
    from tunesmith.data.dataset import prepare_data
    from tunesmith.registry import methods

    info = methods.info(config.method)
    labels = info["labels"](config) if "labels" in info else None  # a classifier's: its recipe reads them
    accepts = info["accepts"]
    return prepare_data(config.data, tokenizer, accepts, config.method, config.train.seed, labels), labels


def recompute_name(setting: bool | str) -> str:
    return {True: "every layer", False: "off"}.get(setting, str(setting))  # type: ignore[arg-type]


def mean_context(examples: list) -> float:
    """The mean position's attention span in the data (half an example's length, weighted by its tokens)."""
    lengths = [len(example) for example in examples]
    return sum(length * length / 2 for length in lengths) / max(1, sum(lengths))


def predict_memory(
    structure: Structure, probe: Probe, runtime: float, processes: int, parallel: str, adapter: str
) -> Memory:
    """One process's bytes at its peak: whole copies on one process and under DDP (plus its gradient buckets),
    shards under FSDP (plus the layer it has gathered, and the next one it prefetches)."""
    gradients = 4.0 * structure.trainable
    optimizer = 4.0 * ADAM_STATES * structure.trainable
    weights = structure.weight_bytes
    if processes > 1 and parallel == "fsdp":
        weights = weights / processes + 2 * structure.largest_layer_bytes
        gradients /= processes
        optimizer /= processes
    elif processes > 1:
        gradients *= 2  # DDP's buckets hold a second copy for the all-reduce
    loading = structure.file_bytes if adapter == "qlora" else 0.0
    saving = SAVE_COPIES * (4.0 * structure.trainable / (processes if parallel == "fsdp" else 1) + optimizer)
    return Memory(runtime, weights, gradients, optimizer, probe.activations, retained(), loading, saving)


def retained() -> float:
    """RETAINED for the allocator training will run on (allocator.py: jemalloc where the system has it)."""
    from tunesmith.allocator import jemalloc_library

    system = os.environ.get("TUNESMITH_ALLOCATOR", "auto") == "system" or jemalloc_library() is None
    return RETAINED["system" if system else "jemalloc"]


def knobs(
    plan: Plan,
    structure: Structure,
    config: Config,
    amp_dtype: torch.dtype | None,
    num_labels: int | None,
    segments: tuple[int, ...],
) -> list[str]:
    """The settings that would shrink this run's peak, each with the peak it would give."""
    memory, options = plan.memory, []
    train = config.train

    def peak(**changes: float) -> str:
        return gib(replace(memory, **changes).peak * scale(plan))

    if len(segments) > 1:  # a micro-batch of several examples can be split (one example runs whole)
        options.append(
            f"train.micro_batch_tokens={plan.micro_batch_tokens // 2}: about {peak(activations=memory.activations / 2)}"
            " (activations halve; the batch stays the same)"
        )
    if not train.gradient_checkpointing:
        recomputed = config.model_copy(deep=True)
        recomputed.train.gradient_checkpointing = True
        kept = probe_activations(recomputed, amp_dtype, num_labels, segments).activations
        options.append(
            f"train.gradient_checkpointing=true: {peak(activations=kept)} (each layer keeps its input and is "
            "recomputed in backward: about a third more time)"
        )
    frozen = 2.0 if amp_dtype is not None else 4.0
    if config.adapter.type in ("full", "freeze"):
        lora = peak(weights=structure.parameters * frozen, gradients=0.0, optimizer=0.0, saving=0.0)
        options.append(f"adapter.type=lora: about {lora} (the base frozen; the adapter adds a few MB)")
    if config.adapter.type in ("lora", "dora"):
        quantized = peak(
            weights=memory.weights - structure.matmul_weights * (frozen - NF4_BYTES),
            loading=structure.file_bytes,
        )
        options.append(f"adapter.type=qlora: about {quantized} (the base's matrices in 4-bit NF4)")
    if plan.device == "cuda" and train.parallel != "fsdp" and structure.trainable > structure.parameters / 2:
        options.append("train.parallel=fsdp with --nproc N: weights, gradients and optimizer state split over N GPUs")
    return options


def scale(plan: Plan) -> int:
    return plan.processes if plan.device == "cpu" else 1


def measure_steps(plan: Plan, config: Config) -> None:
    """Run the config for MEASURED_STEPS steps in a scratch directory (its own process, as `tunesmith train` runs
    it) and scale the time of the steps after the first to the plan's tokens per step."""
    import yaml

    with tempfile.TemporaryDirectory(prefix="tunesmith-plan-") as scratch:
        short = config.model_copy(deep=True)
        short.output_dir = Path(scratch) / "run"
        short.train.max_steps = MEASURED_STEPS
        short.train.resume = "never"
        short.train.eval_every = short.train.save_every = 10**9
        short.train.progress = False
        short.train.log_every = 1
        short.train.early_stopping.patience = None
        short.eval.every = None
        path = Path(scratch) / "config.yaml"
        path.write_text(yaml.safe_dump(short.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
        command = [sys.executable, "-m", "tunesmith", "train", str(path)]
        if plan.processes > 1:
            command += ["--nproc", str(plan.processes)]
        started = time.perf_counter()
        finished = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if finished.returncode != 0:
            raise UserError(f"--measure: the {MEASURED_STEPS}-step run failed:\n{finished.stderr.strip()[-2000:]}")
        records = [json.loads(line) for line in (short.output_dir / "metrics.jsonl").read_text().splitlines()]
        summary = json.loads((short.output_dir / "summary.json").read_text())
    timed = step_times(records)[WARMUP_STEPS - 1 :]
    seconds_per_token = sum(seconds for _, seconds in timed) / sum(tokens for tokens, _ in timed)
    plan.seconds_per_step = seconds_per_token * plan.tokens_per_step
    plan.measured = {
        "peak_rss_bytes": summary["peak_rss_mb"] * MIB,
        "tokens_per_s": 1 / seconds_per_token,
        "wall_seconds": time.perf_counter() - started,
    }
    plan.estimate = (
        f"measured: steps {WARMUP_STEPS + 1}-{MEASURED_STEPS} of a {MEASURED_STEPS}-step run ran "
        f"{1 / seconds_per_token:,.0f} tokens/s"
    )


def step_times(records: list[dict]) -> list[tuple[int, float]]:
    """(tokens, seconds) of each step after the first in a run's metrics.jsonl records, which log the tokens so far
    and each step's tokens/s."""
    steps = [record for record in records if "tokens_per_s" in record]
    return [
        (after["tokens"] - before["tokens"], (after["tokens"] - before["tokens"]) / after["tokens_per_s"])
        for before, after in zip(steps, steps[1:])
    ]


def gib(value: float) -> str:
    return f"{value / GIB:,.2f} GiB"


def describe(plan: Plan) -> str:
    """The plan as `tunesmith plan` prints it."""
    memory = plan.memory
    where = "CPU RAM" if plan.device == "cpu" else "each GPU's memory"
    lines = [
        f"plan: {plan.method} with {plan.adapter} on {plan.model}; {plan.device}, {plan.dtype}, recompute "
        f"{plan.recompute}, {plan.processes} process{'es' if plan.processes > 1 else ''} ({plan.parallel})",
        f"parameters: {plan.parameters:,} ({plan.trainable:,} trainable, "
        f"{plan.trainable / max(1, plan.parameters):.2%})",
        "memory per process:",
        f"  runtime (python, torch, tokenizer, data)  {gib(memory.runtime):>11}",
        f"  weights                                   {gib(memory.weights):>11}",
        f"  gradients                                 {gib(memory.gradients):>11}",
        f"  optimizer state (AdamW)                   {gib(memory.optimizer):>11}",
        f"  activations ({plan.micro_batch_tokens:,}-token micro-batch)".ljust(44) + f"{gib(memory.activations):>11}",
        f"  freed pages the allocator keeps           {gib(memory.activations * memory.retained):>11}",
        f"  a training step                           {gib(memory.training):>11}",
        f"  loading the model (transient)             {gib(memory.loading):>11}",
        f"  writing a checkpoint (transient)          {gib(memory.saving):>11}",
        f"  peak ({memory.phase})".ljust(44) + f"{gib(memory.peak):>11}",
        f"peak of {where}: {gib(plan.machine_peak)}"
        + (f" of {gib(plan.available)} available" if plan.available is not None else ""),
        f"tokens per step: {plan.tokens_per_step:,.0f} ({plan.micro_batches} micro-batch"
        f"{'es' if plan.micro_batches > 1 else ''} per process); steps: {plan.steps:,}",
    ]
    if plan.seconds_per_step is not None:
        total = plan.seconds_per_step * plan.steps
        lines.append(f"time: {plan.seconds_per_step:,.2f} s per step, {duration(total)} in all ({plan.estimate})")
    if plan.measured:
        lines.append(
            f"measured: peak RSS {gib(plan.measured['peak_rss_bytes'])} in the {MEASURED_STEPS}-step run "
            f"(predicted {gib(plan.machine_peak)})"
        )
    if plan.available is not None and plan.machine_peak > plan.available:
        lines.append("does not fit; what would:")
        lines += [f"  {hint}" for hint in plan.fits_hint]
    return "\n".join(lines)


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
