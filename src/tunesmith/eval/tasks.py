"""Evaluation tasks: how examples become prompts and expectations, and how a model answers them.

Each task is a small registered object; the runner (eval/evaluate.py) treats them all alike. A model is
reached only through the engine's narrow interface: `generate` and `loglikelihood`.

A task names its `metric_task` (eval/metrics.py) and the `headline` metrics the summary prints (those the result
holds), and `settings`: the eval options that shape its predictions, the ones its report shows. Two optional
methods: `metric_task_for(items)`, when the data decides how it is scored (generation with or without
references; a judge of pairs or of scored replies), and `few_shot_problem(items)`, why a few-shot prefix cannot
apply to these items (None when it can): a baseline that cannot apply is refused, never silently the base model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from tunesmith.data.formats import Example
from tunesmith.data.tokenize import TokenizedExample
from tunesmith.engine.generation import Engine, Messages, Sampling
from tunesmith.errors import UserError
from tunesmith.eval.metrics import normalize_answer, parse_number
from tunesmith.registry import tasks


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
    rubric: Any = None  # judge: the Rubric the judge is asked with (default: the built-in rubric for the data)
    scale: int = 5  # judge of scored replies: its scores run from 1 to this


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


def own_turns(chat: Any, prefix: Messages, messages: Messages, last_turn_only: bool = False) -> TokenizedExample:
    """The conversation tokenised after the few-shot prefix, with only its own assistant turns scored.

    The shots condition the model but are not scored: their tokens lie before the character where the rendered
    prefix ends (the system message and the shots render as a prefix of the whole conversation)."""
    full = chat.with_system(with_prefix(prefix, messages))
    lead = len(full) - len([m for m in messages if m["role"] != "system"])  # the system message and the shots
    text, before = chat.render(full), chat.render(full[:lead])
    if not text.startswith(before):
        raise UserError(
            "the model's chat template renders the few-shot turns differently once the conversation "
            "follows, so the conversation's own tokens cannot be told apart; fix: use --baseline base"
        )
    tokenized = chat.tokenize_chat(full, last_turn_only=last_turn_only)
    offsets = chat.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    shot_tokens = sum(1 for start, _ in offsets if start < len(before))
    mask = [trained and position >= shot_tokens for position, trained in enumerate(tokenized.loss_mask)]
    return TokenizedExample(tokenized.input_ids, mask, tokenized.line)


def prefixed_loglikelihood(
    engine: Engine, prefix: Messages, conversations: list[Messages | Example], batch_size: int
) -> list[tuple[float, int]]:
    """`Engine.loglikelihood` of each conversation read after the few-shot `prefix`: (summed log-probability,
    token count) of exactly the tokens it scores without the prefix, so few-shot and base differ only in what
    the model saw first."""
    if not prefix:
        return engine.loglikelihood(conversations, batch_size)
    units = []
    for conversation in conversations:
        if isinstance(conversation, Example):
            assert conversation.kind != "text", "few_shot_problem refuses raw text"
            units.append(
                own_turns(
                    engine.chat, prefix, conversation.messages, last_turn_only=conversation.kind in ("score", "chosen")
                )
            )
        else:
            units.append(own_turns(engine.chat, prefix, conversation))
    return engine.scored_loglikelihood(units, batch_size)


def generate_all(engine: Engine, prompts: list[Messages], context: Context, allowed=None) -> list[str]:
    replies: list[str] = []
    for start in range(0, len(prompts), context.batch_size):
        chunk = [with_prefix(context.prefix, p) for p in prompts[start : start + context.batch_size]]
        replies += engine.generate(chunk, context.sampling, allowed)
    return replies


class Classification:
    """Pick one label: generation constrained to the label set (default) or log-likelihood ranking."""

    metric_task = "classification"
    headline = ("accuracy", "macro_f1")  # the metrics printed in the summary table
    settings = ("method", "labels")

    def items(self, examples: list[Example]) -> list[Item]:
        return chat_items(examples)

    def predict(self, engine: Engine, items: list[Item], context: Context) -> list[str]:
        prompts = [item.prompt for item in items]
        if context.method == "constrained":
            allowed = [engine.reply_ids(label) for label in context.labels]
            return generate_all(engine, prompts, context, allowed)
        predictions = []
        for prompt in prompts:
            scores = prefixed_loglikelihood(
                engine,
                context.prefix,
                [prompt + [{"role": "assistant", "content": label}] for label in context.labels],
                context.batch_size,
            )
            predictions.append(context.labels[max(range(len(scores)), key=lambda i: scores[i][0])])
        return predictions

    def correct(self, prediction: str, expected: str) -> bool:
        return prediction == expected


class ExactMatch:
    """Short answers, scored against every accepted answer: EM, normalised EM, token F1, ROUGE-L, chrF, BLEU."""

    metric_task = "exact_match"
    headline = ("exact_match", "token_f1", "rouge_l", "chrf", "judge_score")  # the metrics printed in the summary
    settings = ("max_new_tokens",)

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
    settings = ("max_new_tokens", "reward_model")

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
            refuse_rated_baseline(context)
            return context.reward.score([item.example.messages for item in items], context.batch_size)
        if any(item.example.kind == "score" for item in items):
            raise UserError(
                "scored replies ({prompt, response, score}) are rated by a reward model; fix: evaluate a "
                "run of method: reward, or pass --reward-model"
            )
        return [parse_number(reply) for reply in generate_all(engine, [item.prompt for item in items], context)]

    def correct(self, prediction: float | None, expected: float) -> bool | None:
        return None


class Perplexity:
    """Held-out loss: raw text (every token) or conversations (assistant tokens, as trained)."""

    metric_task = "perplexity"
    headline = ("perplexity", "loss")  # the metrics printed in the summary table
    settings = ()

    def items(self, examples: list[Example]) -> list[Item]:
        for example in examples:
            if example.kind not in ("text", "chat", "score"):
                raise ItemError(
                    f"{example.line}: perplexity needs raw text or conversations with replies, got "
                    f"{example.kind} data; fix: --task preference for pairs, --task generation for prompts"
                )
        return [Item(i, e.messages, None, e.messages[-1]["content"][:200], e.line, e) for i, e in enumerate(examples)]

    def few_shot_problem(self, items: list[Item]) -> UserError | None:
        text = next((item for item in items if item.example.kind == "text"), None)
        if text is None:
            return None
        return ItemError(
            f"{text.line}: few-shot:K puts example conversations before each row, and raw text has no "
            f"turns to put them before; fix: --baseline base for perplexity on raw text"
        )

    def predict(self, engine: Engine, items: list[Item], context: Context) -> list[tuple[float, int]]:
        """The log-likelihood of each item's own tokens; with a few-shot prefix, read after the shots (which are
        not scored), so few-shot:K is the base model given K examples, scored on the same tokens."""
        if context.prefix and (problem := self.few_shot_problem(items)):
            raise problem
        return prefixed_loglikelihood(engine, context.prefix, [item.example for item in items], context.batch_size)

    def correct(self, prediction, expected) -> None:
        return None


class Preference:
    """Does the model (or a reward model) score the chosen reply above the rejected one?"""

    metric_task = "preference"
    headline = ("preference_accuracy",)  # the metrics printed in the summary table
    settings = ("reward_model",)

    def items(self, examples: list[Example]) -> list[Item]:
        items = []
        for index, example in enumerate(examples):
            if example.kind != "preference":
                raise ItemError(f"{example.line}: the preference task needs {{prompt, chosen, rejected}} rows")
            prompt, chosen = last_reply(example)
            items.append(
                Item(
                    index,
                    prompt,
                    chosen,
                    prompt[-1]["content"],
                    example.line,
                    example,
                    rejected=example.rejected[-1]["content"],
                )
            )
        return items

    def predict(self, engine: Engine, items: list[Item], context: Context) -> list[tuple[float, float]]:
        conversations = []
        for item in items:
            conversations += [
                item.prompt + [{"role": "assistant", "content": item.expected}],
                item.prompt + [{"role": "assistant", "content": item.rejected}],
            ]
        if context.reward is not None:
            refuse_rated_baseline(context)
            rewards = context.reward.score(conversations, context.batch_size)
            return [(rewards[i], rewards[i + 1]) for i in range(0, len(rewards), 2)]
        scores = prefixed_loglikelihood(engine, context.prefix, conversations, context.batch_size)
        return [(scores[i][0], scores[i + 1][0]) for i in range(0, len(scores), 2)]

    def correct(self, prediction: tuple[float, float], expected) -> bool:
        return prediction[0] > prediction[1]


def metric_task_of(task: Any, items: list[Item]) -> str | None:
    """How these items are scored: the task's metric task, unless the data decides (`metric_task_for`)."""
    return task.metric_task_for(items) if hasattr(task, "metric_task_for") else task.metric_task


