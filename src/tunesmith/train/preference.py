"""Learning from preference pairs without a reward model: the DPO family's losses and its objective.

A batch holds pairs as consecutive segments, chosen then rejected (data/tokenize.py `TokenizedPair`). Each
side's score is the summed log-probability of its final reply; the policy's score minus the reference's is
the implicit reward's log-ratio. Every loss is a small registered function of the two log-ratios:

    h = beta * ((log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)))
    sigmoid  -(1 - e) log s(h) - e log s(-h)                  DPO; e > 0 is conservative DPO (cDPO)
    robust   (-(1 - e) log s(h) + e log s(-h)) / (1 - 2e)     unbiased under a flip rate e (Chowdhury et al.)
    ipo      (h / beta - 1 / (2 beta))^2                       IPO (Azar et al.), log-ratios per reply token
    hinge    max(0, 1 - h)                                     SLiC-HF's hinge

IPO's log-ratios are averaged over each reply's tokens (registered with `per_token=True`), as its authors'
reported results use (and TRL does); with sums its squared loss grows with reply length.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tunesmith.data.packing import IGNORE, Batch
from tunesmith.engine.forward import (
    HEAD_CHUNK,
    balance_loss,
    decoder_and_head,
    fused_head,
    hidden_states,
    router_balance,
)
from tunesmith.registry import preference_losses
from tunesmith.train.loss import head_operands, head_softmax_chunks
from tunesmith.train.step import Objective

# (chosen log-ratio, rejected log-ratio, beta, label smoothing) -> loss per pair
PreferenceLoss = Callable[[torch.Tensor, torch.Tensor, float, float], torch.Tensor]
# (model, batch) -> (segments,) reference log-probabilities, no gradient
Reference = Callable[[torch.nn.Module, Batch], torch.Tensor]


@preference_losses.register("sigmoid")
def sigmoid_loss(chosen: torch.Tensor, rejected: torch.Tensor, beta: float, smoothing: float) -> torch.Tensor:
    h = beta * (chosen - rejected)
    return -(1 - smoothing) * F.logsigmoid(h) - smoothing * F.logsigmoid(-h)


@preference_losses.register("robust")
def robust_loss(chosen: torch.Tensor, rejected: torch.Tensor, beta: float, smoothing: float) -> torch.Tensor:
    h = beta * (chosen - rejected)
    return (-(1 - smoothing) * F.logsigmoid(h) + smoothing * F.logsigmoid(-h)) / (1 - 2 * smoothing)


@preference_losses.register("ipo", per_token=True)
def ipo_loss(chosen: torch.Tensor, rejected: torch.Tensor, beta: float, smoothing: float) -> torch.Tensor:
    return (chosen - rejected - 1 / (2 * beta)) ** 2


@preference_losses.register("hinge")
def hinge_loss(chosen: torch.Tensor, rejected: torch.Tensor, beta: float, smoothing: float) -> torch.Tensor:
    return torch.relu(1 - beta * (chosen - rejected))


class HeadTokenLogProbs(torch.autograd.Function):
    """log softmax(hidden_i @ weight.T)[targets_i] per position, for a frozen head, in chunks.

    Forward keeps only d logp_i / d hidden_i = (onehot - softmax) @ weight, one (tokens x hidden) buffer;
    backward scales its rows by the upstream gradients. No (tokens, vocab) logits outlive their chunk.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        ctx.hidden_dtype = hidden.dtype
        h, head = head_operands(hidden, weight)  # before autocast goes off: its dtype is the kernel's
        with torch.autocast(hidden.device.type, enabled=False):
            logprobs = torch.empty(targets.shape[0], dtype=torch.promote_types(h.dtype, torch.float32), device=h.device)
            grad = torch.empty_like(h) if ctx.needs_input_grad[0] else None
            for chunk in head_softmax_chunks(h, head, targets):
                logprobs[chunk.rows] = chunk.logprobs
                if grad is not None:
                    grad[chunk.rows] = chunk.softmax_minus_onehot().neg_().to(h.dtype) @ head  # onehot - softmax
        ctx.save_for_backward(grad)
        return logprobs

    @staticmethod
    def backward(ctx, upstream: torch.Tensor):
        (grad,) = ctx.saved_tensors
        if grad is None:
            return None, None, None
        return (grad * upstream[:, None].to(grad.dtype)).to(ctx.hidden_dtype), None, None


