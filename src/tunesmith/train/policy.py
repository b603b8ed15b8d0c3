"""The policy as RL scores it: each reply token's log-probability (differentiable, at the sampling temperature)
and entropy, the reference it is kept near (the adapter switched off, or a frozen copy), and PPO's value head.
"""

from __future__ import annotations

import torch

from tunesmith.config.schema import Config
from tunesmith.data.packing import IGNORE, Batch
from tunesmith.engine.forward import HEAD_CHUNK, balanced_hidden_states, decoder_and_head, hidden_states
from tunesmith.models import load_model
from tunesmith.train.preference import head_logprobs


def policy_outputs(
    model: torch.nn.Module, batch: Batch, temperature: float, value_head: torch.nn.Module | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(N,) log-probabilities of the batch's target tokens at `temperature`, differentiable; the value head's (N,)
    values at the same positions (the state before each reply token), or None; and a mixture of experts' weighted
    router balance loss over the batch (a scalar each reply token's loss adds, so their mean carries it once), or
    None."""
    keep = batch.targets[0] != IGNORE
    hidden, balance = balanced_hidden_states(model, batch)
    hidden = hidden[0][keep]
    logprobs = head_logprobs(model, hidden, batch.targets[0][keep], temperature)
    return logprobs, value_head(hidden.detach()) if value_head is not None else None, balance


@torch.no_grad()
def token_statistics(
    model: torch.nn.Module, batch: Batch, temperature: float, value_head: torch.nn.Module | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(log-probabilities, entropies, values or None), each (N,) over the batch's target tokens; no gradient,
    dropout off. The entropy is the tempered policy's at each position, in nats."""
    was_training = model.training
    model.eval()
    try:
        _, head = decoder_and_head(model)
        keep = batch.targets[0] != IGNORE
        hidden, targets = hidden_states(model, batch)[0][keep], batch.targets[0][keep]
        logprobs, entropies = [], []
        for start in range(0, targets.shape[0], HEAD_CHUNK):
            all_logprobs = torch.log_softmax(head(hidden[start : start + HEAD_CHUNK]).float() / temperature, dim=-1)
            logprobs.append(all_logprobs.gather(1, targets[start : start + HEAD_CHUNK, None]).squeeze(1))
            entropies.append(-(all_logprobs.exp() * all_logprobs).sum(dim=-1))
        values = value_head(hidden).float() if value_head is not None else None
        return torch.cat(logprobs), torch.cat(entropies), values
    finally:
        model.train(was_training)


class Reference:
    """Log-probabilities under the model before training. For an adapter: the same weights with the adapter
    switched off, no second copy. For full fine-tuning (the weights themselves change): a frozen copy of the
    starting model, loaded only when rl.kl_coef > 0 (an extra copy of the weights; AdamW already holds four)."""

    def __init__(self, policy: torch.nn.Module, copy: torch.nn.Module | None = None):
        self.policy, self.copy = policy, copy

    def __call__(self, batch: Batch, temperature: float) -> torch.Tensor:
        if self.copy is not None:
            return token_statistics(self.copy, batch, temperature)[0]
        with self.policy.disable_adapter():
            return token_statistics(self.policy, batch, temperature)[0]


def build_reference(config: Config, model: torch.nn.Module, device: torch.device) -> Reference | None:
    if hasattr(model, "disable_adapter"):
        return Reference(model)
    if config.rl.kl_coef == 0:
        return None
    copy, _ = load_model(config.model, device=device)
    return Reference(model, copy.requires_grad_(False).eval())


class ValueHead(torch.nn.Module):
    """PPO's critic: a two-layer MLP on the policy's final hidden states, detached, so the value loss never
    moves the policy and no second model is needed. Its last layer starts at zero (every value 0)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(hidden_size, hidden_size), torch.nn.GELU(), torch.nn.Linear(hidden_size, 1)
        )
        torch.nn.init.zeros_(self.layers[2].weight)
        torch.nn.init.zeros_(self.layers[2].bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.layers(hidden.to(self.layers[0].weight.dtype)).squeeze(-1)


class PolicyAndValue(torch.nn.Module):
    """What PPO's optimizer and checkpoints hold: the policy and its value head."""

    def __init__(self, policy: torch.nn.Module, value_head: ValueHead):
        super().__init__()
        self.policy, self.value_head = policy, value_head
