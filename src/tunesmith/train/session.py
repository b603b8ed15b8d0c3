"""A training session: the setup every training loop shares (`open_session`), and the pieces of its loop:
building the model and the batch plans, moving the counters, catching divergence, validation and
best-checkpoint selection, and shipping the result.

recipes/sft.py's `train_loop` reads top to bottom with these; the RL loop (train/rl_loop.py) uses them too.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from tunesmith import rundir
from tunesmith.allocator import FREED_PAGES
from tunesmith.config.auto import RL_METHODS, resolve_training
from tunesmith.config.schema import Config
from tunesmith.data.dataset import PreparedData
from tunesmith.data.packing import BatchPlan
from tunesmith.engine.forward import set_router_balance, training_paths
from tunesmith.errors import Problem, TrainingStopped, UserError
from tunesmith.eval.in_training import InTrainingEval, higher_is_better
from tunesmith.models import load_tokenizer
from tunesmith.models.adapters import output_name, parameter_counts, save_final
from tunesmith.models.precision import compute_dtype
from tunesmith.train import checkpoint as ckpt
from tunesmith.train import distributed
from tunesmith.train.build import (
    build_model,
    compile_layers,
    count_steps,
    enable_gradient_checkpointing,
    examples_per_row,
    shard_units,
)
from tunesmith.train.distributed import ONE_PROCESS, World
from tunesmith.train.metrics import MetricsLog, Progress
from tunesmith.train.optim import build_optimizer, build_scheduler
from tunesmith.train.plan import check_fits, plan_memory
from tunesmith.train.resume import final_logged_loss, peak_rss_mb, prepare_run_dir, write_summary
from tunesmith.train.runtime import pick_device, seed_everything
from tunesmith.train.step import TOKEN_LOSS, Objective, StepResult, evaluate_loss


@dataclass
class RunResult:
    run_dir: Path
    output: Path  # adapter/ or model/
    steps: int
    final_loss: float | None
    best_val_loss: float | None
    tokens_per_s: float
    peak_rss_mb: float
    already_complete: bool = False  # resumed with nothing left to train: no step ran in this call
    stopped_early: bool = False


@dataclass
class Session:
    """What a training loop works with, from `open_session`."""

    config: Config
    tokenizer: Any
    data: PreparedData
    device: torch.device
    world: World
    amp_dtype: torch.dtype | None
    model: torch.nn.Module  # the model being trained
    trained: torch.nn.Module  # what the optimizer and the checkpoints hold: the model (PPO: with its value head)
    runner: torch.nn.Module  # runs passes of `trained` on one process or several (train/distributed.py)
    plan: Any  # which examples (or prompts) each step takes
    total_steps: int
    optimizer: torch.optim.Optimizer
    scheduler: Any
    state: ckpt.TrainState
    log: MetricsLog
    progress: Progress
    resume_from: Path | None


def open_session(
    config: Config,
    load_data: Callable[[Any], PreparedData],
    plan: Callable[[Any, PreparedData, torch.nn.Module, torch.nn.Module, torch.device, World], Any],
    *,
    num_labels: int | None = None,
    check: Callable[[World], None] | None = None,
    extend: Callable[[torch.nn.Module, torch.device], torch.nn.Module] | None = None,
    name: str = "",
) -> Session:
    """The setup of every training loop, in one order (the random draws of a run, and so a resumed run's
    bit-identity, depend on it): the tokenizer and the data (`load_data(tokenizer)`: bad data is refused before
    any compute), the device and the processes (`check(world)`: the loop's own settings), the run directory and
    the checkpoint to resume from, the seed, the model (`extend(model, device)`: what the loop adds before it
    is wrapped, returning what trains), gradient checkpointing and compilation, the wrap for the processes, the
    plan (`plan(tokenizer, data, model, runner, device, world)`), optimizer and schedule, the resume, the
    metrics log and the progress line (`name` goes before it)."""
    train = config.train
    tokenizer = load_tokenizer(config.model)
    data = load_data(tokenizer)
    device = pick_device(train)
    world = distributed.start(device)  # one process, or this rank of the processes torchrun started
    resolve_training(config, len(data.train), examples_per_row(config, data), announce=world.main)
    distributed.check_settings(config, world, device)
    if check is not None:
        check(world)
    amp_dtype, why = compute_dtype(train, device)
    if train.memory_check and config.method not in RL_METHODS:  # before the model loads (train/plan.py)
        check_fits(plan_memory(config, data, device, amp_dtype, world.size, num_labels))
    resume_from = prepare_run_dir(config, write=world.main)
    seed_everything(train.seed, train.threads)
    if world.main:
        print(
            f"dtype: {'float32' if amp_dtype is None else str(amp_dtype).removeprefix('torch.')} ({why})",
            file=sys.stderr,
        )
    model = build_model(config.model, config.adapter, device, num_labels, amp_dtype if not world.distributed else None)
    if train.router_aux_loss_coef is not None:
        set_router_balance(model, train.router_aux_loss_coef)
    if world.main:
        for part, path in training_paths(model).items():
            print(f"{part}: {path}", file=sys.stderr)
    counts = parameter_counts(model)
    trained = extend(model, device) if extend is not None else model
    if train.gradient_checkpointing:
        enable_gradient_checkpointing(model, train.gradient_checkpointing)
    if train.compile:
        compile_layers(model)
    runner = distributed.wrap(trained, world, train.parallel, amp_dtype, train.cpu_offload, shard_units(model))
    steps = plan(tokenizer, data, model, runner, device, world)
    total_steps = count_steps(steps, train.epochs, train.max_steps)
    optimizer = build_optimizer(trained, train)
    scheduler = build_scheduler(optimizer, train, total_steps)
    state = (
        ckpt.load_checkpoint(resume_from, trained, optimizer, scheduler, world) if resume_from else ckpt.TrainState()
    )
    log = MetricsLog(
        config.output_dir / rundir.METRICS_FILE if world.main else None, resume_step=state.step if resume_from else None
    )
    if not resume_from:
        log.write(
            {
                "step": 0,
                "event": "data",
                **data.summary(),
                "total_steps": total_steps,
                **counts,
                "processes": world.size,
            }
        )
    progress = Progress(total_steps, state.step, train.progress and world.main, quiet=not world.main)
    progress.write(
        f"{name}{config.adapter.type}: training {counts['trainable_parameters']:,} of "
        f"{counts['total_parameters']:,} parameters ({counts['trainable_share']:.2%})"
        + (f" on {world.size} processes ({train.parallel})" if world.distributed else "")
    )
    announce_resume(progress, resume_from, state, total_steps)
    return Session(
        config,
        tokenizer,
        data,
        device,
        world,
        amp_dtype,
        model,
        trained,
        runner,
        steps,
        total_steps,
        optimizer,
        scheduler,
        state,
        log,
        progress,
        resume_from,
    )


# Adapters that train a sequence classifier's new head with the rest: PEFT's LoRA family saves it in SEQ_CLS
# format; full and freeze train it as a weight of the model. Prompt-learning and IA3 adapters would leave it as set.
HEAD_ADAPTERS = ("lora", "qlora", "dora", "full", "freeze")


def check_classifier_settings(config: Config, model_kind: str, logged: str) -> None:
    """The settings a sequence classifier (a reward model, a classifier) cannot use, every one reported before any
    compute: an adapter that would not train its head, and the in-training eval task, which generates replies.
    `logged`: what validation logs instead."""
    problems = []
    if config.adapter.type not in HEAD_ADAPTERS:
        problems.append(
            Problem(
                "adapter.type",
                f"'{config.adapter.type}' cannot train a {model_kind}'s new head; "
                f"fix: use one of {', '.join(HEAD_ADAPTERS)}",
            )
        )
    if config.eval.every:
        problems.append(
            Problem(
                "eval.every",
                f"{config.eval.every}: the in-training eval task generates replies, which a {model_kind} does not "
                f"write; fix: unset eval.every; data.validation (or data.val_fraction) logs {logged} as it trains",
            )
        )
    if problems:
        raise UserError(f"method {config.method}: the config has problems", problems)


def save_outputs(
    config: Config,
    model,
    tokenizer,
    state: ckpt.TrainState,
    result: StepResult | None,
    data: PreparedData,
    objective: Objective = TOKEN_LOSS,
    world: World = ONE_PROCESS,
) -> RunResult:
    """Ship the best weights (with validation) or the last ones as adapter/ or model/ (with what the objective
    adds beside them), and summary.json. Sharded weights are gathered first; rank 0 writes."""
    FREED_PAGES.release()  # training is over: its activation pages are not needed again
    run_dir, checkpoints = config.output_dir, config.output_dir / "checkpoints"
    best = rundir.best_checkpoint(checkpoints)
    if best is not None:
        ckpt.load_best_weights(best, model)
    output = run_dir / output_name(config.adapter.type)
    gathered = whole_state(model) if is_sharded(model) else None
    if world.main:
        save_final(model, tokenizer, output, gathered, base_model=config.model)
        objective.save(output)
    # No step in this call (a finished run run again): its final loss is the last one metrics.jsonl logged.
    final_loss = result.loss if result else final_logged_loss(run_dir)
    summary = RunResult(
        run_dir,
        output,
        state.step,
        final_loss,
        state.best_val_loss,
        state.tokens_seen / state.elapsed_s if state.elapsed_s else 0.0,
        max(peak_rss_mb(), state.extra.get("peak_rss_mb", 0.0)),  # the whole run's, not this process's
        already_complete=result is None,
        stopped_early=bool(state.extra.get("stopped_early")),
    )
    if world.main:
        fields = {
            k: str(v) if isinstance(v, Path) else v for k, v in summary.__dict__.items() if k != "already_complete"
        }
        write_summary(
            run_dir,
            {
                **fields,
                "best_step": state.best_step,
                "data": data.summary(),
                "skipped_steps": state.skipped_steps,
                "processes": world.size,
            },
        )
    world.barrier()  # nobody leaves before the outputs are on disk
    return summary


def checkpoint(
    config: Config,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    state: ckpt.TrainState,
    world: World = ONE_PROCESS,
) -> None:
    """Save checkpoints/step-N (its state records the peak RSS so far, across resumes), then prune old ones."""
    state.extra["peak_rss_mb"] = max(state.extra.get("peak_rss_mb", 0.0), peak_rss_mb())
    FREED_PAGES.release()  # writing a checkpoint wants large buffers, not activation-shaped pages
    checkpoints = config.output_dir / "checkpoints"
    ckpt.save_checkpoint(checkpoints, f"step-{state.step}", model, optimizer, scheduler, state, world)
    if world.main:
        ckpt.prune(checkpoints, config.train.keep_last)


def is_sharded(model: torch.nn.Module) -> bool:
    return any(hasattr(parameter, "full_tensor") for parameter in model.parameters())


def whole_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """FSDP: every weight the saved files need, gathered whole onto rank 0's CPU (a collective: every rank
    calls it); an adapter needs only its trainable weights, a full model everything."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    adapter = hasattr(model, "peft_config")
    state = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=adapter)
    )
    # a tied weight's second name (the output head of tied embeddings) is left out, as save_pretrained does itself
    tied = {name for name, _ in model.named_parameters(remove_duplicate=False)} - dict(model.named_parameters()).keys()
    return {name: value for name, value in state.items() if name not in tied}


