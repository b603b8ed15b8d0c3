"""Graders through the official openai SDK (POST /v1/fine_tuning/alpha/graders/run and /validate) and through
`tunesmith grade`: the same graders, the same failures, reported where the user looks."""

from __future__ import annotations

import json

import pytest
from service_fixtures import live_app, make_key, write_rows

from tunesmith.cli import main

openai = pytest.importorskip("openai")

EXACT = {
    "type": "string_check",
    "name": "exact",
    "input": "{{ sample.output_text }}",
    "reference": "{{ item.answer }}",
    "operation": "eq",
}
CRASHES = {"type": "python", "name": "crashes", "source": "def grade(sample, item):\n    return 1 / 0\n"}


@pytest.fixture()
def site(tmp_path, tiny_model):
    from tunesmith.serve.service import Service, Settings

    service = Service(Settings(home=tmp_path / "home", base_models={"tiny": str(tiny_model)}))
    keys = {scope: make_key(service, "acme", scope) for scope in ("read", "write")}
    with live_app(service, worker=False) as base_url:
        yield {scope: openai.OpenAI(base_url=base_url, api_key=key, max_retries=0) for scope, key in keys.items()}
    service.store.close()


def test_the_sdk_runs_and_validates_graders(site):
    graders = site["write"].fine_tuning.alpha.graders
    assert graders.validate(grader=EXACT).grader.name == "exact"
    assert graders.run(grader=EXACT, model_sample="42", item={"answer": "42"}).reward == 1.0
    assert graders.run(grader=EXACT, model_sample="41", item={"answer": "42"}).reward == 0.0

    both = {"type": "multi", "name": "both", "graders": {"exact": EXACT, "crash": CRASHES}, "calculate_output": "exact"}
    crashed = graders.run(grader=CRASHES, model_sample="42", item={})
    assert crashed.reward == 0.0 and crashed.metadata.errors.python_grader_runtime_error
    assert "ZeroDivisionError" in crashed.metadata.errors.python_grader_runtime_error_details
    assert graders.validate(grader=both).grader.type == "multi"


def test_a_bad_grader_is_a_400_naming_its_field_and_running_code_needs_write(site):
    graders = site["write"].fine_tuning.alpha.graders
    unknown = {"type": "multi", "name": "m", "graders": {"exact": EXACT}, "calculate_output": "exact + missing"}
    with pytest.raises(openai.BadRequestError) as refused:
        graders.validate(grader=unknown)
    assert "missing" in refused.value.message and refused.value.body["param"].startswith("grader")
    broken = {"type": "python", "name": "p", "source": "def grade(sample, item)\n    return 1\n"}
    with pytest.raises(openai.BadRequestError) as refused:
        graders.validate(grader=broken)
    assert "line 1" in refused.value.message
    with pytest.raises(openai.PermissionDeniedError):
        site["read"].fine_tuning.alpha.graders.run(grader=EXACT, model_sample="42", item={"answer": "42"})


def test_grade_command_scores_a_file_with_an_interval(tmp_path, capsys):
    grader = tmp_path / "grader.json"
    grader.write_text(json.dumps(EXACT))
    rows = write_rows(tmp_path / "rows.jsonl", [{"answer": "42", "sample": s} for s in ("42", "42", "7", "42")])
    assert main(["grade", str(grader), str(rows), "--output", str(tmp_path / "grades.jsonl")]) == 0
    printed = capsys.readouterr().out
    assert "graded 4 samples" in printed and "reward: 0.7500 (95% CI" in printed
    grades = [json.loads(line) for line in (tmp_path / "grades.jsonl").read_text().splitlines()]
    assert [grade["reward"] for grade in grades] == [1.0, 1.0, 0.0, 1.0] and grades[2]["line"] == 3


def test_grade_command_locates_every_problem_before_grading(tmp_path, capsys):
    grader = tmp_path / "grader.yaml"
    grader.write_text(
        "type: string_check\nname: exact\ninput: '{{ sample.output_text }}'\nreference: x\noperation: equals\n"
    )
    rows = write_rows(tmp_path / "rows.jsonl", [{"sample": "a"}])
    assert main(["grade", str(grader), str(rows)]) == 2
    assert f"{grader}:5: grader.operation" in capsys.readouterr().err
    grader.write_text(json.dumps(EXACT))
    rows = write_rows(tmp_path / "rows.jsonl", [{"answer": "1", "sample": "1"}, {"answer": "2"}, {"sample": "3"}])
    assert main(["grade", str(grader), str(rows)]) == 2
    error = capsys.readouterr().err
    assert f"{rows}:2: 'sample' is missing" in error
    assert f"{rows}:3: grader.reference" in error and "answer" in error