def refuse_rated_baseline(context: Context) -> None:
    """A reward model rates the replies in the data whatever model is evaluated; a few-shot prefix would change
    only what the reward model reads, not which model answers."""
    if context.prefix:
        raise UserError(
            "--reward-model rates the replies given in the data, not replies of the evaluated model, "
            "so a few-shot baseline has nothing to change; fix: drop --baseline few-shot:K, or use "
            "--task reward"
        )


def nearest_score(value: float) -> int:
    """The whole score nearest to `value`, halves rounded up (3.5 -> 4), as a person would read it."""
    return math.floor(value + 0.5)


class JudgeAgreement:
    """The model as a judge, against people. On {prompt, chosen, rejected} pairs (RLAIF): does it prefer the
    human-chosen reply, asked in both orders? On {prompt, reference, response, score} rows: how close are its
    1..K scores of each response against the reference answer (the reference rubric) to the human scores?"""

    metric_task = "judge"
    headline = ("agreement", "tie_rate", "debiased_agreement", "rating_correlation", "rating_mae", "rating_agreement")
    settings = ("rubric", "judge_scale")

    def items(self, examples: list[Example]) -> list[Item]:
        if not examples or examples[0].kind != "score":
            for example in examples:
                if example.kind != "preference":
                    raise ItemError(
                        f"{example.line}: the judge task needs {{prompt, chosen, rejected}} pairs or "
                        f"{{prompt, reference, response, score}} rows, one kind per file; got "
                        f"{example.kind} data"
                    )
            return Preference().items(examples)
        items = []
        for index, example in enumerate(examples):
            reference = example.fields.get("reference")
            if example.kind != "score" or not isinstance(reference, str) or not reference.strip():
                raise ItemError(
                    f"{example.line}: a scored reply for the judge task needs a 'reference' field (the "
                    f"correct answer the judge compares the response with), and all rows need one"
                )
            prompt, response = last_reply(example)
            items.append(Item(index, prompt, example.score, prompt[-1]["content"], example.line, example))
        return items

    def metric_task_for(self, items: list[Item]) -> str:
        return "judge" if items[0].rejected is not None else "rating_agreement"

    def few_shot_problem(self, items: list[Item]) -> UserError | None:
        return UserError(
            "--baseline few-shot:K: a judge reads its rubric and nothing else, so few-shot:K would be the "
            "base model under another name; fix: --baseline base"
        )

    def predict(self, engine: Engine, items: list[Item], context: Context) -> list[tuple[float, float]] | list[float]:
        from tunesmith.eval.judge import Judge, default_rubric

        if context.prefix:
            raise self.few_shot_problem(items)
        prompts = [item.prompt for item in items]
        if self.metric_task_for(items) == "rating_agreement":
            for item in items:
                if not 1 <= item.expected <= context.scale:
                    raise ItemError(
                        f"{item.line}: the human score {item.expected:g} lies outside the judge's scale 1.."
                        f"{context.scale}; fix: give scores on that scale, or set --judge-scale"
                    )
            judge = Judge(engine, context.rubric or default_rubric("reference"), context.batch_size)
            ratings = judge.rate_against(
                prompts,
                [item.example.fields["reference"] for item in items],
                [last_reply(item.example)[1] for item in items],
                context.scale,
            )
            return [rating.score for rating in ratings]
        judge = Judge(engine, context.rubric or default_rubric("compare"), context.batch_size)
        comparisons = judge.compare(prompts, [item.expected for item in items], [item.rejected for item in items])
        return [(comparison.first_as_a, comparison.first_as_b) for comparison in comparisons]

    def correct(self, prediction: tuple[float, float] | float, expected: Any) -> bool:
        if isinstance(prediction, (tuple, list)):
            return prediction[0] > 0.5 and prediction[1] > 0.5
        return nearest_score(prediction) == nearest_score(expected)


