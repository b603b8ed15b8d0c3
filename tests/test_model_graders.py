"""label_model and score_model with a local judge (eval/graders/model.py), on a tiny model built in code."""

from __future__ import annotations

import pytest

from tunesmith.errors import UserError
from tunesmith.eval.graders import Context, GraderFailure, Sample, run_grader, validate_grader
from tunesmith.eval.graders.model import read_score, rendered_messages

LABELS = ["A", "B", "C", "D"]


def label_grader(model, passing):
    return {
        "type": "label_model",
        "name": "verdict",
        "model": str(model),
        "input": [
            {"role": "developer", "content": "Answer with one letter."},
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "Q: {{ item.question }} A: "},
                    {"type": "input_text", "text": "{{ sample.output_text }}"},
                ],
            },
        ],
        "labels": LABELS,
        "passing_labels": passing,
    }


def score_grader(model, bounds, content):
    return {
        "type": "score_model",
        "name": "s",
        "model": str(model),
        "range": bounds,
        "input": [{"role": "user", "content": content}],
    }


def test_label_model_answers_the_judges_most_likely_label(tiny_model):
    from tunesmith.engine.generation import Engine

    context = Context()
    engine = context.judges[str(tiny_model)] = Engine.load(str(tiny_model))
    spec = label_grader(tiny_model, ["A"])
    validate_grader(spec)
    item, sample = {"question": "two and two"}, Sample("four")
    conversation = rendered_messages(spec, sample, item)
    assert conversation[0] == {"role": "system", "content": "Answer with one letter."}
    assert conversation[1]["content"] == "Q: two and two A: four"
    # each label is one token and the end of the turn: the judge's choice is its most likely first token
    first_tokens = [engine.reply_ids(label)[0] for label in LABELS]
    chosen = LABELS[int(engine.next_token_logprobs([conversation], first_tokens)[0].argmax())]
    for passing in (["A"], ["B", "C"], LABELS):
        grade = run_grader(label_grader(tiny_model, passing), "four", item, context)
        assert not any(value is True for value in grade.errors.values())
        assert grade.reward == float(chosen in passing)


def test_score_model_reads_the_judges_reply_or_fails_that_sample(tiny_model):
    from tunesmith.engine.generation import Engine

    context = Context()
    engine = context.judges[str(tiny_model)] = Engine.load(str(tiny_model))
    spec = score_grader(tiny_model, [0, 10], "Rate 0 to 10: {{ sample.output_text }}")
    validate_grader(spec)
    [reply] = engine.generate([rendered_messages(spec, Sample("hello"), {})])
    grade = run_grader(spec, "hello", {}, context)
    try:
        expected = read_score(reply, 0, 10)
    except GraderFailure as failure:
        assert grade.reward == 0.0 and grade.errors[failure.flag] is True
    else:
        assert grade.reward == expected


@pytest.mark.parametrize(
    "reply, score",
    [("0.8", 0.8), ('{"result": 0.25, "steps": []}', 0.25), ('{"score": 1}', 1.0), ("I give it .5 of 1", 0.5)],
)
def test_a_score_is_read_from_json_or_the_first_number(reply, score):
    assert read_score(reply, 0, 1) == score


@pytest.mark.parametrize("reply", ["great answer", "1.5", '{"result": "high"}', "nan"])
def test_a_reply_without_a_score_in_range_fails_to_parse(reply):
    with pytest.raises(GraderFailure) as failed:
        read_score(reply, 0, 1)
    assert failed.value.flag == "model_grader_parse_error"


def test_model_graders_are_checked_before_any_sample(tiny_model):
    spec = label_grader(tiny_model, ["E"])
    spec["model"] = "gpt-4o-2024-08-06"
    spec["input"][1]["content"].append({"type": "input_image", "image_url": "https://example.com/x.png"})
    with pytest.raises(UserError) as refused:
        validate_grader(spec)
    where = {problem.where for problem in refused.value.problems}
    assert {"grader.model", "grader.passing_labels", "grader.input[1].content[2].type"} <= where
    scored = {**score_grader(tiny_model, [1, 0], "x"), "sampling_params": {"reasoning_effort": "high"}}
    with pytest.raises(UserError) as refused:
        validate_grader(scored)
    assert {p.where for p in refused.value.problems} == {"grader.range", "grader.sampling_params.reasoning_effort"}
