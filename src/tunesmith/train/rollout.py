"""One RL step's samples: replies sampled from the policy (KV-cached generation, seeded by the step), the flat
batch of prompt + reply sequences they are scored in, and `Rollout`, which holds them with their per-token
statistics. Per-token values live in flat tensors over all replies' tokens in sample order, which is the order a
flat padding-free `Batch` of (prompt + reply) sequences yields its targets in; a reply's tokens are found by
`Rollout.token_index`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from tunesmith.data.packing import Batch, collate
from tunesmith.data.tokenize import TokenizedExample
from tunesmith.engine.generation import Sampling
from tunesmith.train.rl_math import kl_k3


def step_seed(seed: int, step: int, purpose: str) -> int:
    """A seed for one purpose at one step: sampling and minibatch order never depend on what ran before."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{step}:{purpose}".encode(), digest_size=7).digest(), "little")


@torch.no_grad()
@torch.compiler.set_stance("force_eager")  # layers compiled for training (train.compile) decode eagerly
def sample_replies(
    model: torch.nn.Module,
    prompts: list[list[int]],
    sampling: Sampling,
    pad_id: int,
    stop_ids: list[int],
    seed: int,
    synced: bool = False,
) -> tuple[list[list[int]], list[torch.Tensor] | None]:
    """One reply per prompt, as token ids up to and including its stop token (all max_new_tokens when it never
    stopped): a left-padded batch through `generate` with its KV cache, drawing from a generator of its own.
    With them, when sampling (None when greedy), each reply token's log-probability as the sampler computed it
    ((len,) float32 each; `SamplerLogprobs`), to set beside the trainer's.
    `synced`: keep running forward passes until every rank is done (FSDP gathers weights in each one)."""
    width = max(len(prompt) for prompt in prompts)
    device = next(model.parameters()).device
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            options = sampling.generate_kwargs()
            recorder = SamplerLogprobs(sampling.temperature) if options["do_sample"] else None
            if recorder is not None:
                options["top_k"] = 0  # no top-k cut from a model's generation config: sample what the policy says
                options["logits_processor"] = LogitsProcessorList([recorder])
            output = model.generate(
                input_ids=input_ids,
                attention_mask=attention,
                pad_token_id=pad_id,
                eos_token_id=stop_ids,
                use_cache=True,
                synced_gpus=synced,
                **options,
            )
    finally:
        model.train(was_training)
    replies = []
    for row in output[:, width:].tolist():
        ends = [position for position, token in enumerate(row) if token in stop_ids]
        replies.append(row[: ends[0] + 1] if ends else row)
    if recorder is None:
        return replies, None
    logprobs = recorder.finish(output[:, width:]).cpu()  # (B, generated)
    return replies, [row[: len(reply)] for row, reply in zip(logprobs, replies)]


class SamplerLogprobs(LogitsProcessor):
    """Records, during `generate`, the log-probability of each token sampled: log_softmax(logits / temperature) of
    the logits the sampler drew from, before top-p truncation. That is the distribution the trainer scores
    (train/policy.py); with top_p < 1 the sampler actually drew from its renormalised nucleus, a difference on
    purpose, not a mismatch. A processor `generate` is given runs after the model's own (e.g. a repetition penalty
    in its generation config, which the trainer does not know, so it shows as mismatch) and before temperature and
    top-p (transformers puts its warpers last; tests/test_grpo_losses.py holds a float32 run to ~0 difference).

    It keeps one step's (B, V) log-probabilities, not every step's logits (output_logits would keep
    max_new_tokens x B x V floats): a token is only known at the next call, as input_ids' last column."""

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.previous: torch.Tensor | None = None  # (B, V) the last call's log-probabilities
        self.steps: list[torch.Tensor] = []  # (B,) per generated token but the last

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.previous is not None:
            self.steps.append(self.previous.gather(1, input_ids[:, -1:]).squeeze(1))
        self.previous = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def finish(self, generated: torch.Tensor) -> torch.Tensor:
        """(B, T) given the (B, T) generated tokens: the last one's log-probability comes from the last call."""
        assert self.previous is not None and len(self.steps) == generated.shape[1] - 1
        last = self.previous.gather(1, generated[:, -1:].to(self.previous.device)).squeeze(1)
        self.previous = None
        return torch.stack([*self.steps, last], dim=1)


