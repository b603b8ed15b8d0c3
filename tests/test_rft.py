"""Method rft: GRPO whose reward is an OpenAI grader (rft.grader), end to end on a tiny model; its mistakes reported
before any compute."""

from __future__ import annotations

import json

import pytest
from test_rl import LEARNS_IN_8_STEPS, PROMPTS, records, rl_config
from test_training import run

from tunesmith.config.loading import load_config
from tunesmith.errors import UserError

SPACES = {
    "type": "text_similarity",
    "name": "spaces",
    "input": "{{ sample.output_text }}",
    "reference": " " * 12,
    "evaluation_metric": "fuzzy_match",
}
ANSWER = {
    "type": "string_check",
    "name": "answer",
    "input": "{{ sample.output_text }}",
    "reference": "{{ item.answer }}",
    "operation": "like",
}
MULTI = {
    "type": "multi",
    "name": "both",
    "graders": {"spaces": SPACES, "answer": ANSWER},
    "calculate_output": "spaces + 0.1 * answer",
}


def grader(spec: dict) -> str:
    return f"rft.grader={json.dumps(spec)}"


def test_rft_learns_what_its_grader_rewards_and_logs_each_sub_grader(tmp_path, tiny_model):
    config = rl_config(
        tmp_path,
        tiny_model,
        "method=rft",
        grader(MULTI),
        *LEARNS_IN_8_STEPS,
    )
    run(config)
    steps = [line for line in records(config.output_dir) if "reward" in line]
    assert len(steps) == 8
    for step in steps:
        assert step["reward"] == pytest.approx(step["reward_grader"])
        assert step["reward_grader"] == pytest.approx(step["reward_grader_spaces"] + 0.1 * step["reward_grader_answer"])
        assert step["reward_grader_failed"] == 0.0
    first, last = [step["reward"] for step in steps[:2]], [step["reward"] for step in steps[-2:]]
    assert sum(last) / 2 > sum(first) / 2 + 0.1, [step["reward"] for step in steps]


def test_rft_mistakes_are_reported_before_any_compute(tmp_path, tiny_model):
    with pytest.raises(UserError) as refused:
        rl_config(tmp_path, tiny_model, "method=rft")
    assert "rft.grader: method rft learns from a grader's scores, and none is set" in str(refused.value)
    with pytest.raises(UserError) as refused:
        rl_config(tmp_path, tiny_model, "method=grpo", "rl.reward_functions=[number_match]", grader(ANSWER))
    assert "rft.grader: only method rft grades its replies" in str(refused.value)
    bad = {**MULTI, "calculate_output": "spaces + missing"}
    with pytest.raises(UserError) as refused:
        rl_config(tmp_path, tiny_model, "method=rft", grader(bad))
    assert "rft.grader.calculate_output" in str(refused.value) and "missing" in str(refused.value)


def test_a_config_file_locates_grader_problems_at_their_line(tmp_path):
    path = tmp_path / "rft.yaml"
    path.write_text(
        "method: rft\ndata: {train: rows.jsonl}\nrft:\n  grader:\n    type: string_check\n    name: exact\n"
        "    input: '{{ sample.output_text }}'\n    reference: '{{ item.answer }}'\n    operation: equals\n"
    )
    with pytest.raises(UserError) as refused:
        load_config(path)
    assert any(p.where == f"{path}:9" and "rft.grader.operation" in p.message for p in refused.value.problems)


def test_rows_without_a_field_the_grader_reads_are_refused_at_their_line(tmp_path, tiny_model):
    rows = PROMPTS[:3] + [{"prompt": "no answer here"}]
    config = rl_config(tmp_path, tiny_model, "method=rft", grader(ANSWER), "train.max_steps=1", rows=rows)
    with pytest.raises(UserError) as refused:
        run(config)
    assert "reads the field 'answer'" in str(refused.value) and ":4" in str(refused.value)


def test_the_gsm8k_graders_tell_format_from_answer():
    """The shipped gsm8k graders: strict needs "#### N", lenient any last number; the rft examples train with the
    strict file's grader (one grader, not copies that drift)."""
    from pathlib import Path

    from tunesmith.eval.graders import run_grader
    from tunesmith.eval.graders.batch import load_grader

    examples = Path(__file__).resolve().parents[1] / "examples"
    strict, lenient = (load_grader(examples / "graders" / f"gsm8k-{name}.yaml") for name in ("strict", "lenient"))
    item = {"output": "2 + 3 = 5 apples in all\n#### 1,205"}
    replies = {"so #### 1205": (1.0, 1.0), "the answer is 1,205.": (0.0, 1.0), "#### 12 then 1205": (0.0, 1.0)}
    replies |= {"#### 1206": (0.0, 0.0), "no number": (0.0, 0.0)}
    for reply, (want_strict, want_lenient) in replies.items():
        assert run_grader(strict, reply, item).reward == want_strict, reply
        assert run_grader(lenient, reply, item).reward == want_lenient, reply
    for config in ("gsm8k-rft.yaml", "gsm8k-rft-after-sft.yaml"):
        assert load_config(examples / config).rft.grader == strict, config
