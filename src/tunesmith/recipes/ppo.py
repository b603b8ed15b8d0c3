"""Proximal policy optimisation for language models (RLHF as in Ouyang et al. 2022), with a value head.

Each step samples one reply to each of `train.batch_size` prompts and scores it (a frozen reward model and/or
reward functions, `rl:`). The reward of a reply's tokens is -rl.kl_coef * (log pi - log ref) on every token
(the KL penalty to the reference: the adapter switched off, or for full fine-tuning a frozen copy of the
starting model) plus the score on its last token. GAE (ppo.gamma, ppo.lam) turns these and the value head's
estimates into per-token advantages and returns; the loss per reply token is PPO's clipped surrogate plus
ppo.value_coef times the clipped value loss.

The critic is a small value head (train/policy.py `ValueHead`: a two-layer MLP on the policy's final hidden
states, detached), not a second model: it costs one extra matmul per token, and the value loss never pulls on
the policy's weights. It is trained and checkpointed with the policy; the run ships only the policy.

Logged per step: loss, policy_loss, value_loss, explained_variance, clip_fraction, value_clip_fraction,
reward (and each source's), kl, entropy, response_length, truncated_fraction, sample_logprob_diff and sample_kl
(the sampler's log-probabilities against the trainer's); val_reward every train.eval_every steps on validation prompts
(greedy).
"""

from __future__ import annotations

import time
from functools import partial

import torch

from tunesmith.config.schema import Config
from tunesmith.data import prompts
from tunesmith.data.packing import Batch
from tunesmith.registry import methods
from tunesmith.train import policy, rl_loop, rl_math
from tunesmith.train.rollout import Rollout
from tunesmith.train.runtime import stop_on_signals
from tunesmith.train.session import RunResult


@methods.register("ppo", accepts=prompts.ACCEPTS)
def run_ppo(config: Config) -> RunResult:
    # ---- setup -------------------------------------------------------------------------------
    run = rl_loop.setup(config, with_value_head=True)
    settings = config.ppo

    # ---- loop --------------------------------------------------------------------------------
    result = None
    with stop_on_signals() as stop:
        while run.state.step < run.total_steps:
            started = time.perf_counter()
            rollout = rl_loop.collect_rollout(run, run.next_prompts(), group_size=1)
            rewards = token_rewards(rollout, config.rl.kl_coef)
            pieces = [
                rl_math.gae(r, v, settings.gamma, settings.lam)
                for r, v in zip(rewards.split(rollout.lengths), rollout.values.split(rollout.lengths))
            ]
            advantages, rollout.returns = (torch.cat(column) for column in zip(*pieces))
            rollout.advantages = (
                rl_math.whiten(advantages, world=run.world) if settings.whiten_advantages else advantages
            )
            loss = partial(ppo_token_loss, config, rollout, run.value_head)
            result, figures = rl_loop.update_policy(run, rollout, loss)
            figures["explained_variance"] = rl_math.explained_variance(rollout.values, rollout.returns)
            rl_loop.finish_step(run, result, {**rollout.figures(), **figures}, stop, started)

    # ---- save --------------------------------------------------------------------------------
    return rl_loop.save(run, result)


def token_rewards(rollout: Rollout, kl_coef: float) -> torch.Tensor:
    """(N,) -kl_coef * (log pi_old - log ref) on every reply token, plus the reply's score on its last token."""
    rewards = torch.zeros_like(rollout.logprobs)
    if rollout.ref_logprobs is not None:
        rewards -= kl_coef * (rollout.logprobs - rollout.ref_logprobs)
    last = torch.tensor(rollout.lengths, device=rewards.device).cumsum(0) - 1
    rewards[last] += rollout.rewards
    return rewards


def ppo_token_loss(
    config: Config,
    rollout: Rollout,
    value_head: policy.ValueHead,
    model: torch.nn.Module,
    batch: Batch,
    tokens: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per reply token of `batch`: the clipped surrogate (weighted by the truncated importance ratio with
    rl.tis_cap) plus value_coef * the clipped value loss (plus a mixture of experts' router balance loss)."""
    logprobs, values, balance = policy.policy_outputs(model, batch, config.rl.temperature, value_head)
    policy_loss, clipped = rl_math.clipped_policy_loss(
        logprobs, rollout.logprobs[tokens], rollout.advantages[tokens], config.rl.clip_range
    )
    if config.rl.tis_cap is not None:  # the sampler's numbers differ from the trainer's: weigh by their ratio
        policy_loss = policy_loss * rl_math.truncated_importance_weights(
            rollout.logprobs[tokens], rollout.sampler_logprobs[tokens], config.rl.tis_cap
        )
    value_loss, value_clipped = rl_math.clipped_value_loss(
        values, rollout.values[tokens], rollout.returns[tokens], config.ppo.value_clip
    )
    figures = {
        "policy_loss": policy_loss,
        "value_loss": value_loss,
        "clip_fraction": clipped.float(),
        "value_clip_fraction": value_clipped.float(),
    }
    loss = policy_loss + config.ppo.value_coef * value_loss
    if balance is not None:
        figures["router_balance"] = balance.detach().expand_as(loss)
        loss = loss + balance
    return loss, figures
