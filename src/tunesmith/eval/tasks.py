"""Evaluation tasks: how examples become prompts and expectations, and how a model answers them.

Each task is a small registered object; the runner (eval/run.py) treats them all alike. A model is
reached only through the engine's narrow interface: `generate` and `loglikelihood`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tunesmith.data.formats import Example
from tunesmith.errors import UserError
from tunesmith.eval.metrics import normalize_answer, parse_number
from tunesmith.registry import tasks
from tunesmith.serve.engine import Engine, Messages, Sampling

class ItemError(UserError):
    """A row the task cannot use; the message starts with its line number and the runner adds the file."""


@dataclass
class Item:
    """One evaluation example: the conversation to answer, what is expected, and how to show it."""

    index: int
    prompt: Messages
    expected: Any
    shown_input: str
    line: int = 0
    example: Example | None = None
    rejected: str | None = None
    slice: str | None = None


@dataclass
class Context:
    """What a system needs to answer: decoding settings, the label set, a few-shot prefix."""

    sampling: Sampling
    batch_size: int = 16
    method: str = "constrained"  # classification: constrained generation or loglik ranking
    labels: list[str] = field(default_factory=list)
    prefix: Messages = field(default_factory=list)  # few-shot turns placed before each prompt
    reward: Any = None  # preference: a RewardScorer that scores replies instead of the model's log-probability
    rubric: Any = None  # judge: the Rubric the judge is asked with (default: the built-in compare rubric)


def with_prefix(prefix: Messages, prompt: Messages) -> Messages:
    """System message first, then the few-shot turns, then the conversation itself."""
    if not prefix:
        return prompt
    system = [m for m in prefix[:1] if m["role"] == "system"] or [m for m in prompt[:1] if m["role"] == "system"]
    rest = [m for m in prompt if m["role"] != "system"]
    shots = [m for m in prefix if m["role"] != "system"]
    return system + shots + rest


def last_reply(example: Example) -> tuple[Messages, str]:
    """The conversation up to its final assistant turn, and that turn's text."""
    last = max(i for i, m in enumerate(example.messages) if m["role"] == "assistant")
    return example.messages[:last], example.messages[last]["content"]


def chat_items(examples: list[Example]) -> list[Item]:
    items = []
    for index, example in enumerate(examples):
        if example.kind not in ("chat", "score"):
            raise ItemError(f"{example.line}: this task needs conversations or labelled rows, got {example.kind} data")
        prompt, reply = last_reply(example)
        items.append(Item(index, prompt, reply, prompt[-1]["content"] if prompt else "", example.line, example))
    return items


def generate_all(engine: Engine, prompts: list[Messages], context: Context, allowed=None) -> list[str]:
    replies: list[str] = []
    for start in range(0, len(prompts), context.batch_size):
        chunk = [with_prefix(context.prefix, p) for p in prompts[start: start + context.batch_size]]
        replies += engine.generate(chunk, context.sampling, allowed)
    return replies


class Classification:
    """Pick one label: generation constrained to the label set (default) or log-likelihood ranking."""

    metric_task = "classification"
    headline = ("accuracy", "macro_f1")  # the metrics printed in the summary table

    def items(self, examples: list[Example]) -> list[Item]:
        return chat_items(examples)

    def predict(self, engine: Engine, items: list[Item], context: Context) -> list[str]:
        prompts = [item.prompt for item in items]
        if context.method == "constrained":
            allowed = [engine.reply_ids(label) for label in context.labels]
            return generate_all(engine, prompts, context, allowed)
        predictions = []
        for prompt in prompts:
            full = with_prefix(context.prefix, prompt)
            scores = engine.loglikelihood([full + [{"role": "assistant", "content": label}] for label in context.labels],
                                          context.batch_size)
            predictions.append(context.labels[max(range(len(scores)), key=lambda i: scores[i][0])])
        return predictions

    def correct(self, prediction: str, expected: str) -> bool:
        return prediction == expected


class ExactMatch:
    """Short answers, scored against every accepted answer: EM, normalised EM, token F1."""

    metric_task = "exact_match"
    headline = ("exact_match", "token_f1")  # the metrics printed in the summary table

    def items(self, examples: list[Example]) -> list[Item]:
        items = chat_items(examples)
        for item in items:
            item.expected = item.example.meta.get("answers") or [item.expected]
        return items

    def predict(self, engine: Engine, items: list[Item], context: Context) -> list[str]:
        replies = generate_all(engine, [item.prompt for item in items], context)
        return [next((line.strip() for line in reply.splitlines() if line.strip()), "") for reply in replies]

    def correct(self, prediction: str, expected: list[str]) -> bool:
        return any(normalize_answer(prediction) == normalize_answer(answer) for answer in expected)


class Regression:
    """Numeric answers: the number in the reply against the expected number (MSE, MAE). Scored replies
    ({prompt, response, score}) are rated by a reward model instead, its rating against the score."""

    metric_task = "regression"
    headline = ("mae", "mse")  # the metrics printed in the summary table

    def items(self, examples: list[Example]) -> list[Item]:
        items = chat_items(examples)
        for item in items:
            if item.example.kind == "score":
                item.expected = item.example.score
                continue
            value = parse_number(str(item.expected))
            if value is None:
                raise ItemError(f"{item.line}: expected a number for the regression task, got {item.expected!r}")
            item.expected = value
        return items

    def predict(self, engine: Engine, items: list[Item], context: Context) -> list[float | None]:
        if context.reward is not None:
            conversations = [with_prefix(context.prefix, item.example.messages) for item in items]
            return context.reward.score(conversations, context.batch_size)
        if any(item.example.kind == "score" for item in items):
            raise UserError("scored replies ({prompt, response, score}) are rated by a reward model; fix: evaluate a "
                            "run of method: reward, or pass --reward-model")
        return [parse_number(reply) for reply in generate_all(engine, [item.prompt for item in items], context)]

    def correct(self, prediction: float | None, expected: float) -> bool | None:
        return None


