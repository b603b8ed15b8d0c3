"""The loop of the RL recipes (recipes/grpo.py, recipes/ppo.py): setup, a step's samples, the clipped update,
and the supervised loop's bookkeeping (logging, evaluation, checkpoints, signals, saving) around them.

The run directory is the supervised loop's: metrics.jsonl, checkpoints/step-N (the policy's trainable weights,
PPO's value head with them), adapter/ or model/, summary.json. The pieces it works with are in data/prompts.py,
train/rollout.py, train/policy.py and train/rl_math.py.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch

from tunesmith.allocator import FREED_PAGES
from tunesmith.config.schema import Config
from tunesmith.data.dataset import PreparedData
from tunesmith.data.packing import Batch
from tunesmith.data.prompts import Prompt, PromptPlan, load_prompts
from tunesmith.data.tokenize import ChatTokenizer
from tunesmith.engine.forward import decoder_and_head
from tunesmith.engine.generation import Sampling, stop_token_ids
from tunesmith.errors import TrainingStopped, UserError
from tunesmith.eval.in_training import InTrainingEval
from tunesmith.models.precision import autocast
from tunesmith.train import distributed, session
from tunesmith.train.grpo_losses import Aggregation, token_mean
from tunesmith.train.policy import PolicyAndValue, Reference, ValueHead, build_reference, token_statistics
from tunesmith.train.reward_functions import Reward, build_reward
from tunesmith.train.rl_monitors import fired_monitors
from tunesmith.train.rollout import Rollout, rollout_batch, sample_replies, split, step_seed
from tunesmith.train.session import RunResult, Session, open_session
from tunesmith.train.step import StepResult


@dataclass
class RLRun(Session):
    """Everything a recipe's loop works with, from `setup`: the session (whose data holds Prompts and whose plan is
    a PromptPlan), and what RL adds."""

    value_head: ValueHead | None
    reference: Reference | None
    reward: Reward
    sampling: Sampling
    pad_id: int
    stop_ids: list[int]
    task_eval: InTrainingEval | None
    warned_mismatch: bool = False  # rl.mismatch_warn's warning is given once per run

    def next_prompts(self) -> list[Prompt]:
        """This rank's prompts of the step: every world-size-th (the step's prompts are the same on any count)."""
        indices = self.plan.step(self.state.epoch, self.state.step_in_epoch)[self.world.rank :: self.world.size]
        return [self.data.train[index] for index in indices]

    def policy_pass(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(policy, *args)` through the runner (so DDP syncs and FSDP gathers), whatever the runner holds."""
        return self.runner(lambda _, *inner: fn(self.model, *inner), *args)