def rollout_batch(prompts: list[list[int]], replies: list[list[int]]) -> Batch:
    """Prompt + reply sequences as one flat batch whose targets are the reply tokens, in order."""
    return collate([TokenizedExample(p + r, [False] * len(p) + [True] * len(r)) for p, r in zip(prompts, replies)])


@dataclass
class Rollout:
    """One step's samples. Per-token tensors are flat over every reply's tokens, in sample order."""

    prompts: list[list[int]]  # per sample (a group repeats its prompt)
    replies: list[list[int]]
    texts: list[str]
    rewards: torch.Tensor  # (S,)
    reward_parts: dict[str, torch.Tensor]  # source label -> (S,)
    logprobs: torch.Tensor  # (N,) the policy's at sampling time
    entropy: torch.Tensor  # (N,)
    ref_logprobs: torch.Tensor | None  # (N,) the reference's
    values: torch.Tensor | None = None  # (N,) PPO's value head at sampling time
    advantages: torch.Tensor | None = None  # (N,) set by the recipe
    returns: torch.Tensor | None = None  # (N,) PPO's value targets
    stopped: list[bool] = field(default_factory=list)  # whether each reply ended with a stop token
    sampler_logprobs: torch.Tensor | None = None  # (N,) the sampler's, as `generate` computed them

    @property
    def lengths(self) -> list[int]:
        return [len(reply) for reply in self.replies]

    def per_token(self, per_sample: torch.Tensor) -> torch.Tensor:
        """(S,) -> (N,): each sample's value on every token of its reply."""
        device = self.logprobs.device
        return per_sample.to(device).repeat_interleave(torch.tensor(self.lengths, device=device))

    def sample_of_tokens(self) -> torch.Tensor:
        """(N,) each reply token's sample."""
        return self.per_token(torch.arange(len(self.replies)))

    def token_index(self, samples: list[int]) -> torch.Tensor:
        """The flat positions of these samples' reply tokens, in the order their batch yields them."""
        starts = [0, *torch.tensor(self.lengths).cumsum(0).tolist()]
        return torch.cat([torch.arange(starts[s], starts[s + 1]) for s in samples]).to(self.logprobs.device)

    def batch(self, samples: list[int]) -> Batch:
        return rollout_batch([self.prompts[s] for s in samples], [self.replies[s] for s in samples])

    def figures(self) -> dict[str, float]:
        """What the log shows of the samples: rewards (total and per source), KL, entropy, reply lengths."""
        spread = float(self.rewards.std()) if len(self.texts) > 1 else 0.0
        figures = {"reward": float(self.rewards.mean()), "reward_std": spread}
        figures.update({f"reward_{label}": float(scores.mean()) for label, scores in self.reward_parts.items()})
        if self.ref_logprobs is not None:
            figures["kl"] = float(kl_k3(self.logprobs, self.ref_logprobs).mean())
        if self.sampler_logprobs is not None:
            # train/sample consistency: how far the trainer's numbers for the sampled tokens are from the sampler's
            figures["sample_logprob_diff"] = float((self.logprobs - self.sampler_logprobs).abs().mean())
            # KL(sampler || trainer) from the sampler's tokens; in float64, where k3 of differences ~1e-7 is not 0
            figures["sample_kl"] = float(kl_k3(self.sampler_logprobs.double(), self.logprobs.double()).mean())
        figures.update(
            {
                "entropy": float(self.entropy.mean()),
                "response_length": sum(self.lengths) / len(self.lengths),
                "truncated_fraction": 1 - sum(self.stopped) / len(self.stopped),
            }
        )
        return figures


def split(items: list[int], parts: int) -> list[list[int]]:
    """`items` in `parts` consecutive pieces whose sizes differ by at most one (empty ones dropped)."""
    pieces = [items[len(items) * k // parts : len(items) * (k + 1) // parts] for k in range(parts)]
    return [piece for piece in pieces if piece]