class Perplexity:
    """Held-out loss: raw text (every token) or conversations (assistant tokens, as trained)."""

    metric_task = "perplexity"
    headline = ("perplexity", "loss")  # the metrics printed in the summary table

    def items(self, examples: list[Example]) -> list[Item]:
        return [Item(i, e.messages, None, e.messages[-1]["content"][:200], e.line, e) for i, e in enumerate(examples)]

    def predict(self, engine: Engine, items: list[Item], context: Context) -> list[tuple[float, int]]:
        return engine.loglikelihood([item.example for item in items], context.batch_size)

    def correct(self, prediction, expected) -> None:
        return None


class Preference:
    """Does the model (or a reward model) score the chosen reply above the rejected one?"""

    metric_task = "preference"
    headline = ("preference_accuracy",)  # the metrics printed in the summary table

    def items(self, examples: list[Example]) -> list[Item]:
        items = []
        for index, example in enumerate(examples):
            if example.kind != "preference":
                raise ItemError(f"{example.line}: the preference task needs {{prompt, chosen, rejected}} rows")
            prompt, chosen = last_reply(example)
            items.append(Item(index, prompt, chosen, prompt[-1]["content"], example.line, example,
                              rejected=example.rejected[-1]["content"]))
        return items

    def predict(self, engine: Engine, items: list[Item], context: Context) -> list[tuple[float, float]]:
        conversations = []
        for item in items:
            prompt = with_prefix(context.prefix, item.prompt)
            conversations += [prompt + [{"role": "assistant", "content": item.expected}],
                              prompt + [{"role": "assistant", "content": item.rejected}]]
        if context.reward is not None:
            rewards = context.reward.score(conversations, context.batch_size)
            return [(rewards[i], rewards[i + 1]) for i in range(0, len(rewards), 2)]
        scores = engine.loglikelihood(conversations, context.batch_size)
        return [(scores[i][0], scores[i + 1][0]) for i in range(0, len(scores), 2)]

    def correct(self, prediction: tuple[float, float], expected) -> bool:
        return prediction[0] > prediction[1]


class JudgeAgreement:
    """The model as a judge (RLAIF): does it prefer the human-chosen reply of each pair, asked in both orders?"""

    metric_task = "judge"
    headline = ("agreement", "tie_rate", "debiased_agreement")  # the metrics printed in the summary table

    def items(self, examples: list[Example]) -> list[Item]:
        return Preference().items(examples)

    def predict(self, engine: Engine, items: list[Item], context: Context) -> list[tuple[float, float]]:
        from tunesmith.eval.judge import Judge, default_rubric

        judge = Judge(engine, context.rubric or default_rubric("compare"), context.batch_size)
        comparisons = judge.compare([item.prompt for item in items], [item.expected for item in items],
                                    [item.rejected for item in items])
        return [(comparison.first_as_a, comparison.first_as_b) for comparison in comparisons]

    def correct(self, prediction: tuple[float, float], expected) -> bool:
        return prediction[0] > 0.5 and prediction[1] > 0.5


class RewardedGeneration:
    """The model answers each prompt and a reward model rates the reply: the mean reward on held-out prompts,
    which is what RL (ppo, grpo) raises. Prompts come from any rows: prompt rows, the prompt of each pair, or a
    conversation up to its last reply."""

    metric_task = "reward"
    headline = ("mean_reward", "reply_words")  # the metrics printed in the summary table

    def items(self, examples: list[Example]) -> list[Item]:
        items = []
        for index, example in enumerate(examples):
            if example.kind == "text":
                raise ItemError(f"{example.line}: the reward task needs prompts, pairs or conversations, got raw text")
            prompt = example.messages if example.kind == "prompt" else last_reply(example)[0]
            items.append(Item(index, prompt, None, prompt[-1]["content"] if prompt else "", example.line, example))
        return items

    def predict(self, engine: Engine, items: list[Item], context: Context) -> list[dict[str, Any]]:
        if context.reward is None:
            raise UserError("the reward task rates each generated reply with a reward model; fix: pass --reward-model "
                            "RUN (a run of method: reward, or a sequence-classification model directory)")
        prompts = [item.prompt for item in items]
        replies = generate_all(engine, prompts, context)
        rewards = context.reward.score([p + [{"role": "assistant", "content": r}] for p, r in zip(prompts, replies)],
                                       context.batch_size)
        return [{"reply": reply, "reward": reward} for reply, reward in zip(replies, rewards)]

    def correct(self, prediction, expected) -> None:
        return None


class Generation:
    """Free generations, saved side by side for people to review; no metric."""

    metric_task = None
    headline = ()  # the metrics printed in the summary table

    def items(self, examples: list[Example]) -> list[Item]:
        return chat_items(examples)

    def predict(self, engine: Engine, items: list[Item], context: Context) -> list[str]:
        return generate_all(engine, [item.prompt for item in items], context)

    def correct(self, prediction, expected) -> None:
        return None


for _name, _task in (("classification", Classification()), ("exact_match", ExactMatch()), ("regression", Regression()),
                     ("perplexity", Perplexity()), ("preference", Preference()), ("generation", Generation()),
                     ("judge", JudgeAgreement()), ("reward", RewardedGeneration())):
    tasks.register(_name)(_task)