def setup(config: Config, with_value_head: bool = False) -> RLRun:
    """Rewards, prompts (refused before any compute when bad), then the session (run directory, model, value head,
    reference, optimizer, resume)."""
    train_config = config.train
    parts: dict[str, Any] = {}

    def load_data(tokenizer) -> PreparedData:
        chat = ChatTokenizer(tokenizer, system_prompt=config.data.system_prompt)
        parts["reward"] = build_reward(config.rl, config.rft.grader if config.method == "rft" else None)
        return load_prompts(config, chat, parts["reward"].required_fields())

    def check(world: distributed.World) -> None:
        if train_config.batch_size % world.size:
            raise UserError(
                f"train.batch_size={train_config.batch_size} prompts per step cannot be shared evenly by "
                f"{world.size} processes; fix: make it a multiple of {world.size}"
            )

    def extend(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """PPO's value head beside the policy; both train."""
        if not with_value_head:
            parts["value_head"] = None
            return model
        parts["value_head"] = ValueHead(decoder_and_head(model)[1].weight.shape[1]).to(device)
        return PolicyAndValue(model, parts["value_head"])

    def make_plan(tokenizer, data: PreparedData, model, runner, device: torch.device, world) -> PromptPlan:
        parts["reference"] = build_reference(config, model, device)  # before the resume restores the RNG
        return PromptPlan(len(data.train), train_config.batch_size, train_config.seed)

    run = open_session(config, load_data, make_plan, check=check, extend=extend, name=f"{config.method}, ")
    tokenizer = run.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = Sampling(config.rl.max_new_tokens, config.rl.temperature, config.rl.top_p)
    task_eval = InTrainingEval.if_asked(config, tokenizer, run.world.main)
    return RLRun(
        **vars(run),
        value_head=parts["value_head"],
        reference=parts["reference"],
        reward=parts["reward"],
        sampling=sampling,
        pad_id=pad_id,
        stop_ids=stop_token_ids(run.model, tokenizer),
        task_eval=task_eval,
    )


def collect_rollout(run: RLRun, prompts: list[Prompt], group_size: int) -> Rollout:
    """Sample `group_size` replies per prompt, score them, and keep their tokens' sampling-time statistics.
    A step starts here (sampling, then the updates) and ends in `finish_step`."""
    FREED_PAGES.step_started()
    samples = [prompt for prompt in prompts for _ in range(group_size)]
    prompt_ids = [prompt.input_ids for prompt in samples]
    seed = step_seed(run.config.train.seed, run.state.step, f"sample-{run.world.rank}" if run.world.rank else "sample")
    replies, sampler_logprobs = generate(run, prompt_ids, run.sampling, seed)
    texts = [run.tokenizer.decode(reply, skip_special_tokens=True).strip() for reply in replies]
    rewards, parts = run.reward([p.messages for p in samples], texts, [p.fields for p in samples])
    temperature, pieces = run.config.rl.temperature, []
    for chunk in split(list(range(len(samples))), run.config.rl.minibatches * run.config.train.grad_accum):
        batch = rollout_batch([prompt_ids[s] for s in chunk], [replies[s] for s in chunk]).to(run.device)
        with autocast(run.device, run.amp_dtype), torch.no_grad():
            logprobs, entropy, values = run.policy_pass(token_statistics, batch, temperature, run.value_head)
            reference = (
                run.policy_pass(lambda _, *args: run.reference(*args), batch, temperature)
                if run.reference is not None
                else None
            )
        pieces.append((logprobs, entropy, values, reference))
    logprobs, entropy, values, reference = (
        torch.cat(column).float() if column[0] is not None else None for column in zip(*pieces)
    )
    return Rollout(
        prompt_ids,
        replies,
        texts,
        rewards.to(run.device),
        parts,
        logprobs,
        entropy,
        reference,
        values,
        stopped=[bool(reply) and reply[-1] in run.stop_ids for reply in replies],
        sampler_logprobs=torch.cat(sampler_logprobs).to(run.device) if sampler_logprobs is not None else None,
    )


@torch.no_grad()
def generate(
    run: RLRun, prompt_ids: list[list[int]], sampling: Sampling, seed: int
) -> tuple[list[list[int]], list[torch.Tensor] | None]:
    """Replies from the policy as it is now, and when sampling their tokens' log-probabilities as the sampler
    computed them (rollout.sample_replies). Under FSDP every rank keeps generating until all are done (each token's
    forward gathers weights from all of them)."""
    synced = run.world.distributed and run.config.train.parallel == "fsdp"
    return run.policy_pass(sample_replies, prompt_ids, sampling, run.pad_id, run.stop_ids, seed, synced)


# (policy, batch of some samples, those samples' flat token positions) -> (per-token loss, per-token figures)
TokenLoss = Callable[[torch.nn.Module, Batch, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def update_policy(
    run: RLRun, rollout: Rollout, token_loss: TokenLoss, aggregation: Aggregation | None = None
) -> tuple[StepResult, dict[str, float]]:
    """`rl.update_epochs` passes over the samples, each in `rl.minibatches` optimizer updates (each split into
    train.grad_accum micro-batches); a minibatch's loss is its per-token losses summed as `aggregation` says
    (train/grpo_losses.py; default: the mean over the minibatch's reply tokens). Then one scheduler step. A minibatch
    that counts for nothing on any rank (every sample's weight 0, e.g. DAPO's dropped groups) is skipped.

    Returns the step's result (loss and grad norm: means over the updates) and the figures' means per token."""
    config, started = run.config, time.perf_counter()
    generator = torch.Generator().manual_seed(step_seed(config.train.seed, run.state.step, "minibatches"))
    lengths, parameters = rollout.lengths, [p for p in run.trained.parameters() if p.requires_grad]
    aggregation = aggregation or token_mean(lengths, config.rl.max_new_tokens)
    weights = rollout.per_token(aggregation.weights.float())  # (N,) each reply token's weight
    totals: dict[str, float] = {}
    losses, norms, tokens, counted, skipped = [], [], 0, 0, False
    lr, world = run.scheduler.get_last_lr()[0], run.world
    run.runner.train()
    for _ in range(config.rl.update_epochs):
        order = torch.randperm(len(lengths), generator=generator).tolist()
        for minibatch in split(order, config.rl.minibatches):
            # the divisor over every rank's samples of the minibatch; DDP/FSDP average the gradients over the ranks
            count, loss = world.sum([float(aggregation.divisors[minibatch].sum())], run.device)[0], 0.0
            if count == 0:
                continue
            micros = split(minibatch, config.train.grad_accum)
            for number, micro in enumerate(micros):
                batch, index = rollout.batch(micro).to(run.device), rollout.token_index(micro)
                with distributed.gradient_sync(run.runner, enabled=number == len(micros) - 1):
                    with autocast(run.device, run.amp_dtype):
                        per_token, figures = run.policy_pass(token_loss, batch, index)
                    weighted = per_token * weights[index]
                    (weighted.sum() * (world.size / count)).backward()
                loss += float(weighted.detach().sum()) / count
                tokens += batch.num_tokens
                counted += len(index)
                for name, values in figures.items():
                    totals[name] = totals.get(name, 0.0) + float(values.detach().float().sum())
            loss = world.sum([loss], run.device)[0]
            limit = config.train.max_grad_norm if config.train.max_grad_norm is not None else float("inf")
            norm = torch.nn.utils.clip_grad_norm_(parameters, limit)
            norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a replicated DTensor
            finite = math.isfinite(loss) and math.isfinite(norm)
            if finite:
                run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
            skipped |= not finite
            losses.append(loss)
            norms.append(norm)
    with warnings.catch_warnings():  # a first step with no update (all of dapo's groups dropped) is no misuse
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
        run.scheduler.step()  # once per step, like the supervised loop: the schedule counts steps, not updates
    totals = world.sum_figures({**totals, "tokens": tokens, "counted": counted})
    tokens, counted = int(totals.pop("tokens")), totals.pop("counted")
    updates = max(len(losses), 1)  # none when every minibatch was skipped: loss and norm 0
    result = StepResult(
        sum(losses) / updates, tokens, counted, sum(norms) / updates, time.perf_counter() - started, skipped
    )
    return result, {"lr": lr, **{name: total / counted for name, total in totals.items()}}


@torch.no_grad()
def validation_reward(run: RLRun) -> dict[str, float]:
    """The mean reward of greedy replies to the validation prompts (and each source's); the ranks share them."""
    shared, greedy = run.world.share(run.data.validation), Sampling(run.config.rl.max_new_tokens, 0.0)
    replies: list[list[int]] = []
    for chunk in split(list(range(len(shared))), -(-len(shared) // run.config.eval.batch_size)):
        replies += generate(run, [shared[i][0].input_ids for i in chunk], greedy, 0)[0]
    mine = [(prompt, reply) for (prompt, real), reply in zip(shared, replies) if real]
    texts = [run.tokenizer.decode(reply, skip_special_tokens=True).strip() for _, reply in mine]
    rewards, parts = run.reward([p.messages for p, _ in mine], texts, [p.fields for p, _ in mine])
    sums = {
        "val_reward": float(rewards.sum()),
        **{f"val_reward_{k}": float(v.sum()) for k, v in parts.items()},
        "val_response_length": float(sum(len(reply) for _, reply in mine)),
        "count": float(len(mine)),
    }
    sums = run.world.sum_figures(sums)
    count = sums.pop("count")
    return {name: total / count for name, total in sums.items()}


def finish_step(run: RLRun, result: StepResult, figures: dict[str, float], stop: Any, started: float) -> None:
    """Count the step, log it, evaluate and check the monitors (train/rl_monitors.py), checkpoint when due; on a
    signal, checkpoint and stop."""

    config, state, world = run.config, run.state, run.world
    FREED_PAGES.step_finished()
    result.seconds = time.perf_counter() - started  # the whole step: sampling, scoring and updates
    # the ranks' means (each rank had as many prompts); the update's figures are already the same on all
    figures = {name: total / world.size for name, total in world.sum_figures(figures).items()}
    session.advance(state, run.plan, result)
    session.check_finite(state, result, config.train.max_bad_steps, run.log)
    done = state.step == run.total_steps
    record = {
        "step": state.step,
        "epoch": state.epoch,
        "loss": result.loss,
        "lr": figures.pop("lr"),
        "grad_norm": result.grad_norm,
        **figures,
        "tokens": state.tokens_seen,
        "tokens_per_s": result.tokens / result.seconds,
    }
    warning = mismatch_warning(run, figures)
    if warning:
        run.progress.write(f"warning: {warning}")
        record["warning"] = warning
    if state.step % config.train.log_every == 0 or done:
        run.log.write(record)
    elif warning:
        run.log.write({"step": state.step, "warning": warning})
    if run.data.validation and (state.step % config.train.eval_every == 0 or done):
        run.log.write({"step": state.step, **validation_reward(run)})
    for name, monitor_warning in fired_monitors(run.log.records):  # main rank only: the others hold no records
        run.progress.write(f"warning: step {state.step}: {monitor_warning}")
        run.log.write({"step": state.step, "monitor": name, "warning": monitor_warning})
    session.evaluate_due(
        config,
        distributed.Runner(run.model),
        [],
        run.task_eval,
        state,
        done,
        run.log,
        run.device,
        run.amp_dtype,
        world=world,
    )
    run.progress.update(state.step, result.loss, record["lr"], record["tokens_per_s"], None)
    signal_number = world.max(stop.signal_number or 0, run.device)  # a signal to any rank stops them all here
    if state.step % config.train.save_every == 0 or done or signal_number:
        session.checkpoint(config, run.trained, run.optimizer, run.scheduler, state, world)
    if signal_number:
        run.progress.close()
        raise TrainingStopped(
            f"stopped by signal {signal_number} at step {state.step}; a checkpoint was saved; "
            f"run the same command again to resume",
            128 + signal_number,
        )


def mismatch_warning(run: RLRun, figures: dict[str, float]) -> str | None:
    """The first time a step's sampler and trainer disagree by more than rl.mismatch_warn, what to do about it."""
    limit, measured = run.config.rl.mismatch_warn, figures.get("sample_logprob_diff")
    if run.warned_mismatch or limit is None or measured is None or not measured > limit:
        return None
    run.warned_mismatch = True
    return (
        f"step {run.state.step}: the sampler's log-probabilities of its tokens differ from the trainer's by "
        f"{measured:.3g} on average (sample_logprob_diff; rl.mismatch_warn={limit:g}): the replies come from a "
        f"slightly different policy than the one trained (dtype, kernels, KV cache); rl.tis_cap=2 corrects the "
        f"loss for it, train.dtype=float32 narrows it"
    )


def save(run: RLRun, result: StepResult | None) -> RunResult:
    """The policy as adapter/ or model/ (PPO's value head stays in the checkpoints), and summary.json."""

    run.progress.close()
    return session.save_outputs(run.config, run.model, run.tokenizer, run.state, result, run.data, world=run.world)