def item_row(example: Example) -> dict[str, Any]:
    """A row's fields as a grader reads them (its `item`), as rft does: a chat's final reply is `reference`."""
    reference = example.meta.get("reference") if example.kind == "prompt" else last_reply(example)[1]
    return {**example.fields, **({"reference": reference} if isinstance(reference, str) else {})}


class RewardedGeneration:
    """The model answers each prompt and a reward model (or a grader, --grader) rates the reply: the mean reward on
    held-out prompts, which is what RL (ppo, grpo, rft) raises. Prompts come from any rows: prompt rows, the prompt
    of each pair, or a conversation up to its last reply."""

    metric_task = "reward"
    headline = ("mean_reward", "reply_words")  # the metrics printed in the summary table
    settings = ("max_new_tokens", "reward_model", "grader")

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
            raise UserError(
                "the reward task rates each generated reply with a reward model; fix: pass --reward-model "
                "RUN (a run of method: reward, or a sequence-classification model directory)"
            )
        prompts = [item.prompt for item in items]
        replies = generate_all(engine, prompts, context)
        rows = [item_row(item.example) for item in items]  # a grader's items
        rewards = context.reward.score(
            [p + [{"role": "assistant", "content": r}] for p, r in zip(prompts, replies)], context.batch_size, rows
        )
        return [{"reply": reply, "reward": reward} for reply, reward in zip(replies, rewards)]

    def correct(self, prediction, expected) -> None:
        return None


