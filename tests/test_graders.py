"""OpenAI's graders (eval/graders): templates, string_check, text_similarity and multi, each score against one worked
out by hand (or given in OpenAI's guide), each failure against OpenAI's flag, each config mistake against the key
it names."""

from __future__ import annotations

import pytest

from tunesmith.errors import UserError
from tunesmith.eval.graders import Sample, run_grader, validate_grader
from tunesmith.eval.graders.templates import (
    TemplateError,
    check_template,
    item_problems,
    render_template,
    template_variables,
)


def string_check(operation: str, input: str = "{{ sample.output_text }}", reference: str = "{{ item.answer }}"):
    return {"type": "string_check", "name": "check", "input": input, "reference": reference, "operation": operation}


def similarity(metric: str, reference: str = "{{ item.answer }}") -> dict:
    return {
        "type": "text_similarity",
        "name": "similar",
        "input": "{{ sample.output_text }}",
        "reference": reference,
        "evaluation_metric": metric,
    }


def problems_of(spec) -> list[str]:
    """Each problem of `spec` as 'where: message'; [] for a valid grader."""
    try:
        validate_grader(spec)
    except UserError as error:
        return [str(problem) for problem in error.problems]
    return []


def failed_flags(grade) -> list[str]:
    return [flag for flag, value in grade.errors.items() if value is True]


# OpenAI's multigrader example (the guide's Multigrader section): the mean of a BLEU grader and a label check
OPENAI_MULTI = {
    "type": "multi",
    "name": "Example multigrader",
    "graders": {
        "similarity_score": {
            "type": "text_similarity",
            "name": "similarity grader",
            "input": "{{ sample.output_text }}",
            "reference": "{{ item.summary }}",
            "evaluation_metric": "bleu",
        },
        "label_checker": {
            "type": "string_check",
            "name": "label grader",
            "input": "{{ sample.output_text }}",
            "reference": "{{ item.label }}",
            "operation": "eq",
        },
    },
    "calculate_output": "(similarity_score + label_checker) / 2",
}


# --- templates


def test_template_variables_read_nested_paths_with_or_without_spaces():
    variables = template_variables(
        "A {{item.ground_truth.date}} B {{  item.choices[1].text  }} {{ sample.output_json.x.0 }}"
    )
    assert [(v.namespace, v.path) for v in variables] == [
        ("item", ("ground_truth", "date")),
        ("item", ("choices", 1, "text")),
        ("sample", ("output_json", "x", "0")),
    ]
    with pytest.raises(TemplateError, match="'items' is not a namespace"):
        template_variables("{{ items.answer }}")


def test_render_fills_nested_fields_and_writes_values_that_are_not_text_as_json():
    item = {"truth": {"date": "2024-05-01", "tags": ["a", "é"]}, "ok": True, "none": None, "score": 2.5, "rows": [[1]]}
    template = "{{ item.truth.date }}|{{ item.truth.tags }}|{{ item.ok }}|{{ item.none }}|{{ item.score }}|"
    template += "{{ item.rows[0][0] }}"
    assert render_template(template, Sample.of("x"), item) == '2024-05-01|["a", "é"]|true|null|2.5|1'
    reply = Sample.of('{"steps": [{"result": 42}], "answer": "Paris"}')
    assert render_template("{{sample.output_json.steps[0].result}} {{ sample.output_json.answer }}", reply, {}) == (
        "42 Paris"
    )
    assert render_template(r"a \1 {{ sample.output_text }}", Sample.of(r"\2"), {}) == r"a \1 \2"  # no regex escapes


def test_a_field_the_item_lacks_fails_that_sample_with_invalid_variable_error():
    grade = run_grader(string_check("eq", reference="{{ item.truth.date }}"), "2024", {"truth": {"day": 1}})
    assert grade.reward == 0.0 and failed_flags(grade) == ["invalid_variable_error"]
    assert "date" in grade.errors["invalid_variable_error_details"]
    assert (
        run_grader(string_check("eq", reference="{{ item.truth.date }}"), "2024", {"truth": {"date": "2024"}}).reward
        == 1.0
    )


def test_reading_output_json_of_a_reply_that_is_not_json_is_a_sample_parse_error():
    spec = string_check("eq", input="{{ sample.output_json.answer }}")
    assert run_grader(spec, '{"answer": "Paris"}', {"answer": "Paris"}).reward == 1.0
    grade = run_grader(spec, "Paris", {"answer": "Paris"})
    assert grade.reward == 0.0 and failed_flags(grade) == ["sample_parse_error"]


