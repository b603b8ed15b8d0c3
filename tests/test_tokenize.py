"""Loss masks: exactly the assistant turns (every one of them) and their end-of-turn token, under any template."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tokenizer

from tunesmith.data.packing import IGNORE, collate, epoch_rows, even_pieces, pack_rows
from tunesmith.data.tokenize import ChatTokenizer, TokenizedExample
from tunesmith.errors import UserError
from tunesmith.models import load_tokenizer

DIALOGUE = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hello there"},
    {"role": "assistant", "content": "hi, how are you?"},
    {"role": "user", "content": "my card has not arrived"},
    {"role": "assistant", "content": "card_arrival"},
]


def trained_text(chat: ChatTokenizer, messages) -> str:
    example = chat.tokenize_chat(messages)
    return chat.tokenizer.decode([t for t, keep in zip(example.input_ids, example.loss_mask) if keep])


@pytest.mark.parametrize("fixture, end", [("tiny_model", "<|im_end|>"), ("tiny_llama3_model", "<|eot_id|>")])
def test_every_assistant_turn_and_its_end_token_are_trained(request, fixture, end):
    chat = ChatTokenizer(load_tokenizer(str(request.getfixturevalue(fixture))))
    assert trained_text(chat, DIALOGUE) == f"hi, how are you?{end}card_arrival{end}"


def test_loss_on_all_trains_every_token(tiny_model):
    chat = ChatTokenizer(load_tokenizer(str(tiny_model)), loss_on="all")
    example = chat.tokenize_chat(DIALOGUE)
    assert all(example.loss_mask)


def test_system_prompt_is_added_only_when_missing(tiny_model):
    chat = ChatTokenizer(load_tokenizer(str(tiny_model)), system_prompt="Name the intent.")
    with_prompt = chat.tokenizer.decode(chat.tokenize_chat(DIALOGUE[1:]).input_ids)
    assert "Name the intent." in with_prompt and "You are helpful." not in with_prompt
    kept = chat.tokenizer.decode(chat.tokenize_chat(DIALOGUE).input_ids)
    assert "Be brief." in kept and "Name the intent." not in kept


def test_template_that_rewrites_earlier_turns_falls_back_to_search():
    """A template whose header counts the turns: no rendering of a prefix is a prefix of the whole."""
    counting = (
        "{{ '<|begin_of_text|>' + (messages | length | string) }}{% for m in messages %}"
        "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>' + m['content'] + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>' }}{% endif %}"
    )
    chat = ChatTokenizer(build_tokenizer(counting, "<|eot_id|>"))
    assert trained_text(chat, DIALOGUE) == "hi, how are you?<|eot_id|>card_arrival<|eot_id|>"


def test_template_without_end_of_turn_gets_a_trained_eos():
    bare = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    chat = ChatTokenizer(build_tokenizer(bare, "<|endoftext|>"))
    example = chat.tokenize_chat(DIALOGUE)
    assert example.input_ids[-1] == chat.tokenizer.eos_token_id and example.loss_mask[-1]


def test_real_default_model_template_masks(tmp_path):
    """The real SmolLM2 tokenizer when it is cached on this machine (it is after the first `models pull`)."""
    from pathlib import Path

    cached = Path.home() / ".tunesmith" / "models" / "smollm2-135m-instruct"
    if not (cached / "tokenizer.json").is_file():
        pytest.skip("default model not pulled on this machine")
    chat = ChatTokenizer(load_tokenizer(str(cached)))
    assert trained_text(chat, DIALOGUE) == "hi, how are you?<|im_end|>card_arrival<|im_end|>"


def test_targets_never_cross_example_boundaries():
    first = TokenizedExample([1, 2, 3], [False, True, True])
    second = TokenizedExample([4, 5], [True, True])
    batch = collate([first, second])
    # 3 -> 4 would be a cross-example target; the first token of an example is never a target.
    assert batch.targets.tolist() == [[2, 3, IGNORE, 5, IGNORE]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1]]
    assert batch.segment_lengths == (3, 2) and batch.num_tokens == 5 and batch.num_loss_tokens == 3
    assert batch.example_index().tolist() == [0, 0, 0, 1, 1]


def test_packing_fills_rows_and_keeps_every_example_once():
    lengths = [30, 10, 25, 5, 40, 8, 17, 33, 2, 50]
    rows = pack_rows(lengths, capacity=64, order=list(range(len(lengths))))
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    assert len(rows) == -(-sum(lengths) // 64)  # as few rows as the tokens need
    assert epoch_rows(lengths, 64, True, seed=3, epoch=1) == epoch_rows(lengths, 64, True, seed=3, epoch=1)
    assert epoch_rows(lengths, 64, True, seed=3, epoch=1) != epoch_rows(lengths, 64, True, seed=3, epoch=2)


def every_split(lengths: list[int]):
    """Every way to cut `lengths` into consecutive non-empty runs."""
    if not lengths:
        yield []
        return
    for first in range(1, len(lengths) + 1):
        for rest in every_split(lengths[first:]):
            yield [lengths[:first], *rest]


@pytest.mark.parametrize("seed", range(40))
def test_token_budget_pieces_are_the_fewest_and_the_most_even(seed):
    """Against every possible cut: no cut within the budget has fewer pieces, and none with as few has a smaller
    largest piece; every unit is kept once, in order, and only a unit over the budget by itself exceeds it."""
    import random

    rng = random.Random(seed)
    lengths = [rng.choice([rng.randint(1, 40), rng.randint(40, 130)]) for _ in range(rng.randint(1, 9))]
    budget = rng.choice([32, 64, 100, 128])
    units = [TokenizedExample(list(range(length)), [True] * length) for length in lengths]
    pieces = [[len(unit) for unit in piece] for piece in even_pieces(units, budget)]
    assert [length for piece in pieces for length in piece] == lengths
    assert all(sum(piece) <= budget or len(piece) == 1 for piece in pieces)
    allowed = [split for split in every_split(lengths) if all(sum(p) <= budget or len(p) == 1 for p in split)]
    fewest = min(len(split) for split in allowed)
    assert len(pieces) == fewest

    def largest(split):  # the largest piece within the budget (a unit over it is a piece alone in every cut)
        return max([sum(piece) for piece in split if sum(piece) <= budget], default=0)

    assert largest(pieces) == min(largest(split) for split in allowed if len(split) == fewest)


def test_flat_batch_computes_what_each_example_computes_alone(tiny_model):
    """Attention never crosses examples in the flat layout: logits equal each example run by itself."""
    from tunesmith.engine.forward import hidden_states
    from tunesmith.models import load_model

    model, _ = load_model(str(tiny_model))
    examples = [
        TokenizedExample([5, 6, 7], [True] * 3),
        TokenizedExample([9], [True]),
        TokenizedExample([5, 6, 7, 8, 9, 10], [True] * 6),
    ]
    with torch.no_grad():
        together = hidden_states(model, collate(examples))[0]
        apart = torch.cat([hidden_states(model, collate([example]))[0] for example in examples])
        # Plain transformers on one example (no segments) agrees too: the single-example path is ordinary SDPA.
        plain = model.model(input_ids=torch.tensor([[5, 6, 7, 8, 9, 10]])).last_hidden_state[0]
    torch.testing.assert_close(together, apart, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(together[4:], plain, rtol=1e-5, atol=1e-5)
    # Without segments the same row attends across examples, so the equality above is the segments' doing.
    with torch.no_grad():
        batch = collate(examples)
        crossed = model.model(input_ids=batch.input_ids, position_ids=batch.position_ids).last_hidden_state[0]
    assert not torch.allclose(crossed[4:], together[4:], atol=1e-3)


def test_flat_batch_gradients_match_separate_examples(tiny_model):
    from tunesmith.models import load_model
    from tunesmith.train.loss import token_loss_sum

    model, _ = load_model(str(tiny_model))
    examples = [TokenizedExample([5, 6, 7, 8], [False, True, True, True]), TokenizedExample([11, 12, 13], [True] * 3)]
    token_loss_sum(model, collate(examples)).backward()
    together = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for example in examples:
        token_loss_sum(model, collate([example])).backward()
    for a, b in zip(together, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# A Qwen3-style template: the last assistant turn's thoughts (reasoning_content) in a <think> block, an empty block
# when it has none, and enable_thinking=False putting the empty block into the generation prompt.
THINKING = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% if loop.last %}"
    "{{ '<think>\n' + (message.reasoning_content or '') + '\n</think>\n\n' }}{% endif %}"
    "{{ message['content'] + '<|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{% endif %}"
)
THOUGHT = [
    {"role": "user", "content": "my card has not arrived"},
    {"role": "assistant", "content": "card_arrival", "reasoning": "the card is late"},
]


@pytest.mark.parametrize(
    "policy, rendered, trained",
    [
        ("keep", "the card is late", "<think>\nthe card is late\n</think>\n\ncard_arrival<|im_end|>"),
        ("mask", "the card is late", "card_arrival<|im_end|>"),
        ("drop", None, "card_arrival<|im_end|>"),
    ],
)
def test_reasoning_is_rendered_in_the_thinking_block_and_trained_as_the_policy_says(policy, rendered, trained):
    chat = ChatTokenizer(build_tokenizer(THINKING, "<|im_end|>"), reasoning=policy)
    example = chat.tokenize_chat(THOUGHT)
    text = chat.tokenizer.decode(example.input_ids)
    assert (rendered is not None and rendered in text) or (rendered is None and "the card is late" not in text)
    assert trained_text(chat, THOUGHT).strip() == trained


def test_a_turn_without_thoughts_trains_its_reply_not_the_empty_thinking_block_so_thinking_mode_survives():
    """Qwen3 renders a reply without thoughts after an empty <think></think>. That block is what the template puts
    in the prompt with thinking switched off, so it stays context: training on it would teach the model to skip
    thinking in thinking mode. What the model reads before the reply is the non-thinking generation prompt."""
    tokenizer = build_tokenizer(THINKING, "<|im_end|>")
    chat = ChatTokenizer(tokenizer)
    plain = [THOUGHT[0], {"role": "assistant", "content": "card_arrival"}]
    example = chat.tokenize_chat(plain)
    first = example.loss_mask.index(True)
    non_thinking = tokenizer.apply_chat_template(
        plain[:1], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert tokenizer.decode(example.input_ids[:first]) == non_thinking
    assert trained_text(chat, plain) == "card_arrival<|im_end|>"


def test_reasoning_under_a_template_without_a_thinking_block_is_refused_with_the_fix(tiny_model):
    chat = ChatTokenizer(load_tokenizer(str(tiny_model)))
    with pytest.raises(UserError, match="no thinking block .* fix: set data.reasoning: drop"):
        chat.tokenize_chat(THOUGHT)
    dropped = ChatTokenizer(load_tokenizer(str(tiny_model)), reasoning="drop")
    assert trained_text(dropped, THOUGHT).startswith("card_arrival")


@pytest.mark.parametrize(
    "turn, problem",
    [
        ({"role": "user", "content": "x", "reasoning": "y"}, "only assistant turns have reasoning"),
        ({"role": "assistant", "content": "x", "reasoning": "y", "reasoning_content": "z"}, "fix: keep one"),
        ({"role": "assistant", "content": "x", "reasoning_content": 3}, "reasoning_content must be a string"),
    ],
)
def test_reasoning_fields_are_checked_per_turn(turn, problem):
    from tunesmith.data.formats import RowError, check_messages

    with pytest.raises(RowError, match=problem):
        check_messages([{"role": "user", "content": "q"}, turn] if turn["role"] == "assistant" else [turn])
    assert check_messages(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning_content": "t"}]
    )[1] == {"role": "assistant", "content": "a", "reasoning": "t"}