class Generation:
    """Free generations, saved side by side for people to review. Rows with a reference reply (a conversation's
    last assistant turn, an answer, completion or output; a prompt row's "reference" field) are also scored
    against it: ROUGE-L, chrF, BLEU (and a judge's score with --judge). Rows without one are review only."""

    metric_task = "text"
    headline = ("rouge_l", "chrf", "bleu", "judge_score")  # the metrics printed in the summary table
    settings = ("max_new_tokens",)

    def items(self, examples: list[Example]) -> list[Item]:
        items = []
        for index, example in enumerate(examples):
            if example.kind == "prompt":
                reference = example.meta.get("reference", example.fields.get("reference"))
                shown = example.messages[-1]["content"]
                items.append(
                    Item(
                        index,
                        example.messages,
                        reference if isinstance(reference, str) else None,
                        shown,
                        example.line,
                        example,
                    )
                )
                continue
            item = chat_items([example])[0]
            item.index, item.expected = index, example.meta.get("answers") or item.expected
            items.append(item)
        scored = [item.expected is not None for item in items]
        if any(scored) and not all(scored):
            missing = items[scored.index(False)]
            raise ItemError(
                f"{missing.line}: this row has no reference reply, and others have one; fix: give every "
                f"row its reference (or none, to only review the generations)"
            )
        return items

    def metric_task_for(self, items: list[Item]) -> str | None:
        return self.metric_task if items and items[0].expected is not None else None

    def predict(self, engine: Engine, items: list[Item], context: Context) -> list[str]:
        return generate_all(engine, [item.prompt for item in items], context)

    def correct(self, prediction, expected) -> None:
        return None


for _name, _task in (
    ("classification", Classification()),
    ("exact_match", ExactMatch()),
    ("regression", Regression()),
    ("perplexity", Perplexity()),
    ("preference", Preference()),
    ("generation", Generation()),
    ("judge", JudgeAgreement()),
    ("reward", RewardedGeneration()),
):
    tasks.register(_name)(_task)
