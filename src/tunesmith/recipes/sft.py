"""Supervised fine-tuning: next-token loss on assistant turns (or every token, for continued pre-training).

Read top to bottom: setup (model, adapter, data, optimizer, resume), the loop (step, log, evaluate,
checkpoint), and saving. Full vs LoRA is `adapter.type`; nothing else changes.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch

from tunesmith.config import Config
from tunesmith.data.dataset import PreparedData, prepare_data
from tunesmith.data.packing import BatchPlan
from tunesmith.errors import TrainingStopped
from tunesmith.eval.in_training import InTrainingEval, higher_is_better
from tunesmith.models import load_model, load_tokenizer
from tunesmith.models.adapters import apply_adapter, load_options, output_name, parameter_counts, save_final
from tunesmith.registry import methods
from tunesmith.train import checkpoint as ckpt
from tunesmith.train.loss import decoder_and_head
from tunesmith.train.metrics import MetricsLog, Progress
from tunesmith.train.optim import build_optimizer, build_scheduler
from tunesmith.train.run import peak_rss_mb, prepare_run_dir, write_summary
from tunesmith.train.runtime import autocast_dtype, pick_device, seed_everything, stop_on_signals
from tunesmith.train.step import LossSum, StepResult, evaluate_loss, train_step
from tunesmith.train.strategies import GradualUnfreezing, Regularization

# (data, model, tokenizer, device) -> the training loss: how a recipe swaps in its own loss (distill.py)
LossBuilder = Callable[[PreparedData, torch.nn.Module, Any, torch.device], LossSum]


@dataclass
class RunResult:
    run_dir: Path
    output: Path  # adapter/ or model/
    steps: int
    final_loss: float | None
    best_val_loss: float | None
    tokens_per_s: float
    peak_rss_mb: float


@methods.register("sft", accepts=("chat",))
def run_sft(config: Config) -> RunResult:
    return train_token_loss(config, accepts=("chat",))


def train_token_loss(config: Config, accepts: tuple[str, ...], build_loss: LossBuilder | None = None) -> RunResult:
    """The token-loss loop; `build_loss` replaces the training loss (validation stays token cross-entropy)."""
    # ---- setup -------------------------------------------------------------------------------
    train_config = config.train
    tokenizer = load_tokenizer(config.model)
    data = prepare_data(config.data, tokenizer, accepts, config.method, train_config.seed)  # bad data: refused before any compute
    resume_from = prepare_run_dir(config)
    run_dir, checkpoints = config.output_dir, config.output_dir / "checkpoints"
    seed_everything(train_config.seed, train_config.threads)
    device = pick_device(train_config)
    amp_dtype = autocast_dtype(train_config, device)
    quantized = load_options(config.adapter.type)  # QLoRA: a 4-bit base, placed on the device as it loads
    model, _ = load_model(config.model, device=device, **quantized)
    model = apply_adapter(model, config.adapter)
    model = model if quantized else model.to(device)
    counts = parameter_counts(model)
    unfreeze = GradualUnfreezing(model, train_config.unfreeze) if train_config.unfreeze else None
    regularization = train_config.regularization  # anchored at the starting weights, before any step or resume
    penalty = Regularization(model, regularization).penalty if regularization.l2_sp or regularization.l1_sp else None
    if train_config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if train_config.compile:
        compile_layers(model)
    plan, validation = build_plans(config, data)
    take_step = partial(train_step, loss_sum=build_loss(data, model, tokenizer, device)) if build_loss else train_step
    task_eval = InTrainingEval(config, tokenizer) if config.eval.every and config.eval.data else None
    selection = train_config.early_stopping
    total_steps = count_steps(plan, train_config.epochs, train_config.max_steps)
    optimizer = build_optimizer(model, train_config)
    scheduler = build_scheduler(optimizer, train_config, total_steps)
    state = ckpt.load_checkpoint(resume_from, model, optimizer, scheduler) if resume_from else ckpt.TrainState()
    log = MetricsLog(run_dir / "metrics.jsonl", resume_step=state.step if resume_from else None)
    if not resume_from:
        log.write({"step": 0, "event": "data", **data.summary(), "total_steps": total_steps, **counts})
    progress = Progress(total_steps, state.step, train_config.progress)
    progress.write(f"{config.adapter.type}: training {counts['trainable_parameters']:,} of "
                   f"{counts['total_parameters']:,} parameters ({counts['trainable_share']:.2%})")

    # ---- loop --------------------------------------------------------------------------------
    result: StepResult | None = None
    with stop_on_signals() as stop:
        while state.step < total_steps and not state.extra.get("stopped_early"):
            lr = scheduler.get_last_lr()[0]  # the rate this step uses
            if unfreeze and (opened := unfreeze.apply(state.step, state.epoch, state.step_in_epoch)) is not None:
                log.write({"step": state.step, "event": "unfreeze", "groups": opened, "of": len(unfreeze.groups)})
            result = take_step(model, plan.step(state.epoch, state.step_in_epoch), optimizer, scheduler,
                               train_config.max_grad_norm, device, amp_dtype, penalty=penalty)
            if unfreeze:
                unfreeze.release()
            advance(state, plan, result)
            check_finite(state, result, train_config.max_bad_steps, log)
            done = state.step == total_steps
            record = {"step": state.step, "epoch": state.epoch, "loss": result.loss, "lr": lr,
                      "grad_norm": result.grad_norm, "tokens": state.tokens_seen, "tokens_per_s": result.tokens / result.seconds}
            if result.penalty is not None:
                record["penalty"] = result.penalty
            if state.step % train_config.log_every == 0 or done:
                log.write(record)
            scores = evaluate_due(config, model, validation, task_eval, state, done, log, device, amp_dtype)
            if selection.metric in scores and keep_best(state, scores[selection.metric], selection):
                ckpt.save_best_weights(checkpoints, model, state.step)
            if state.extra.get("stopped_early"):
                log.write({"step": state.step, "event": "early_stop", "metric": selection.metric, "best_step": state.best_step})
            progress.update(state.step, result.loss, record["lr"], record["tokens_per_s"], state.best_val_loss)
            if state.step % train_config.save_every == 0 or done or stop or state.extra.get("stopped_early"):
                state.extra["peak_rss_mb"] = max(state.extra.get("peak_rss_mb", 0.0), peak_rss_mb())  # across resumes
                ckpt.save_checkpoint(checkpoints, f"step-{state.step}", model, optimizer, scheduler, state)
                ckpt.prune(checkpoints, train_config.keep_last)
            if stop:
                progress.close()
                raise TrainingStopped(f"stopped by signal {stop.signal_number} at step {state.step}; a checkpoint was "
                                      f"saved; run the same command again to resume", 128 + stop.signal_number)
    progress.close()

    # ---- save --------------------------------------------------------------------------------
    return save_outputs(config, model, tokenizer, state, result, data)


def build_plans(config: Config, data: PreparedData) -> tuple[BatchPlan, list]:
    """The training batch plan and the validation batches (every validation example once)."""
    options = dict(capacity=config.data.max_length, packing=config.data.packing, seed=config.train.seed)
    plan = BatchPlan(data.train, batch_size=config.train.batch_size, grad_accum=config.train.grad_accum, **options)
    validation = BatchPlan(data.validation, batch_size=config.train.batch_size, grad_accum=1, **options).eval_batches()
    return plan, validation


def save_outputs(config: Config, model, tokenizer, state: ckpt.TrainState, result: StepResult | None,
                 data: PreparedData) -> RunResult:
    """Ship the best weights (with validation) or the last ones as adapter/ or model/, and summary.json."""
    run_dir, checkpoints = config.output_dir, config.output_dir / "checkpoints"
    best = ckpt.best_checkpoint(checkpoints)
    if best is not None:
        ckpt.load_best_weights(best, model)
    output = run_dir / output_name(config.adapter.type)
    save_final(model, tokenizer, output)
    summary = RunResult(run_dir, output, state.step, result.loss if result else None, state.best_val_loss,
                        state.tokens_seen / state.elapsed_s if state.elapsed_s else 0.0,
                        max(peak_rss_mb(), state.extra.get("peak_rss_mb", 0.0)))  # the whole run's, not this process's
    write_summary(run_dir, {**{k: str(v) if isinstance(v, Path) else v for k, v in summary.__dict__.items()},
                            "best_step": state.best_step, "data": data.summary(), "skipped_steps": state.skipped_steps})
    return summary


def count_steps(plan: BatchPlan, epochs: int, max_steps: int | None) -> int:
    total = sum(plan.steps_in_epoch(epoch) for epoch in range(epochs))
    return min(total, max_steps) if max_steps is not None else total


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
        raise TrainingStopped(f"the loss was not finite for {state.bad_steps_in_a_row} steps in a row (up to step "
                              f"{state.step}); the run has diverged; fix: lower train.lr, keep train.max_grad_norm on, "
                              f"or check the data for extreme examples")


def evaluate_due(config: Config, model, validation: list, task_eval: InTrainingEval | None, state: ckpt.TrainState,
                 done: bool, log: MetricsLog, device, amp_dtype) -> dict[str, float]:
    """Validation loss and the eval task's metrics, when their step has come; each one logged."""
    scores: dict[str, float] = {}
    if validation and (state.step % config.train.eval_every == 0 or done):
        scores["val_loss"] = evaluate_loss(model, validation, device, amp_dtype)
        state.best_val_loss = min(scores["val_loss"], state.best_val_loss or float("inf"))
        log.write({"step": state.step, "val_loss": scores["val_loss"], "best_val_loss": state.best_val_loss})
    if task_eval and (state.step % config.eval.every == 0 or done):
        task_metrics = task_eval(model, config.train.seed)
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


def compile_layers(model: torch.nn.Module) -> None:
    """torch.compile every decoder layer, shapes dynamic (one graph for every packed length).

    The padding-free attention stays eager (it loops over examples); generation runs eagerly too
    (serve/engine.py), so only training and scoring passes use the compiled layers.
    """
    decoder, _ = decoder_and_head(model)
    for layer in decoder.layers:
        layer.compile(dynamic=True)


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
