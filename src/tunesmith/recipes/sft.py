"""Supervised fine-tuning: next-token loss on assistant turns (or every token, for continued pre-training).

Read top to bottom: setup (model, adapter, data, optimizer, resume), the loop (step, log, evaluate,
checkpoint), and saving. Full vs LoRA is `adapter.type`; nothing else changes.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from tunesmith.config.schema import Config
from tunesmith.data.dataset import PreparedData, prepare_data
from tunesmith.errors import TrainingStopped
from tunesmith.eval.in_training import InTrainingEval
from tunesmith.models import load_tokenizer
from tunesmith.models.adapters import parameter_counts
from tunesmith.registry import methods
from tunesmith.train import checkpoint as ckpt
from tunesmith.train import distributed, loop
from tunesmith.train.distributed import World
from tunesmith.train.loop import RunResult
from tunesmith.train.metrics import MetricsLog, Progress
from tunesmith.train.optim import build_optimizer, build_scheduler
from tunesmith.train.run import prepare_run_dir
from tunesmith.train.runtime import autocast_dtype, pick_device, seed_everything, stop_on_signals
from tunesmith.train.step import TOKEN_LOSS, Objective, StepResult, train_step
from tunesmith.train.strategies import GradualUnfreezing, Regularization

# (data, runner, tokenizer, device, world) -> the training loss: how a recipe swaps in its own (distill.py, dpo.py).
# The runner runs passes of the model (train/distributed.py), so an objective built with them works on any world.
ObjectiveBuilder = Callable[[PreparedData, torch.nn.Module, Any, torch.device, World], Objective]


SFT_ACCEPTS = ("chat", "chosen")  # conversations, and preference pairs' chosen replies (e.g. refusal tuning)


@methods.register("sft", accepts=SFT_ACCEPTS)
def run_sft(config: Config) -> RunResult:
    return train_loop(config, accepts=SFT_ACCEPTS)


def train_loop(config: Config, accepts: tuple[str, ...], build_objective: ObjectiveBuilder | None = None,
               validate_objective: bool = False, num_labels: int | None = None) -> RunResult:
    """The training loop of every recipe. `build_objective` replaces the next-token loss; validation uses it too
    when `validate_objective` (DPO's loss on held-out pairs), else stays token cross-entropy (distillation).
    `num_labels` trains a sequence classifier with that many outputs instead of a language model (reward.py)."""
    # ---- setup -------------------------------------------------------------------------------
    train_config = config.train
    tokenizer = load_tokenizer(config.model)
    data = prepare_data(config.data, tokenizer, accepts, config.method, train_config.seed)  # bad data: refused before any compute
    device = pick_device(train_config)
    world = distributed.start(device)  # one process, or this rank of the processes torchrun started
    distributed.check_settings(config, world, device)
    resume_from = prepare_run_dir(config, write=world.main)
    run_dir, checkpoints = config.output_dir, config.output_dir / "checkpoints"
    seed_everything(train_config.seed, train_config.threads)
    amp_dtype = autocast_dtype(train_config, device)
    model = loop.build_model(config, device, num_labels)
    counts = parameter_counts(model)
    unfreeze = GradualUnfreezing(model, train_config.unfreeze) if train_config.unfreeze else None
    regularization = train_config.regularization  # anchored at the starting weights, before any step or resume
    penalty = Regularization(model, regularization).penalty if regularization.l2_sp or regularization.l1_sp else None
    if train_config.gradient_checkpointing:
        loop.enable_gradient_checkpointing(model, train_config.gradient_checkpointing)
    if train_config.compile:
        loop.compile_layers(model)
    runner = distributed.wrap(model, world, train_config.parallel, amp_dtype, train_config.cpu_offload,
                              loop.shard_units(model))
    plan, validation = loop.build_plans(config, data, device)
    objective = build_objective(data, runner, tokenizer, device, world) if build_objective else TOKEN_LOSS
    validation_objective = objective if validate_objective else TOKEN_LOSS
    task_eval = InTrainingEval(config, tokenizer) if config.eval.every and config.eval.data and world.main else None
    selection = train_config.early_stopping
    total_steps = loop.count_steps(plan, train_config.epochs, train_config.max_steps)
    optimizer = build_optimizer(model, train_config)
    scheduler = build_scheduler(optimizer, train_config, total_steps)
    state = ckpt.load_checkpoint(resume_from, model, optimizer, scheduler, world) if resume_from else ckpt.TrainState()
    log = MetricsLog(run_dir / "metrics.jsonl" if world.main else None, resume_step=state.step if resume_from else None)
    if not resume_from:
        log.write({"step": 0, "event": "data", **data.summary(), "total_steps": total_steps, **counts,
                   "processes": world.size})
    progress = Progress(total_steps, state.step, train_config.progress and world.main, quiet=not world.main)
    progress.write(f"{config.adapter.type}: training {counts['trainable_parameters']:,} of "
                   f"{counts['total_parameters']:,} parameters ({counts['trainable_share']:.2%})"
                   + (f" on {world.size} processes ({train_config.parallel})" if world.distributed else ""))
    loop.announce_resume(progress, resume_from, state, total_steps)

    # ---- loop --------------------------------------------------------------------------------
    result: StepResult | None = None
    with stop_on_signals() as stop:
        while state.step < total_steps and not state.extra.get("stopped_early"):
            lr = scheduler.get_last_lr()[0]  # the rate this step uses
            if unfreeze and (opened := unfreeze.apply(state.step, state.epoch, state.step_in_epoch)) is not None:
                log.write({"step": state.step, "event": "unfreeze", "groups": opened, "of": len(unfreeze.groups)})
            micro_batches = plan.step(state.epoch, state.step_in_epoch, world.rank, world.size)
            result = train_step(runner, micro_batches, optimizer, scheduler, train_config.max_grad_norm, device,
                                amp_dtype, objective, penalty, world)
            if unfreeze:
                unfreeze.release()
            loop.advance(state, plan, result)
            loop.check_finite(state, result, train_config.max_bad_steps, log)
            done = state.step == total_steps
            record = {"step": state.step, "epoch": state.epoch, "loss": result.loss, "lr": lr,
                      "grad_norm": result.grad_norm, "tokens": state.tokens_seen, "tokens_per_s": result.tokens / result.seconds}
            if result.penalty is not None:
                record["penalty"] = result.penalty
            record.update(objective.take_stats(world))
            if state.step % train_config.log_every == 0 or done:
                log.write(record)
            scores = loop.evaluate_due(config, runner, validation, task_eval, state, done, log, device, amp_dtype,
                                       validation_objective, world)
            if selection.metric in scores and loop.keep_best(state, scores[selection.metric], selection):
                ckpt.save_best_weights(checkpoints, model, state.step, world)
            if state.extra.get("stopped_early"):
                log.write({"step": state.step, "event": "early_stop", "metric": selection.metric, "best_step": state.best_step})
            progress.update(state.step, result.loss, record["lr"], record["tokens_per_s"], state.best_val_loss)
            signal_number = world.max(stop.signal_number or 0, device)  # a signal to any rank stops them all here
            if state.step % train_config.save_every == 0 or done or signal_number or state.extra.get("stopped_early"):
                loop.checkpoint(config, model, optimizer, scheduler, state, world)
            if signal_number:
                progress.close()
                raise TrainingStopped(f"stopped by signal {signal_number} at step {state.step}; a checkpoint was "
                                      f"saved; run the same command again to resume", 128 + signal_number)
    progress.close()

    # ---- save --------------------------------------------------------------------------------
    return loop.save_outputs(config, model, tokenizer, state, result, data, objective, world)
