"""The pieces the RL recipes (recipes/grpo.py, recipes/ppo.py) share: the advantage, loss and KL functions,
prompts, sampling, scoring under the policy and the reference, the value head, and one step's samples.
Their loop (setup, the update, logging, checkpoints) is train/rl_loop.py.

One step: take the step's prompts, sample replies with the policy (KV-cached generation, seeded by the step),
score them (reward functions and/or a reward model), compute each reply token's log-probability under the
policy at sampling time and under the reference, turn rewards into per-token advantages (the recipe's own
part), then update the policy on these samples: `rl.update_epochs` passes of `rl.minibatches` minibatches
with PPO's clipped objective. Per-token values live in flat tensors over all replies' tokens in sample order,
which is the order a flat padding-free `Batch` of (prompt + reply) sequences yields its targets in; a reply's
tokens are found by `Rollout.token_index`.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch

from tunesmith.config.schema import Config
from tunesmith.data.dataset import PreparedData, split_validation
from tunesmith.data.formats import Example, RowError
from tunesmith.data.packing import IGNORE, Batch, collate, epoch_rows
from tunesmith.data.tokenize import ChatTokenizer, TokenizedExample
from tunesmith.data.validate import load_file, report
from tunesmith.errors import Problem, UserError
from tunesmith.models import load_model
from tunesmith.engine.generation import Sampling
from tunesmith.train.distributed import ONE_PROCESS, World
from tunesmith.engine.forward import HEAD_CHUNK, decoder_and_head, hidden_states
from tunesmith.train.preference import head_logprobs

ACCEPTS = ("prompt", "chat", "preference")  # prompts; chat and preference rows give theirs up to the (chosen) reply
Messages = list[dict[str, str]]


# ---------------------------------------------------------------------------------------------
# The math, one small function each (tests/test_rl.py checks them against hand-computed values).

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


def clipped_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token, PPO's clipped surrogate max(-A r, -A clip(r, 1 - c, 1 + c)), r = pi / pi_old; and where the
    clipped term is the larger (the token gives no gradient: its ratio has moved far enough)."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    return torch.maximum(unclipped, clipped), clipped > unclipped


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token, 0.5 max((V - R)^2, (V_clipped - R)^2), V_clipped kept within `clip` of the sampling-time value;
    and where the clipped term is the larger."""
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    plain, clipped = (values - returns) ** 2, (clipped_values - returns) ** 2
    return 0.5 * torch.maximum(plain, clipped), clipped > plain


def whiten(values: torch.Tensor, eps: float = 1e-8, world: World = ONE_PROCESS) -> torch.Tensor:
    """Mean 0, standard deviation (unbiased) 1; over every rank's values when there are several."""
    if not world.distributed:
        return (values - values.mean()) / (values.std() + eps) if values.numel() > 1 else values - values.mean()
    count, total, squares = world.sum([values.numel(), float(values.double().sum()), float(values.double().square().sum())],
                                      values.device)
    mean = total / count
    variance = (squares - count * mean * mean) / max(count - 1, 1)
    return (values - mean) / (max(variance, 0.0) ** 0.5 + eps)


