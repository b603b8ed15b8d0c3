"""Messages → (token ids, loss mask) through the tokenizer's own chat template.

The mask marks the tokens of every assistant turn, including the template's end-of-turn token (so a
tuned model learns to stop). It works for any template, without `{% generation %}` tags: the
assistant turn i is the text between render(messages[:i], generation prompt) and
render(messages[:i+1]), both prefixes of the whole rendering; tokens are assigned to turns by their
character offsets in one tokenisation of the whole conversation, so no boundary is re-tokenised.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tunesmith.data.formats import Example
from tunesmith.errors import UserError

Span = tuple[int, int]  # [start, end) in characters of the rendered conversation


@dataclass
class TokenizedExample:
    input_ids: list[int]
    loss_mask: list[bool]  # True where the token is a training target
    line: int = 0
    score: float | None = None  # pointwise reward data: the reply's score
    label: int | None = None  # classification (method classify): the class index; the sequence is its input

    def __len__(self) -> int:
        return len(self.input_ids)

    def segments(self) -> list["TokenizedExample"]:
        """The sequences this unit puts in a batch: itself."""
        return [self]


@dataclass
class TokenizedPair:
    """A preference pair: the prompt with the chosen reply, then with the rejected one. Batched as one unit,
    so the two always share a micro-batch (chosen first); the loss mask marks each final reply only."""

    chosen: TokenizedExample
    rejected: TokenizedExample
    line: int = 0

    def __len__(self) -> int:
        return len(self.chosen) + len(self.rejected)

    def segments(self) -> list[TokenizedExample]:
        return [self.chosen, self.rejected]


Unit = TokenizedExample | TokenizedPair  # what packing places in rows and a training step counts


# Where chat templates read an assistant turn's thoughts: Qwen3 and DeepSeek-R1's, then other conventions
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTokenizer:
    """Renders and tokenises examples for one tokenizer; the unit of data preparation."""

    def __init__(
        self, tokenizer: Any, loss_on: str = "assistant", system_prompt: str | None = None, reasoning: str = "keep"
    ):
        self.tokenizer = tokenizer
        self.loss_on = loss_on
        self.system_prompt = system_prompt
        self.reasoning = reasoning  # data.reasoning: keep | mask | drop
        self.special_ids = set(tokenizer.all_special_ids)

    def render(self, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
        if self.tokenizer.chat_template is None:
            raise UserError(
                "the model's tokenizer has no chat template, so chat data cannot be rendered; "
                "fix: use a chat/instruct model, or train raw text with method: pretrain"
            )
        messages = [self.template_message(message) for message in messages]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def template_message(self, message: dict[str, str]) -> dict[str, str]:
        """The message as the chat template reads it: its thoughts under the field the template renders in its
        thinking block (reasoning_content: Qwen3, DeepSeek-R1; thinking; reasoning), or left out (data.reasoning:
        drop)."""
        if "reasoning" not in message:
            return message
        rest = {key: value for key, value in message.items() if key != "reasoning"}
        if self.reasoning == "drop":
            return rest
        field = next((name for name in REASONING_FIELDS if name in self.tokenizer.chat_template), None)
        if field is None:
            raise UserError(
                "the data has assistant turns with reasoning, and the model's chat template has no thinking "
                f"block ({', '.join(REASONING_FIELDS)}) to render it in; fix: set data.reasoning: drop (train on "
                "the replies alone), or use a reasoning model whose template renders thoughts (Qwen3, DeepSeek-R1)"
            )
        return {**rest, field: message["reasoning"]}

    def with_system(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        if self.system_prompt is not None and messages[0]["role"] != "system":
            return [{"role": "system", "content": self.system_prompt}] + messages
        return messages

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation followed by the generation prompt (for inference)."""
        text = self.render(self.with_system(messages), generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def __call__(self, example: Example) -> Unit:
        if example.kind == "text":
            return self.tokenize_text(example.text, example.line)
        if example.kind == "preference":  # only the final replies differ, so only they are scored
            return TokenizedPair(
                self.tokenize_chat(example.messages, example.line, last_turn_only=True),
                self.tokenize_chat(example.rejected, example.line, last_turn_only=True),
                example.line,
            )
        if example.kind in ("score", "chosen"):  # a rated reply, or a pair's chosen one: only it is trained
            scored = self.tokenize_chat(example.messages, example.line, last_turn_only=True)
            scored.score = example.score
            return scored
        return self.tokenize_chat(example.messages, example.line)

    def tokenize_input(self, prompt: list[dict[str, str]], line: int = 0) -> TokenizedExample:
        """A classifier's input: the conversation before the label, with the generation prompt, so the last token,
        where the classifier reads, is where a generating model would begin its reply."""
        ids = self.prompt_ids(prompt)
        return TokenizedExample(ids, [False] * len(ids), line)

    def tokenize_text(self, text: str, line: int = 0) -> TokenizedExample:
        """A raw document, followed by the end-of-sequence token as a separator; every token trains."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if self.tokenizer.eos_token_id is not None:
            ids = ids + [self.tokenizer.eos_token_id]
        return TokenizedExample(ids, [True] * len(ids), line)

    def tokenize_chat(
        self, messages: list[dict[str, str]], line: int = 0, last_turn_only: bool = False
    ) -> TokenizedExample:
        """Loss on every assistant turn (or, `last_turn_only`, on the final reply: what preference data rates)."""
        messages = self.with_system(messages)
        full = self.render(messages)
        encoded = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        if self.loss_on == "all" and not last_turn_only:
            return TokenizedExample(ids, [True] * len(ids), line)
        spans = self.assistant_spans(messages, full)[-1:] if last_turn_only else self.assistant_spans(messages, full)
        mask = [any(start <= token_start < end for start, end in spans) for token_start, _ in offsets]
        # A template without an end-of-turn token would never teach the model to stop: add EOS, trained.
        trained = [token for token, keep in zip(ids, mask) if keep]
        if trained and trained[-1] not in self.special_ids and self.tokenizer.eos_token_id is not None:
            ids, mask = ids + [self.tokenizer.eos_token_id], mask + [True]
        return TokenizedExample(ids, mask, line)

    def assistant_spans(self, messages: list[dict[str, str]], full: str) -> list[Span]:
        """The trained characters of each assistant turn: the turn as the template renders it (its end-of-turn
        token included), from its thoughts where they train (data.reasoning: keep), else from its reply: whatever
        the template puts before the reply (masked thoughts, Qwen3's empty <think></think>) stays context."""
        spans: list[Span] = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            span = self._span_by_prefix(messages, index, full)
            if span is None:
                span = self._span_by_search(message["content"], full, spans[-1][1] if spans else 0)
            if "reasoning" not in message or self.reasoning != "keep":
                span = (self._reply_start(message, full, span), span[1])
            spans.append(span)
        return spans

    def _reply_start(self, message: dict[str, str], full: str, span: Span) -> int:
        """Where the turn's reply begins in `full`: after its thoughts, if the template rendered them."""
        start = span[0]
        if "reasoning" in message and self.reasoning != "drop":
            thoughts = full.find(message["reasoning"].strip(), start, span[1])
            start = thoughts + len(message["reasoning"].strip()) if thoughts >= 0 else start
        reply = full.find(message["content"].strip(), start, span[1])
        return reply if reply >= 0 else span[0]

    def _span_by_prefix(self, messages: list[dict[str, str]], index: int, full: str) -> Span | None:
        """The turn as the difference of two renderings, when both are prefixes of the whole."""
        try:
            before = self.render(messages[:index], generation_prompt=True) if index else ""
            through = self.render(messages[: index + 1]).rstrip()
        except Exception:  # some templates refuse partial conversations; the search below still works
            return None
        if full.startswith(before) and full.startswith(through) and len(through) > len(before):
            return len(before), len(through)
        return None

    def _span_by_search(self, content: str, full: str, search_from: int) -> Span:
        """Fallback for templates that rewrite earlier turns: find the content, then its end-of-turn token."""
        start = full.find(content.strip(), search_from)
        if start < 0:
            raise UserError(
                "the chat template changes assistant text, so the loss mask cannot be computed; "
                "fix: use a model with a standard chat template, or set data.loss_on=all"
            )
        end = start + len(content.strip())
        rest = full[end:]
        for token in self._end_of_turn_strings():
            if rest.lstrip().startswith(token):
                end += (len(rest) - len(rest.lstrip())) + len(token)
                break
        return start, end

    def _end_of_turn_strings(self) -> list[str]:
        tokens = [self.tokenizer.eos_token] + list(getattr(self.tokenizer, "additional_special_tokens", None) or [])
        return [token for token in tokens if token]