@pytest.mark.parametrize(
    ("template", "says"),
    [
        ("{{ itme.answer }}", "'itme' is not a namespace (did you mean 'item'?)"),
        ("{{ item }}", "is not a variable"),
        ("{{ item.answer | lower }}", "is not a variable"),
        ("{{ item.answer }", "never closed"),
        ("{{ sample.output }}", "no field 'output' (did you mean 'output_text'?)"),
        ("{{ sample.output_tools }}", "without output_tools"),
        ("{{ sample.output_text.answer }}", "has no fields"),
    ],
)
def test_check_template_names_the_bad_placeholder_and_the_fix(template, says):
    problems = check_template(template, "grader.input")
    assert len(problems) == 1 and problems[0].where == "grader.input"
    assert says in problems[0].message and "fix:" in problems[0].message


def test_item_problems_name_the_grader_key_the_variable_and_the_missing_field():
    problems = item_problems(OPENAI_MULTI, {"summary": "a summary"})
    assert [problem.where for problem in problems] == ["grader.graders.label_checker.reference"]
    assert "{{ item.label }}" in problems[0].message and "add 'label' to every row" in problems[0].message
    assert item_problems(OPENAI_MULTI, {"summary": "a summary", "label": "x"}) == []


# --- string_check


@pytest.mark.parametrize(
    ("operation", "reply", "answer", "score"),
    [
        ("eq", "Paris", "Paris", 1.0),
        ("eq", "paris", "Paris", 0.0),  # case-sensitive
        ("eq", "Paris.", "Paris", 0.0),
        ("ne", "London", "Paris", 1.0),
        ("ne", "Paris", "Paris", 0.0),
        ("like", "The capital is Paris.", "Paris", 1.0),  # contains, case-sensitive
        ("like", "The capital is paris.", "Paris", 0.0),
        ("ilike", "THE CAPITAL IS PARIS.", "Paris", 1.0),  # contains, ignoring case
        ("ilike", "The capital is Lyon.", "Paris", 0.0),
    ],
)
def test_string_check_operations_as_openai_defines_them(operation, reply, answer, score):
    assert run_grader(string_check(operation), reply, {"answer": answer}).reward == score


def test_string_check_problems_name_each_key_and_list_the_operations():
    spec = {"type": "string_check", "input": 3, "reference": "x", "operation": "contains", "refrence": "y"}
    problems = problems_of(spec)
    assert any(p.startswith("grader.name: is missing") for p in problems)
    assert any(p.startswith("grader.input: 3 is not a string") for p in problems)
    assert any(p.startswith("grader.operation: 'contains' is not one of eq, ne, like, ilike") for p in problems)
    assert any(p.startswith("grader.refrence: is not a known key (did you mean 'reference'?)") for p in problems)
    assert len(problems) == 4


# --- text_similarity