def explained_variance(values: torch.Tensor, returns: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R): 1 when the value head predicts the returns, 0 when it knows nothing."""
    variance = returns.var()
    return float(1 - (returns - values).var() / variance) if variance > 0 else float("nan")


# ---------------------------------------------------------------------------------------------
# Prompts.

@dataclass
class Prompt:
    messages: Messages  # the conversation to reply to, ending with the user's turn (system prompt included)
    input_ids: list[int]  # rendered with the generation prompt
    fields: dict[str, Any]  # the row's scalar fields, for reward functions
    line: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)


def as_prompt(example: Example, chat: ChatTokenizer) -> Prompt:
    """A prompt example as it is; a chat example (or a pair's chosen side) up to its final reply, which becomes the
    field `reference`: the file a reward model trained on serves as the RL prompts too."""
    messages, fields = example.messages, dict(example.fields)
    reply = example.meta.get("reference")
    if example.kind in ("chat", "preference") and messages[-1]["role"] == "assistant":
        reply, messages = messages[-1]["content"], messages[:-1]
    if not messages or messages[-1]["role"] != "user":
        raise RowError("the conversation before its final reply does not end with a user turn, so there is nothing "
                       "to reply to; fix: end each prompt with the user's message")
    if reply is not None:
        fields.setdefault("reference", reply)
    messages = chat.with_system(messages)
    return Prompt(messages, chat.prompt_ids(messages), fields, example.line)


def load_prompts(config: Config, chat: ChatTokenizer, required_fields: dict[str, str]) -> PreparedData:
    """The training and validation prompts; every problem (bad rows, prompts too long to leave room for a
    reply, rows without a field a reward reads) reported at once, before any compute."""
    data, budget = config.data, config.data.max_length - config.rl.max_new_tokens
    prepared = PreparedData([], [], data.format)
    problems: list[Problem] = []
    sets: list[list[Prompt]] = []
    for path in [data.train] + ([data.validation] if data.validation is not None else []):
        loaded = load_file(path, data.format, ACCEPTS, config.method, columns=data.columns)
        prepared.format = loaded.format
        skip = bool(loaded.problems) and data.skip_bad_rows and not loaded.file_problems
        prepared.skipped_rows += len(loaded.problems) if skip else 0
        problems += [] if skip else loaded.problems
        prompts = []
        for example in loaded.examples:
            where = f"{path}:{example.line}"
            try:
                prompt = as_prompt(example, chat)
                invalid = [f"reward '{label}' reads the field '{name}', which this row does not have; fix: add it to "
                           f"every row, or name another field in that reward's args"
                           for label, name in required_fields.items() if name not in prompt.fields]
            except RowError as error:
                invalid = [str(error)]
            if invalid:  # bad rows: skipped and counted with data.skip_bad_rows, like unreadable ones
                prepared.skipped_rows += data.skip_bad_rows
                problems += [] if data.skip_bad_rows else [Problem(where, message) for message in invalid]
            elif len(prompt) > budget and data.truncation == "drop":
                prepared.dropped_long += 1
            elif len(prompt) > budget:
                problems.append(Problem(where, f"the prompt is {len(prompt)} tokens, and with rl.max_new_tokens="
                                        f"{config.rl.max_new_tokens} for the reply it passes data.max_length="
                                        f"{data.max_length}; fix: raise data.max_length, lower rl.max_new_tokens, "
                                        f"or set data.truncation=drop"))
            else:
                prompts.append(prompt)
        sets.append(prompts)
    if problems:
        raise UserError(f"the data has {len(problems)} problem(s); nothing was trained (fix them, or set "
                        f"data.skip_bad_rows=true to skip invalid rows)\n{report(problems)}")
    prepared.train, prepared.validation = sets[0], sets[1] if len(sets) > 1 else []
    if data.val_fraction is not None:
        prepared.train, prepared.validation = split_validation(prepared.train, data.val_fraction, config.train.seed)
    if not prepared.train:
        raise UserError(f"{data.train}: no usable training prompts remain")
    return prepared


class PromptPlan:
    """Which prompts each step takes: a seeded shuffle per epoch, `batch_size` at a time (an epoch's last step may
    take fewer). A function of (epoch, step in epoch) alone, so a resumed run takes the same prompts."""

    def __init__(self, count: int, batch_size: int, seed: int):
        self.count, self.batch_size, self.seed = count, batch_size, seed

    def steps_in_epoch(self, epoch: int) -> int:
        return -(-self.count // self.batch_size)

    def step(self, epoch: int, step_in_epoch: int) -> list[int]:
        order = [row[0] for row in epoch_rows([1] * self.count, 1, False, self.seed, epoch)]
        return order[step_in_epoch * self.batch_size: (step_in_epoch + 1) * self.batch_size]


# ---------------------------------------------------------------------------------------------
# Sampling and scoring.

def step_seed(seed: int, step: int, purpose: str) -> int:
    """A seed for one purpose at one step: sampling and minibatch order never depend on what ran before."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{step}:{purpose}".encode(), digest_size=7).digest(), "little")