def announce_resume(progress, resume_from: Path | None, state: ckpt.TrainState, total_steps: int) -> None:
    """Say which checkpoint a resumed run continues from. A finished run (nothing left to train) is left to the
    caller, whose RunResult says `already_complete`."""
    if resume_from is not None and state.step < total_steps and not state.extra.get("stopped_early"):
        progress.write(f"resuming from checkpoint {resume_from.name} (of {total_steps})")


def advance(state: ckpt.TrainState, plan: BatchPlan, result: StepResult) -> None:
    """Move the counters and the data position one step forward (into the next epoch at its end)."""
    state.step += 1
    state.tokens_seen += result.tokens
    state.elapsed_s += result.seconds
    state.step_in_epoch += 1
    if state.step_in_epoch >= plan.steps_in_epoch(state.epoch):
        state.epoch, state.step_in_epoch = state.epoch + 1, 0


def check_finite(state: ckpt.TrainState, result: StepResult, max_bad_steps: int, log: MetricsLog) -> None:
    """A non-finite loss skips its update; several in a row mean the run has diverged."""
    if not result.skipped:
        state.bad_steps_in_a_row = 0
        return
    state.bad_steps_in_a_row += 1
    state.skipped_steps += 1
    log.write({"step": state.step, "event": "skipped", "reason": "non-finite loss or gradient", "loss": result.loss})
    if state.bad_steps_in_a_row >= max_bad_steps:
        raise TrainingStopped(
            f"the loss was not finite for {state.bad_steps_in_a_row} steps in a row (up to step "
            f"{state.step}); the run has diverged; fix: lower train.lr, keep train.max_grad_norm on, "
            f"or check the data for extreme examples"
        )


