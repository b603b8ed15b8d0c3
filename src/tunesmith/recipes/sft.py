"""Supervised fine-tuning: next-token loss on assistant turns (or every token, for continued pre-training).

Read top to bottom: setup (model, adapter, data, optimizer, resume), the loop (step, log, evaluate,
checkpoint), and saving. Full vs LoRA is `adapter.type`; nothing else changes.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from tunesmith.config.schema import Config
from tunesmith.data.dataset import PreparedData, prepare_data
from tunesmith.engine.classifier import name_labels
from tunesmith.errors import TrainingStopped
from tunesmith.eval.in_training import InTrainingEval
from tunesmith.registry import methods
from tunesmith.train import checkpoint as ckpt
from tunesmith.train import session
from tunesmith.train.build import build_plans
from tunesmith.train.distributed import World
from tunesmith.train.runtime import stop_on_signals
from tunesmith.train.session import RunResult
from tunesmith.train.step import TOKEN_LOSS, Objective, StepResult, train_step
from tunesmith.train.strategies import GradualUnfreezing, Regularization

# (data, runner, tokenizer, device, world) -> the training loss: how a recipe swaps in its own (distill.py, dpo.py).
# The runner runs passes of the model (train/distributed.py), so an objective built with them works on any world.
ObjectiveBuilder = Callable[[PreparedData, torch.nn.Module, Any, torch.device, World], Objective]


SFT_ACCEPTS = ("chat", "chosen")  # conversations, and preference pairs' chosen replies (e.g. refusal tuning)


@methods.register("sft", accepts=SFT_ACCEPTS)
def run_sft(config: Config) -> RunResult:
    return train_loop(config, accepts=SFT_ACCEPTS)


def train_loop(
    config: Config,
    accepts: tuple[str, ...],
    build_objective: ObjectiveBuilder | None = None,
    validate_objective: bool = False,
    num_labels: int | None = None,
    labels: list[str] | None = None,
) -> RunResult:
    """The training loop of every recipe. `build_objective` replaces the next-token loss; validation uses it too
    when `validate_objective` (DPO's loss on held-out pairs), else stays token cross-entropy (distillation).
    `num_labels` trains a sequence classifier with that many outputs instead of a language model (reward.py);
    `labels` one with an output per label, named in its config (classify.py)."""
    # ---- setup -------------------------------------------------------------------------------
    train_config = config.train
    strategies: dict[str, Any] = {}
    built: dict[str, Any] = {}

    def extend(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """The label names, gradual unfreezing and the penalty toward the starting weights (anchored before any step
        or resume)."""
        if labels is not None:
            name_labels(model, labels)
        if train_config.unfreeze:
            strategies["unfreeze"] = GradualUnfreezing(model, train_config.unfreeze)
        regularization = train_config.regularization
        if regularization.l2_sp or regularization.l1_sp:
            strategies["penalty"] = Regularization(model, regularization).penalty
        return model

    def make_plan(tokenizer, data: PreparedData, model, runner, device: torch.device, world: World):
        """The batch plans, then the loss (a recipe's objective may read the data and run the model)."""
        steps, built["validation"] = build_plans(config, data, device)
        built["objective"] = build_objective(data, runner, tokenizer, device, world) if build_objective else TOKEN_LOSS
        built["task_eval"] = InTrainingEval.if_asked(config, tokenizer, world.main)
        return steps

    run = session.open_session(
        config,
        lambda tokenizer: prepare_data(config.data, tokenizer, accepts, config.method, train_config.seed, labels),
        make_plan,
        num_labels=len(labels) if labels is not None else num_labels,
        extend=extend,
    )
    model, runner, world, device, amp_dtype, plan = (
        run.model,
        run.runner,
        run.world,
        run.device,
        run.amp_dtype,
        run.plan,
    )
    optimizer, scheduler, state, log, progress = run.optimizer, run.scheduler, run.state, run.log, run.progress
    checkpoints, total_steps = config.output_dir / "checkpoints", run.total_steps
    unfreeze, penalty = strategies.get("unfreeze"), strategies.get("penalty")
    objective, validation, task_eval = built["objective"], built["validation"], built["task_eval"]
    validation_objective = objective if validate_objective else TOKEN_LOSS
    selection = train_config.early_stopping

    # ---- loop --------------------------------------------------------------------------------
    result: StepResult | None = None
    with stop_on_signals() as stop:
        while state.step < total_steps and not state.extra.get("stopped_early"):
            lr = scheduler.get_last_lr()[0]  # the rate this step uses
            if unfreeze and (opened := unfreeze.apply(state.step, state.epoch, state.step_in_epoch)) is not None:
                log.write({"step": state.step, "event": "unfreeze", "groups": opened, "of": len(unfreeze.groups)})
            micro_batches = plan.step(state.epoch, state.step_in_epoch, world.rank, world.size)
            result = train_step(
                runner,
                micro_batches,
                optimizer,
                scheduler,
                train_config.max_grad_norm,
                device,
                amp_dtype,
                objective,
                penalty,
                world,
            )
            if unfreeze:
                unfreeze.release()
            session.advance(state, plan, result)
            session.check_finite(state, result, train_config.max_bad_steps, log)
            done = state.step == total_steps
            record = {
                "step": state.step,
                "epoch": state.epoch,
                "loss": result.loss,
                "lr": lr,
                "grad_norm": result.grad_norm,
                "tokens": state.tokens_seen,
                "tokens_per_s": result.tokens / result.seconds,
            }
            if result.penalty is not None:
                record["penalty"] = result.penalty
            record.update(objective.take_stats(world))
            if state.step % train_config.log_every == 0 or done:
                log.write(record)
            scores = session.evaluate_due(
                config, runner, validation, task_eval, state, done, log, device, amp_dtype, validation_objective, world
            )
            if selection.metric in scores and session.keep_best(state, scores[selection.metric], selection):
                ckpt.save_best_weights(checkpoints, model, state.step, world)
            if state.extra.get("stopped_early"):
                log.write(
                    {
                        "step": state.step,
                        "event": "early_stop",
                        "metric": selection.metric,
                        "best_step": state.best_step,
                    }
                )
            progress.update(state.step, result.loss, record["lr"], record["tokens_per_s"], state.best_val_loss)
            signal_number = world.max(stop.signal_number or 0, device)  # a signal to any rank stops them all here
            if state.step % train_config.save_every == 0 or done or signal_number or state.extra.get("stopped_early"):
                session.checkpoint(config, model, optimizer, scheduler, state, world)
            if signal_number:
                progress.close()
                raise TrainingStopped(
                    f"stopped by signal {signal_number} at step {state.step}; a checkpoint was "
                    f"saved; run the same command again to resume",
                    128 + signal_number,
                )
    progress.close()

    # ---- save --------------------------------------------------------------------------------
    return session.save_outputs(config, model, run.tokenizer, state, result, run.data, objective, world)
