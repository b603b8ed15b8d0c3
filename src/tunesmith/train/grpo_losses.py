"""GRPO's loss variants (grpo.loss), each a `GRPOLoss` registered under its name: its per-token surrogate, how a
minibatch's per-token losses are summed into its loss (an `Aggregation`), and its own defaults.

- grpo: each token's ratio, clipped symmetrically; the mean over the minibatch's reply tokens; advantages
  (r - mean) / (std + eps).
- dapo (Yu et al. 2025): grpo with clip-higher (the upper clip 0.28) and the groups whose rewards are all equal
  dropped (`uniform_groups`).
- dr_grpo (Liu et al. 2025): advantages r - mean (no division by the deviation: no difficulty bias); each reply's
  token-loss sum over rl.max_new_tokens, averaged over the replies (no length bias).
- gspo (Zheng et al. 2025): the reply's ratio (the geometric mean of its tokens') on each of its tokens, clipped per
  reply to [1 - 3e-4, 1 + 4e-4]; the mean over replies of their token means.

`grpo` is what tunesmith's GRPO has always computed, kept exactly (runs and their resumes keep their numbers). It is
not the paper's sequence mean (Shao et al. average each reply's tokens, then the replies): it averages over all the
minibatch's reply tokens, the token-level normalisation that DAPO argues for. tests/test_grpo_losses.py checks each
piece against values worked out by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from tunesmith.registry import grpo_losses
from tunesmith.train import rl_math

# (log pi (n,) differentiable, log pi_old (n,), advantages (n,), each token's sample (n,), clip low, clip high)
#   -> (per-token loss (n,), whether each token took the clipped term (n,)); a sample's tokens are consecutive
Surrogate = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float, float], tuple[torch.Tensor, torch.Tensor]
]


@dataclass(frozen=True)
class Aggregation:
    """How a minibatch's per-token losses become its loss: sum over its samples s of weights[s] times the sum of
    s's token losses, divided by the sum over its samples of divisors[s] (both sums over every rank's samples)."""

    weights: torch.Tensor  # (S,) float64: the weight of each of a sample's tokens
    divisors: torch.Tensor  # (S,) float64: each sample's share of the divisor

    def without(self, dropped: torch.Tensor) -> "Aggregation":
        """The same with the `dropped` samples ((S,) bool) counting for nothing, in the sum or in the divisor."""
        kept = (~dropped).double()
        return Aggregation(self.weights * kept, self.divisors * kept)


def token_mean(lengths: list[int], max_new_tokens: int) -> Aggregation:
    """The mean over the minibatch's reply tokens: every token counts the same, so a long reply counts for more."""
    return Aggregation(torch.ones(len(lengths), dtype=torch.float64), torch.tensor(lengths, dtype=torch.float64))


def sequence_mean(lengths: list[int], max_new_tokens: int) -> Aggregation:
    """The mean over the minibatch's replies of each one's token mean: every reply counts the same."""
    sizes = torch.tensor(lengths, dtype=torch.float64)
    return Aggregation(1 / sizes, torch.ones_like(sizes))


def constant_length(lengths: list[int], max_new_tokens: int) -> Aggregation:
    """Each reply's token-loss sum over max_new_tokens, averaged over the replies (Dr. GRPO): the same constant
    for every reply, so neither a long nor a short reply's tokens weigh more."""
    return Aggregation(
        torch.ones(len(lengths), dtype=torch.float64), torch.full((len(lengths),), float(max_new_tokens)).double()
    )


def token_surrogate(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    samples: torch.Tensor,
    clip_low: float,
    clip_high: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate with each token's own ratio pi / pi_old, clipped to [1 - low, 1 + high]."""
    return rl_math.clipped_policy_loss(logprobs, old_logprobs, advantages, clip_low, clip_high)


def sequence_surrogate(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    samples: torch.Tensor,
    clip_low: float,
    clip_high: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GSPO-token (Zheng et al. 2025): every token of a reply takes the reply's ratio s = exp(mean over its tokens
    of log pi - log pi_old) as its value, clipped at the reply's level, with its own log-probability's gradient
    (d s_t / d log pi_t = s). With the same advantage on every token and `sequence_mean`, it is GSPO itself."""
    _, segment, counts = torch.unique_consecutive(samples, return_inverse=True, return_counts=True)
    log_ratio = (logprobs - old_logprobs).detach()
    means = torch.zeros(counts.shape, dtype=log_ratio.dtype, device=log_ratio.device).index_add(0, segment, log_ratio)
    means = means / counts
    # log s_t: the reply's mean log-ratio in value; log pi_t - sg(log pi_t) is 0 but carries the gradient
    sequence_logprobs = means[segment] + logprobs - logprobs.detach()
    return rl_math.clipped_policy_loss(
        sequence_logprobs, torch.zeros_like(sequence_logprobs), advantages, clip_low, clip_high
    )


@dataclass(frozen=True)
class GRPOLoss:
    """One variant: its surrogate, its aggregation, and the defaults that grpo.scale_rewards,
    grpo.clip_range_low and grpo.clip_range_high take when left null."""

    surrogate: Surrogate
    aggregate: Callable[[list[int], int], Aggregation]  # (reply lengths, rl.max_new_tokens) -> Aggregation
    scale_rewards: bool = True  # divide each group's centred rewards by the group's standard deviation
    drop_uniform_groups: bool = False  # DAPO's dynamic sampling, without the resampling (see uniform_groups)
    clip_low: float | None = None  # None: rl.clip_range
    clip_high: float | None = None  # None: the low clip (symmetric)


def uniform_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(S,) bool: the samples of groups whose rewards are all equal. Their advantages are all 0, so they teach
    nothing, yet under a token mean they dilute the rest. DAPO drops them and samples more prompts until the batch
    is full again; tunesmith only drops them (a step then learns from fewer groups, and the count is logged as
    groups_filtered): resampling would make a step's size and cost depend on the rewards."""
    grouped = rewards.view(-1, group_size)
    return (grouped == grouped[:, :1]).all(dim=1).repeat_interleave(group_size)


grpo_losses.register("grpo")(GRPOLoss(token_surrogate, token_mean))
grpo_losses.register("dapo")(GRPOLoss(token_surrogate, token_mean, drop_uniform_groups=True, clip_high=0.28))
grpo_losses.register("dr_grpo")(GRPOLoss(token_surrogate, constant_length, scale_rewards=False))
grpo_losses.register("gspo")(GRPOLoss(sequence_surrogate, sequence_mean, clip_low=3e-4, clip_high=4e-4))