@torch.no_grad()
@torch.compiler.set_stance("force_eager")  # layers compiled for training (train.compile) decode eagerly
def sample_replies(model: torch.nn.Module, prompts: list[list[int]], sampling: Sampling, pad_id: int,
                   stop_ids: list[int], seed: int, synced: bool = False) -> list[list[int]]:
    """One reply per prompt, as token ids up to and including its stop token (all max_new_tokens when it never
    stopped): a left-padded batch through `generate` with its KV cache, drawing from a generator of its own.
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
            if options["do_sample"]:
                options["top_k"] = 0  # no top-k cut from a model's generation config: sample what the policy says
            output = model.generate(input_ids=input_ids, attention_mask=attention, pad_token_id=pad_id,
                                    eos_token_id=stop_ids, use_cache=True, synced_gpus=synced, **options)
    finally:
        model.train(was_training)
    replies = []
    for row in output[:, width:].tolist():
        ends = [position for position, token in enumerate(row) if token in stop_ids]
        replies.append(row[: ends[0] + 1] if ends else row)
    return replies


def rollout_batch(prompts: list[list[int]], replies: list[list[int]]) -> Batch:
    """Prompt + reply sequences as one flat batch whose targets are the reply tokens, in order."""
    return collate([TokenizedExample(p + r, [False] * len(p) + [True] * len(r)) for p, r in zip(prompts, replies)])


def policy_outputs(model: torch.nn.Module, batch: Batch, temperature: float,
                   value_head: torch.nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N,) log-probabilities of the batch's target tokens at `temperature`, differentiable, and the value head's
    (N,) values at the same positions (the state before each reply token), or None."""
    keep = batch.targets[0] != IGNORE
    hidden = hidden_states(model, batch)[0][keep]
    logprobs = head_logprobs(model, hidden, batch.targets[0][keep], temperature)
    return logprobs, value_head(hidden.detach()) if value_head is not None else None


@torch.no_grad()
def token_statistics(model: torch.nn.Module, batch: Batch, temperature: float, value_head: torch.nn.Module | None = None
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
            all_logprobs = torch.log_softmax(head(hidden[start: start + HEAD_CHUNK]).float() / temperature, dim=-1)
            logprobs.append(all_logprobs.gather(1, targets[start: start + HEAD_CHUNK, None]).squeeze(1))
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
        self.layers = torch.nn.Sequential(torch.nn.Linear(hidden_size, hidden_size), torch.nn.GELU(),
                                          torch.nn.Linear(hidden_size, 1))
        torch.nn.init.zeros_(self.layers[2].weight)
        torch.nn.init.zeros_(self.layers[2].bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.layers(hidden.to(self.layers[0].weight.dtype)).squeeze(-1)


class PolicyAndValue(torch.nn.Module):
    """What PPO's optimizer and checkpoints hold: the policy and its value head."""

    def __init__(self, policy: torch.nn.Module, value_head: ValueHead):
        super().__init__()
        self.policy, self.value_head = policy, value_head


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

    @property
    def lengths(self) -> list[int]:
        return [len(reply) for reply in self.replies]

    def per_token(self, per_sample: torch.Tensor) -> torch.Tensor:
        """(S,) -> (N,): each sample's value on every token of its reply."""
        device = self.logprobs.device
        return per_sample.to(device).repeat_interleave(torch.tensor(self.lengths, device=device))

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
        figures.update({"entropy": float(self.entropy.mean()), "response_length": sum(self.lengths) / len(self.lengths),
                        "truncated_fraction": 1 - sum(self.stopped) / len(self.stopped)})
        return figures


def split(items: list[int], parts: int) -> list[list[int]]:
    """`items` in `parts` consecutive pieces whose sizes differ by at most one (empty ones dropped)."""
    pieces = [items[len(items) * k // parts: len(items) * (k + 1) // parts] for k in range(parts)]
    return [piece for piece in pieces if piece]