ITEM = {"answer": "the cat sat on a mat"}  # against the reply "the cat sat on the mat"
# n-gram matches of the reply against ITEM's answer (the second "the" is clipped): 5 of 6 unigrams, 3 of 5 bigrams,
# 2 of 4 trigrams, 1 of 3 4-grams; both have 6 tokens, so BLEU's brevity penalty is 1
BLEU_BY_HAND = (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** (1 / 4)


@pytest.mark.parametrize(
    ("metric", "reply", "expected"),
    [
        ("bleu", "the cat sat on the mat", BLEU_BY_HAND),
        ("gleu", "the cat sat on the mat", (5 + 3 + 2 + 1) / (6 + 5 + 4 + 3)),  # min(precision, recall) of all n-grams
        ("rouge_1", "the cat sat on the mat", 5 / 6),
        ("rouge_2", "the cat sat on the mat", 3 / 5),
        ("rouge_3", "the cat sat on the mat", 2 / 4),
        ("rouge_5", "the cat sat on the mat", 0.0),  # no 5-gram in common
        ("rouge_l", "the cat sat on the mat", 5 / 6),  # longest common subsequence: the cat sat on mat
        ("bleu", "the cat sat on a mat", 1.0),
        ("fuzzy_match", "the cat sat on a mat", 1.0),
    ],
)
def test_text_similarity_against_scores_worked_out_by_hand(metric, reply, expected):
    assert run_grader(similarity(metric), reply, ITEM).reward == pytest.approx(expected, abs=1e-9)


def test_fuzzy_match_is_rapidfuzz_ratio_of_the_whole_strings():
    # Indel similarity: 1 - (edits to turn one into the other: one insertion) / (14 + 15 characters)
    grade = run_grader(similarity("fuzzy_match"), "this is a test!", {"answer": "this is a test"})
    assert grade.reward == pytest.approx(28 / 29)
    assert run_grader(similarity("fuzzy_match"), "THIS IS A TEST", {"answer": "this is a test"}).reward < 0.5


def test_bleu_scores_a_reply_shorter_than_four_words_on_the_orders_it_has():
    assert run_grader(similarity("bleu"), "Paris", {"answer": "Paris"}).reward == 1.0
    assert run_grader(similarity("bleu"), "", {"answer": "Paris"}).reward == 0.0


def test_meteor_matches_exact_words_and_stems_but_no_synonyms():
    def meteor(reply: str) -> float:
        return run_grader(similarity("meteor"), reply, {"answer": "the cat sat"}).reward

    # every word matched in one chunk: F = 1, fragmentation penalty 0.5 * (1 chunk / 3 matches) ^ 3
    assert meteor("the cat sat") == pytest.approx(1 - 0.5 / 27)
    assert meteor("The cats sat") == pytest.approx(1 - 0.5 / 27)  # lower case, and Porter stems: cats -> cat
    # feline is cat's synonym in WordNet, which tunesmith does not use: 2 of 3 words match, in 2 chunks
    assert meteor("the feline sat") == pytest.approx(2 / 3 * (1 - 0.5 * (2 / 2) ** 3))


def test_rouge_scores_words_of_any_script():
    assert run_grader(similarity("rouge_l"), "Кот сидел на ковре", {"answer": "кот сидел на ковре"}).reward == 1.0
    assert run_grader(similarity("rouge_1"), "Кот сидел", {"answer": "кот спал"}).reward == pytest.approx(0.5)


def test_cosine_is_refused_at_check_time_and_fails_unchecked():
    problems = problems_of(similarity("cosine"))
    assert len(problems) == 1 and problems[0].startswith("grader.evaluation_metric: cosine needs an embedding model")
    assert "fuzzy_match" in problems[0]
    grade = run_grader(similarity("cosine"), "the cat", {"answer": "the cat"})
    assert grade.reward == 0.0 and failed_flags(grade) == ["other_error"]


def test_text_similarity_problems_name_the_metric_and_the_threshold():
    spec = {**similarity("rouge-l"), "pass_threshold": "high"}
    problems = problems_of(spec)
    assert any("grader.evaluation_metric: 'rouge-l' is not one of" in p and "rouge_l" in p for p in problems)
    assert any(p.startswith("grader.pass_threshold: 'high' is not a number") for p in problems)
    assert problems_of({**similarity("rouge_l"), "pass_threshold": 0.5}) == []


# --- multi


def test_openai_multigrader_example_averages_its_graders_and_records_each():
    grade = run_grader(OPENAI_MULTI, "Paris", {"summary": "Paris", "label": "London"})
    assert grade.sub_rewards == {"similarity_score": 1.0, "label_checker": 0.0}
    assert grade.reward == 0.5 and failed_flags(grade) == []
    assert grade.response()["metadata"]["scores"] == {"similarity_score": 1.0, "label_checker": 0.0}
    assert run_grader(OPENAI_MULTI, "Paris", {"summary": "Paris", "label": "Paris"}).reward == 1.0


def test_a_single_grader_in_graders_is_named_by_its_own_name():
    spec = {"type": "multi", "name": "one", "graders": string_check("eq"), "calculate_output": "2 * check - 1"}
    assert problems_of(spec) == []
    grade = run_grader(spec, "Paris", {"answer": "London"})
    assert grade.sub_rewards == {"check": 0.0} and grade.reward == -1.0


@pytest.mark.parametrize(
    ("formula", "expected"),
    [
        ("a ^ 2 + b ^ 2", 0.25 + 1.0),  # ^ is power, above + as in arithmetic
        ("2 ^ 3 ^ 2", 512.0),  # and right-associative
        ("a ** 2", 0.25),
        ("-a ^ 2", -0.25),
        ("min(a, b, 0.3) + max(a, b)", 0.3 + 1.0),
        ("abs(a - b) + floor(2.7) + ceil(0.2)", 0.5 + 2 + 1),
        ("exp(log(a)) + sqrt(0.25)", 0.5 + 0.5),
        ("log(exp(2))", 2.0),  # natural logarithm
    ],
)
def test_calculate_output_operators_and_functions(formula, expected):
    # a = 0.5 (fuzzy_match of "xz" against "xy": 1 - 2 edits / 4 characters), b = 1.0 (eq)
    graders = {"a": similarity("fuzzy_match", reference="xy"), "b": string_check("eq")}
    spec = {"type": "multi", "name": "m", "graders": graders, "calculate_output": formula}
    assert problems_of(spec) == []
    grade = run_grader(spec, "xz", {"answer": "xz"})
    assert grade.sub_rewards == {"a": 0.5, "b": 1.0}
    assert grade.reward == pytest.approx(expected)


@pytest.mark.parametrize(
    ("formula", "says"),
    [
        ("a.__class__", "'a.__class__' is not allowed"),
        ("__import__('os').system('touch pwned')", "calls what a formula cannot"),
        ("open('x')", "calls what a formula cannot"),
        ("a(1)", "calls what a formula cannot"),
        ("[a, b][0]", "is not allowed"),
        ("a if b else 1", "is not allowed"),
        ("a > b", "is not allowed"),
        ("a % 2", "is not allowed"),
        ("'text'", "is not allowed"),
        ("c + a", "'c' is not one of the graders (a, b)"),
        ("min + a", "'min' is a function"),
        ("sqrt(a, b)", "sqrt takes 1 argument, not 2"),
        ("max(*a)", "names or unpacks its arguments"),
        ("(a + b", "does not parse"),
        ("", "does not parse"),
    ],
)
def test_formula_outside_the_language_is_refused_at_check_time(formula, says):
    spec = {**OPENAI_MULTI, "graders": {"a": string_check("eq"), "b": string_check("ne")}, "calculate_output": formula}
    problems = problems_of(spec)
    assert len(problems) == 1 and problems[0].startswith("grader.calculate_output: ")
    assert says in problems[0] and "fix:" in problems[0]


def test_an_unchecked_formula_is_never_run_and_fails_with_formula_parse_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = {**OPENAI_MULTI, "calculate_output": "label_checker + __import__('os').system('touch pwned')"}
    grade = run_grader(spec, "Paris", {"summary": "Paris", "label": "Paris"})
    assert grade.reward == 0.0 and failed_flags(grade) == ["formula_parse_error"]
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("formula", ["label_checker / (label_checker - 1)", "sqrt(-1)", "log(0)", "(-8) ^ (1 / 3)",
                                     "exp(1000)", "9 ^ 9 ^ 9", "1e308 * 10"])  # fmt: skip
def test_a_formula_without_a_value_for_this_sample_fails_it_with_other_error(formula):
    grade = run_grader({**OPENAI_MULTI, "calculate_output": formula}, "Paris", {"summary": "Paris", "label": "Paris"})
    assert grade.reward == 0.0 and failed_flags(grade) == ["other_error"]
    assert grade.sub_rewards == {"similarity_score": 1.0, "label_checker": 1.0}  # what the graders scored is kept


def test_multi_checks_each_grader_under_its_own_key():
    spec = {
        **OPENAI_MULTI,
        "graders": {
            "label_checker": {**OPENAI_MULTI["graders"]["label_checker"], "operation": "equals"},
            "judge": {"type": "scorer", "name": "j"},
            "inner": {**OPENAI_MULTI, "name": "inner"},
            "broken": "eq",
        },
        "calculate_output": "label_checker + judge + inner + broken",
    }
    problems = problems_of(spec)
    assert any(p.startswith("grader.graders.label_checker.operation: 'equals' is not one of") for p in problems)
    assert any(
        p.startswith("grader.graders.judge.type") and "'scorer' is not a known grader type" in p for p in problems
    )
    assert any(p.startswith("grader.graders.inner.type: a multi grader's graders cannot be multi") for p in problems)
    assert any(p.startswith("grader.graders.broken: 'eq' is not an object") for p in problems)
    assert len(problems) == 4


def test_a_grader_named_with_a_hyphen_gets_a_rename_hint():
    spec = {**OPENAI_MULTI, "graders": {"label-checker": string_check("eq")}, "calculate_output": "label-checker"}
    problems = problems_of(spec)
    assert problems and all(p.startswith("grader.calculate_output:") and "rename" in p for p in problems)


def test_a_failing_grader_fails_the_multi_grader_with_its_flag():
    grade = run_grader(OPENAI_MULTI, "Paris", {"summary": "Paris"})  # no label
    assert grade.reward == 0.0 and failed_flags(grade) == ["invalid_variable_error"]
    assert grade.sub_rewards == {"similarity_score": 1.0}


# --- validate_grader


def test_validate_grader_names_the_key_at_fault():
    assert problems_of(["string_check"]) == [
        "grader: ['string_check'] is not an object; fix: give a JSON object with a 'type'"
    ]
    with pytest.raises(
        UserError, match=r"grader.type = 'string_chek' is not a known grader type \(did you mean 'string_check'\?\)"
    ):
        validate_grader({"type": "string_chek"})
    assert problems_of({**OPENAI_MULTI, "calculate_output": 3}) == [
        "grader.calculate_output: 3 is not a formula; fix: give text"
    ]