def _chunk_logprobs(
    head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    return -F.cross_entropy(head(hidden).float() / temperature, targets, reduction="none")


def head_logprobs(
    model: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """(N,) log softmax(head(hidden) / temperature)[targets] for (N, H) hidden states, differentiable.

    RL samples at a temperature, so its log-probabilities are those of the tempered distribution."""
    _, head = decoder_and_head(model)
    if fused_head(model, head) and not head.weight.requires_grad:
        # adapters: the head is frozen; (h / T) W^T is exactly the tempered logits of a bias-free head
        return HeadTokenLogProbs.apply(hidden / temperature if temperature != 1.0 else hidden, head.weight, targets)
    pieces = []  # a trained head (full fine-tuning): autograd per chunk, logits recomputed in backward
    for start in range(0, targets.shape[0], HEAD_CHUNK):
        chunk = slice(start, start + HEAD_CHUNK)
        args = (head, hidden[chunk], targets[chunk], temperature)
        pieces.append(
            checkpoint(_chunk_logprobs, *args, use_reentrant=False)
            if torch.is_grad_enabled()
            else _chunk_logprobs(*args)
        )
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)


def sequence_logprobs(model: torch.nn.Module, batch: Batch, routed: list | None = None) -> torch.Tensor:
    """(segments,) each segment's summed log-probability of its target tokens, differentiable; a mixture of experts
    appends its routers' logits to `routed` (engine/forward.hidden_states)."""
    keep = batch.targets[0] != IGNORE
    hidden, targets = hidden_states(model, batch, routed)[0][keep], batch.targets[0][keep]
    owner = batch.example_index()[keep]
    per_token = head_logprobs(model, hidden, targets)
    sums = torch.zeros(len(batch.segment_lengths), dtype=per_token.dtype, device=per_token.device)
    return sums.index_add(0, owner, per_token)


def target_counts(batch: Batch) -> torch.Tensor:
    """(segments,) how many target tokens each segment has."""
    keep = batch.targets[0] != IGNORE
    return torch.bincount(batch.example_index()[keep], minlength=len(batch.segment_lengths))


@torch.no_grad()
def adapter_off_logprobs(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """The reference: the same weights with the adapter switched off (a PEFT model), no second copy."""
    was_training = model.training
    model.eval()
    try:
        with model.disable_adapter():
            return sequence_logprobs(model, batch).float()
    finally:
        model.train(was_training)


class PreferenceObjective(Objective):
    """The DPO family's objective: a registered loss of the policy's and the reference's log-ratios, per pair.

    Logged (means over the pairs since the last report): the loss's inputs as the implicit rewards
    beta * log-ratio of chosen and rejected, their margin, how often the chosen one wins (reward
    accuracy), and the policy's log-probabilities of each side.
    """

    def __init__(
        self, loss: PreferenceLoss, beta: float, label_smoothing: float, reference: Reference, per_token: bool = False
    ):
        self.loss, self.beta, self.label_smoothing, self.reference = loss, beta, label_smoothing, reference
        self.per_token = per_token  # the loss takes log-ratios averaged over each reply's tokens

    def count(self, batch: Batch) -> int:
        return batch.num_units

    def __call__(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        if len(batch.segment_lengths) != 2 * batch.num_units:
            raise ValueError("a preference batch holds pairs: two segments per unit, chosen then rejected")
        balance = router_balance(model)
        routed: list[torch.Tensor] | None = [] if balance is not None else None
        policy = sequence_logprobs(model, batch, routed)
        reference = self.reference(model, batch).to(policy.dtype)
        chosen, rejected = policy[0::2] - reference[0::2], policy[1::2] - reference[1::2]
        if self.per_token:
            counts = target_counts(batch).to(policy.dtype)
            losses = self.loss(chosen / counts[0::2], rejected / counts[1::2], self.beta, self.label_smoothing)
        else:
            losses = self.loss(chosen, rejected, self.beta, self.label_smoothing)
        chosen_reward, rejected_reward = chosen.detach() * self.beta, rejected.detach() * self.beta
        self.record(
            {
                "reward_accuracy": (chosen_reward > rejected_reward).float(),
                "reward_margin": chosen_reward - rejected_reward,
                "reward_chosen": chosen_reward,
                "reward_rejected": rejected_reward,
                "logp_chosen": policy[0::2],
                "logp_rejected": policy[1::2],
            }
        )
        if (
            balance is not None
        ):  # a mixture of experts: its routers' balance loss, once per pair, as the token loss does
            return losses.sum() + balance[1] * balance_loss(model, routed) * batch.num_units
        return losses.sum()
