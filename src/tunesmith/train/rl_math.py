"""The RL maths, one small function each (tests/test_rl.py checks them against hand-computed values): the KL
estimate, GRPO's group advantages, PPO's GAE, the clipped policy and value losses, truncated importance weights,
whitening, explained variance.
"""

from __future__ import annotations

import torch

from tunesmith.train.distributed import ONE_PROCESS, World


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per token, an estimate of KL(policy || reference) from tokens the policy sampled (Schulman's k3):
    exp(d) - d - 1 with d = log ref - log pi. Unbiased, never negative, low variance."""
    delta = ref_logprobs - logprobs
    return torch.exp(delta) - delta - 1


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """(S,) GRPO: each reward minus its group's mean, over the group's standard deviation (unbiased) when `scale`.
    A group is `group_size` consecutive samples of one prompt."""
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    return centred.flatten()


def gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), each (T,), of one reply: generalised advantage estimation (Schulman et al.).

    delta_t = r_t + gamma V_{t+1} - V_t and A_t = delta_t + gamma lam A_{t+1}, the value after the last token
    being 0 (the episode ends there); returns = A + V are the value head's targets."""
    advantages = torch.zeros_like(values)
    running, next_value = values.new_zeros(()), values.new_zeros(())
    for t in reversed(range(values.shape[0])):
        delta = rewards[t] + gamma * next_value - values[t]
        running = delta + gamma * lam * running
        advantages[t], next_value = running, values[t]
    return advantages, advantages + values


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    clip: float,
    clip_high: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token, PPO's clipped surrogate max(-A r, -A clip(r, 1 - c, 1 + c_high)), r = pi / pi_old, c_high = c
    unless given (DAPO's clip-higher lets unlikely tokens gain more); and where the clipped term is the larger (the
    token gives no gradient: its ratio has moved far enough)."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + (clip if clip_high is None else clip_high))
    return torch.maximum(unclipped, clipped), clipped > unclipped


def truncated_importance_weights(logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, cap: float) -> torch.Tensor:
    """Per token, min(pi_old / pi_sampler, cap) (truncated importance sampling; no gradient): the trainer's
    sampling-time probability of a token over the probability the sampler drew it with, so that a loss computed
    as if the trainer had sampled corrects for a sampler whose numbers differ (another dtype, kernel or cache);
    the cap bounds the variance a rare large ratio would add."""
    return torch.exp(logprobs - sampler_logprobs).clamp(max=cap).detach()


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token, 0.5 max((V - R)^2, (V_clipped - R)^2), V_clipped kept within `clip` of the sampling-time value;
    and where the clipped term is the larger."""
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    plain, clipped = (values - returns) ** 2, (clipped_values - returns) ** 2
    return 0.5 * torch.maximum(plain, clipped), clipped > plain


def whiten(values: torch.Tensor, eps: float = 1e-8, world: World = ONE_PROCESS) -> torch.Tensor:
    """Mean 0, standard deviation (unbiased) 1; over every rank's values when there are several."""
    if not world.distributed:
        return (values - values.mean()) / (values.std() + eps) if values.numel() > 1 else values - values.mean()
    count, total, squares = world.sum(
        [values.numel(), float(values.double().sum()), float(values.double().square().sum())], values.device
    )
    mean = total / count
    variance = (squares - count * mean * mean) / max(count - 1, 1)
    return (values - mean) / (max(variance, 0.0) ** 0.5 + eps)


def explained_variance(values: torch.Tensor, returns: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R): 1 when the value head predicts the returns, 0 when it knows nothing."""
    variance = returns.var()
    return float(1 - (returns - values).var() / variance) if variance > 0 else float("nan")