def evaluate_due(
    config: Config,
    runner,
    validation: list,
    task_eval: InTrainingEval | None,
    state: ckpt.TrainState,
    done: bool,
    log: MetricsLog,
    device,
    amp_dtype,
    objective: Objective = TOKEN_LOSS,
    world: World = ONE_PROCESS,
) -> dict[str, float]:
    """Validation loss (with the objective's own figures) and the eval task's metrics, when their step has come;
    each one logged. The ranks share the validation batches; the eval task runs on rank 0 and every rank
    gets its metrics (they steer best-checkpoint selection and early stopping on all of them)."""
    scores: dict[str, float] = {}
    if validation and (state.step % config.train.eval_every == 0 or done):
        scores["val_loss"] = evaluate_loss(runner, validation, device, amp_dtype, objective, world)
        scores.update({f"val_{name}": value for name, value in objective.take_stats(world).items()})
        state.best_val_loss = min(scores["val_loss"], state.best_val_loss or float("inf"))
        log.write({"step": state.step, **scores, "best_val_loss": state.best_val_loss})
    if task_eval and (state.step % config.eval.every == 0 or done):
        task_metrics = world.from_main(lambda: task_eval(distributed.inner(runner), config.train.seed))
        scores.update({name: metric["value"] for name, metric in task_metrics.items()})
        log.write({"step": state.step, "eval": task_metrics})
    return scores


def keep_best(state: ckpt.TrainState, value: float, selection) -> bool:
    """Record the selection metric; True when it is the best so far. Sets stopped_early when patience runs out."""
    score = value if not higher_is_better(selection.metric) else -value  # lower is better from here on
    if state.best_score is None or score < state.best_score - selection.min_delta:
        state.best_score, state.best_step, state.evals_without_improvement = score, state.step, 0
        return True
    state.evals_without_improvement += 1
    if selection.patience is not None and state.evals_without_improvement >= selection.patience:
        state.extra["stopped_early"] = True
    return False
