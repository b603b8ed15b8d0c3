"""Group relative policy optimisation (GRPO, Shao et al. 2024): RL from rewards without a value model.

Each step samples `grpo.num_generations` replies to each of `train.batch_size` prompts, scores them (reward
functions and/or a reward model, `rl:`), and gives every token of a reply the same advantage: its reward
relative to the other replies to the same prompt, (r - mean) / (std + eps). The loss per reply token is PPO's
clipped surrogate against the sampling-time policy plus `rl.kl_coef` times a KL estimate (k3) to the
reference (the adapter switched off; for full fine-tuning a frozen copy of the starting model), averaged over
a minibatch's reply tokens. With rl.update_epochs=1 and rl.minibatches=1 the ratio is 1 and the clip never
binds: it is the plain policy gradient with the group's mean as baseline.

`grpo.loss` picks a variant (train/grpo_losses.py: dapo, dr_grpo, gspo), which changes the surrogate, how a
minibatch's token losses are summed, the advantage's scaling and the clip ranges; the KL term is the same in all
(rl.kl_coef=0 for DAPO as published). With rl.tis_cap, each token's surrogate is weighted by the truncated ratio of
the trainer's sampling-time probability to the sampler's.

Method rft is this recipe with an OpenAI grader (rft.grader, eval/graders) as the reward: the prompt's row is the
grader's item and each reply its sample.

Logged per step: loss, reward (and each source's, reward_<name>; a grader's also reward_grader_failed and a multi
grader's reward_grader_<name>), kl, entropy, response_length, truncated_fraction, clip_fraction,
sample_logprob_diff and sample_kl (the sampler's log-probabilities against the trainer's), groups_filtered (dapo);
val_reward on validation prompts (greedy) every train.eval_every steps.
The shared pieces are in data/prompts.py (prompts), train/rollout.py (sampling), train/policy.py (scoring),
train/rl_math.py and train/grpo_losses.py (the losses); the loop's machinery in train/rl_loop.py.
"""

from __future__ import annotations

import time
from functools import partial

import torch

from tunesmith.config.schema import Config, RLConfig
from tunesmith.data import prompts
from tunesmith.data.packing import Batch
from tunesmith.registry import grpo_losses, methods
from tunesmith.train import policy, rl_loop, rl_math
from tunesmith.train.grpo_losses import GRPOLoss, uniform_groups
from tunesmith.train.rollout import Rollout
from tunesmith.train.runtime import stop_on_signals
from tunesmith.train.session import RunResult


@methods.register("rft", accepts=prompts.ACCEPTS)  # reinforcement fine-tuning: GRPO with rft.grader's reward
@methods.register("grpo", accepts=prompts.ACCEPTS)
def run_grpo(config: Config) -> RunResult:
    # ---- setup -------------------------------------------------------------------------------
    run = rl_loop.setup(config)
    group, variant = config.grpo.num_generations, grpo_losses.get(config.grpo.loss, key="grpo.loss")
    scale = config.grpo.scale_rewards if config.grpo.scale_rewards is not None else variant.scale_rewards
    token_loss = partial(grpo_token_loss, config.rl, variant, clip_ranges(config, variant))

    # ---- loop --------------------------------------------------------------------------------
    result = None
    with stop_on_signals() as stop:
        while run.state.step < run.total_steps:
            started = time.perf_counter()
            rollout = rl_loop.collect_rollout(run, run.next_prompts(), group)
            # every token of a reply gets the reply's advantage: its reward relative to its group's
            rollout.advantages = rollout.per_token(rl_math.group_advantages(rollout.rewards, group, scale))
            aggregation, figures = variant.aggregate(rollout.lengths, config.rl.max_new_tokens), {}
            if variant.drop_uniform_groups:
                dropped = uniform_groups(rollout.rewards, group)
                aggregation = aggregation.without(dropped)
                figures["groups_filtered"] = run.world.sum([float(dropped.sum()) / group], run.device)[0]
            result, updated = rl_loop.update_policy(run, rollout, partial(token_loss, rollout), aggregation)
            rl_loop.finish_step(run, result, {**rollout.figures(), **figures, **updated}, stop, started)

    # ---- save --------------------------------------------------------------------------------
    return rl_loop.save(run, result)


def clip_ranges(config: Config, variant: GRPOLoss) -> tuple[float, float]:
    """(low, high): the ratio is clipped to [1 - low, 1 + high]; each the config's, else the variant's, else
    rl.clip_range (high: the low)."""
    low = next(c for c in (config.grpo.clip_range_low, variant.clip_low, config.rl.clip_range) if c is not None)
    high = next(c for c in (config.grpo.clip_range_high, variant.clip_high, low) if c is not None)
    return low, high


def grpo_token_loss(
    settings: RLConfig,
    variant: GRPOLoss,
    clip: tuple[float, float],
    rollout: Rollout,
    model: torch.nn.Module,
    batch: Batch,
    tokens: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per reply token of `batch`: the variant's clipped surrogate (weighted by the truncated importance ratio with
    rl.tis_cap) plus kl_coef * KL(policy || reference) (plus a mixture of experts' router balance loss)."""
    logprobs, _, balance = policy.policy_outputs(model, batch, settings.temperature)
    old_logprobs = rollout.logprobs[tokens]
    loss, clipped = variant.surrogate(
        logprobs, old_logprobs, rollout.advantages[tokens], rollout.sample_of_tokens()[tokens], *clip
    )
    if settings.tis_cap is not None:
        loss = loss * rl_math.truncated_importance_weights(
            old_logprobs, rollout.sampler_logprobs[tokens], settings.tis_cap
        )
    figures = {"clip_fraction": clipped.float()}
    if balance is not None:
        loss = loss + balance
        figures["router_balance"] = balance.detach().expand_as(loss)
    if rollout.ref_logprobs is None:  # full fine-tuning with kl_coef 0: no reference was loaded
        return loss, figures
    kl = rl_math.kl_k3(logprobs, rollout.ref_logprobs[tokens])
    return loss + settings.kl_coef * kl, figures
