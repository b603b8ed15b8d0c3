"""Evaluation tasks and baselines end to end on a tiny trained run: eval.json has the contract's shape."""

from __future__ import annotations

import dataclasses
import json

import pytest
from conftest import write_config_file, write_jsonl

from tunesmith.cli import main
from tunesmith.data.formats import convert_classification, convert_messages
from tunesmith.errors import UserError
from tunesmith.eval.baselines import few_shot_prefix, parse_baseline
from tunesmith.eval.evaluate import EvalOptions, evaluate, format_summary
from tunesmith.eval.tasks import parse_number, with_prefix

LABELS = ["card_arrival", "lost_or_stolen_phone", "cancel_transfer", "fee"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model):
    tmp_path = tmp_path_factory.mktemp("eval-run")
    rows = [{"text": f"question {i} about {label}", "label": label} for i in range(6) for label in LABELS]
    config = write_config_file(tmp_path, tiny_model, rows, "epochs: 2, batch_size: 4, progress: false, lr: 1.0e-2")
    assert main(["train", str(config)]) == 0
    return tmp_path / "run"


def evaluate_task(run_dir, tmp_path, task, rows, **options):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(tmp_path / f"{task}.jsonl", rows)
    return evaluate(
        str(run_dir), data, EvalOptions(task=task, resamples=50, max_new_tokens=8, **options), tmp_path / task
    )


def test_classification_with_baselines_fills_the_contract(run_dir, tmp_path):
    rows = [{"text": f"question {i} about {label}", "label": label} for i in range(2) for label in LABELS]
    result = evaluate_task(run_dir, tmp_path, "classification", rows, baselines=("base", "few-shot:2"))
    assert result["task"] == "classification" and result["n"] == 8
    for name in ("accuracy", "macro_f1", "micro_f1", "weighted_f1"):
        metric = result["metrics"][name]
        assert set(metric) == {"value", "ci95", "n"} and metric["ci95"][0] <= metric["value"] <= metric["ci95"][1]
    assert set(result["baselines"]) == {"base", "few-shot:2"}
    assert {"diff", "ci95"} <= set(result["comparisons"]["base"]["accuracy"]) and "mcnemar_p" in result["comparisons"][
        "base"
    ]
    assert set(result["per_label"]) >= set(LABELS) and len(result["confusion"]["matrix"]) >= len(LABELS)
    assert all(row["predicted"] in LABELS for row in result["examples"]), "constrained decoding keeps to the label set"
    assert all(row["baselines"]["few-shot:2"]["predicted"] in LABELS for row in result["examples"])
    on_disk = json.loads((tmp_path / "classification" / "eval.json").read_text())
    assert on_disk["metrics"] == result["metrics"] and (tmp_path / "classification" / "report.html").is_file()


def test_loglik_ranking_picks_the_most_likely_label(run_dir, tmp_path):
    from tunesmith.engine.generation import Engine

    rows = [{"text": f"question 0 about {label}", "label": label} for label in LABELS]
    ranked = evaluate_task(run_dir, tmp_path, "classification", rows, method="loglik")
    engine = Engine.load(str(run_dir))
    for row, example in zip(rows, ranked["examples"]):
        conversations = [
            [{"role": "user", "content": row["text"]}, {"role": "assistant", "content": label}] for label in LABELS
        ]
        scores = [total for total, _ in engine.loglikelihood(conversations)]
        assert example["predicted"] == LABELS[scores.index(max(scores))]


def test_exact_match_regression_perplexity_preference_generation(run_dir, tmp_path):
    qa = evaluate_task(
        run_dir,
        tmp_path,
        "exact_match",
        [{"question": "what is the fee", "answer": "fee", "answers": ["fee", "the fee"]}] * 3,
    )
    assert set(qa["metrics"]) >= {"exact_match", "normalized_exact_match", "token_f1"}
    regression = evaluate_task(run_dir, tmp_path, "regression", [{"prompt": "how many", "completion": "3"}] * 3)
    assert {"mse", "mae"} <= set(regression["metrics"])
    text = evaluate_task(run_dir, tmp_path, "perplexity", [{"text": "the quick brown fox"}, {"text": "refund fee"}])
    assert text["metrics"]["perplexity"]["value"] > 1.0
    assert text["metrics"]["perplexity"]["value"] == pytest.approx(
        2.718281828 ** text["metrics"]["loss"]["value"], rel=1e-6
    )
    preference = evaluate_task(
        run_dir,
        tmp_path,
        "preference",
        [
            {"prompt": "question 0 about fee", "chosen": "fee", "rejected": "the quick brown fox jumps"},
            {"prompt": "question 1 about fee", "chosen": "the fee", "rejected": "hello"},
        ],
        baselines=("base",),
    )
    assert preference["metrics"]["preference_accuracy"]["value"] in (0.0, 0.5, 1.0)
    assert all(len(row["predicted"]) == 2 for row in preference["examples"])
    implicit = [
        (tc - bc) > (tr - br)
        for (tc, tr), (bc, br) in (  # the tuned model's log-ratio to its base, per reply
            (row["predicted"], row["baselines"]["base"]["predicted"]) for row in preference["examples"]
        )
    ]
    assert preference["comparisons"]["base"]["implicit_reward_accuracy"]["value"] == sum(implicit) / 2
    free = evaluate_task(run_dir, tmp_path, "generation", [{"prompt": "hello"}], baselines=("base",))
    assert "metrics" not in free and "base" in free["examples"][0]["baselines"], "no reference: review only"


def test_baselines_need_a_run_and_a_known_name(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "x", "label": "fee"}])
    with pytest.raises(UserError, match="needs a run directory"):
        evaluate(str(tiny_model), data, EvalOptions(baselines=("base",), resamples=10), tmp_path / "out")
    with pytest.raises(UserError, match="few-shot:K"):
        parse_baseline("few-shots:3")
    assert parse_baseline("few-shot:8") == 8 and parse_baseline("base") == 0


def test_few_shot_prefix_prefers_distinct_labels_and_lists_them():
    shots = [convert_classification({"text": f"t{i}", "label": LABELS[i % 2]}) for i in range(10)]
    prefix = few_shot_prefix(shots, 2, LABELS, "Name the intent.", seed=0, task="classification")
    assert prefix[0]["role"] == "system" and "Name the intent." in prefix[0]["content"]
    assert all(label in prefix[0]["content"] for label in LABELS)
    replies = [m["content"] for m in prefix if m["role"] == "assistant"]
    assert sorted(replies) == sorted(LABELS[:2]), "two shots, two different labels"
    query = convert_messages(
        {
            "messages": [
                {"role": "system", "content": "own"},
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a"},
            ]
        }
    ).messages[:2]
    combined = with_prefix(prefix, query)
    assert combined[0] == prefix[0] and combined[-1] == {"role": "user", "content": "q"}
    assert [m["role"] for m in combined].count("system") == 1


def test_parse_number_reads_worked_solutions():
    assert parse_number("so she has 1,234 apples") == 1234.0
    assert parse_number("3 + 4 = 7\n#### 7") == 7.0 and parse_number("-2.5 degrees") == -2.5
    assert parse_number("no number") is None


def test_shared_prefix_cache_changes_no_output(run_dir):
    """Encoding a batch's common prompt prefix once gives exactly the replies of encoding every row whole."""
    from tunesmith.engine.generation import PREFIX_CACHE_MIN_TOKENS, Engine, Sampling, common_prefix_length

    engine = Engine.load(str(run_dir))
    shots = [
        m
        for i in range(6)
        for m in ({"role": "user", "content": f"question {i} about fee"}, {"role": "assistant", "content": "fee"})
    ]
    conversations = [
        shots + [{"role": "user", "content": text}]
        for text in ("question 1", "a much longer question 2 about fee", "q")
    ]
    assert common_prefix_length([engine.chat.prompt_ids(c) for c in conversations]) >= PREFIX_CACHE_MIN_TOKENS
    allowed = [engine.reply_ids(label) for label in LABELS]
    results = {}
    for caching in (True, False):
        engine.prefix_caching = caching
        results[caching] = (
            engine.generate(conversations, Sampling(max_new_tokens=6)),
            engine.generate(conversations, Sampling(), allowed),
        )
    assert results[True] == results[False]
    assert common_prefix_length([[1, 2, 3], [1, 2, 4]]) == 2 and common_prefix_length([[1, 2], [1, 2]]) == 1


def test_per_slice_metrics_by_a_row_field_and_by_length(run_dir, tmp_path):
    rows = [
        {"text": f"question {i} about {label}" + " more" * i, "label": label, "channel": "app" if i % 2 else "web"}
        for i in range(6)
        for label in LABELS[:2]
    ]
    by_field = evaluate_task(run_dir, tmp_path, "classification", rows, slice_by="channel")
    assert set(by_field["errors"]["per_slice"]) == {"app", "web"}
    assert by_field["errors"]["per_slice"]["app"]["accuracy"]["n"] == 6
    by_length = evaluate_task(run_dir, tmp_path / "length", "classification", rows, slice_by="length")
    assert (
        set(by_length["errors"]["per_slice"]) <= {"short", "medium", "long"}
        and len(by_length["errors"]["per_slice"]) >= 2
    )
    with pytest.raises(UserError, match="no scalar field 'shop'"):
        evaluate_task(run_dir, tmp_path / "missing", "classification", rows, slice_by="shop")


def test_preference_by_a_reward_model(run_dir, tiny_model, tmp_path):
    """A reward model (a one-output sequence classifier) scores chosen vs rejected instead of log-probabilities."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tunesmith.engine.reward_model import RewardScorer

    torch.manual_seed(1)
    reward_dir = tmp_path / "reward"
    AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1).save_pretrained(reward_dir)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(reward_dir)
    rows = [{"prompt": f"question {i}", "chosen": "fee", "rejected": f"the quick brown fox {i}"} for i in range(4)]
    result = evaluate_task(run_dir, tmp_path, "preference", rows, reward_model=str(reward_dir))
    scorer = RewardScorer.load(str(reward_dir))
    for row, example in zip(rows, result["examples"]):
        prompt = [{"role": "user", "content": row["prompt"]}]
        expected = scorer.score(
            [
                prompt + [{"role": "assistant", "content": row["chosen"]}],
                prompt + [{"role": "assistant", "content": row["rejected"]}],
            ],
            batch_size=1,
        )
        assert example["predicted"] == pytest.approx(expected, abs=1e-5), "batched, padded scoring equals one at a time"
    with pytest.raises(UserError, match="one output"):
        AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=3).save_pretrained(tmp_path / "three")
        AutoTokenizer.from_pretrained(tiny_model).save_pretrained(tmp_path / "three")
        RewardScorer.load(str(tmp_path / "three"))


def test_rows_a_task_cannot_use_are_named_by_file_and_line(run_dir, tmp_path):
    data = write_jsonl(
        tmp_path / "reg.jsonl",
        [{"prompt": "how many", "completion": "3"}, {"prompt": "how many", "completion": "several"}],
    )
    with pytest.raises(UserError, match=f"^{data}:2: expected a number for the regression task, got 'several'"):
        evaluate(str(run_dir), data, EvalOptions(task="regression", resamples=10), tmp_path / "out")


def test_a_full_fine_tuning_run_is_compared_with_its_base_model(tiny_model, tmp_path):
    """No adapter to switch off: the baseline is the run's base model, loaded once, scored as if evaluated alone."""
    rows = [{"text": f"question {i} about {label}", "label": label} for i in range(4) for label in LABELS]
    config = write_config_file(tmp_path, tiny_model, rows, "epochs: 2, batch_size: 4, progress: false, lr: 1.0e-3")
    config.write_text(config.read_text() + "adapter: {type: full}\n")
    assert main(["train", str(config)]) == 0
    data = write_jsonl(tmp_path / "ppl.jsonl", [{"text": f"question {i} about fee"} for i in range(5)])
    options = EvalOptions(task="perplexity", resamples=20)
    tuned = evaluate(str(tmp_path / "run"), data, dataclasses.replace(options, baselines=("base",)), tmp_path / "a")
    alone = evaluate(str(tiny_model), data, options, tmp_path / "b")
    assert tuned["baselines"]["base"]["metrics"]["loss"]["value"] == pytest.approx(alone["metrics"]["loss"]["value"])
    assert tuned["metrics"]["loss"]["value"] != pytest.approx(alone["metrics"]["loss"]["value"])


# ------------------------------------------------------------------------------- few-shot on log-likelihood


def test_few_shot_perplexity_reads_the_shots_and_scores_only_the_rows_own_tokens(run_dir, tmp_path):
    """few-shot:2 is the base model with two examples before each row: not the base model's number, and equal to
    (log-likelihood with the shots) minus (log-likelihood of the shots alone), the row's own tokens only."""
    from tunesmith.data.dataset import load_examples
    from tunesmith.engine.generation import Engine

    rows = [{"text": f"question {i} about {label}", "label": label} for i, label in enumerate(LABELS)]
    result = evaluate_task(run_dir, tmp_path, "perplexity", rows, baselines=("base", "few-shot:2"))
    base, few_shot = (result["baselines"][name]["metrics"]["loss"]["value"] for name in ("base", "few-shot:2"))
    assert few_shot != pytest.approx(base, rel=1e-4), "the shots change what the model saw"
    prefix = few_shot_prefix(load_examples(run_dir.parent / "train.jsonl"), 2, [], None, seed=0, task="perplexity")
    engine = Engine.load(str(run_dir))
    nll, tokens = 0.0, 0
    with engine.base_model():
        ((shots_logprob, shots_tokens),) = engine.loglikelihood([prefix])
        for row in rows:
            conversation = with_prefix(
                prefix, [{"role": "user", "content": row["text"]}, {"role": "assistant", "content": row["label"]}]
            )
            ((logprob, count),) = engine.loglikelihood([conversation])
            nll, tokens = nll - (logprob - shots_logprob), tokens + count - shots_tokens
    assert few_shot == pytest.approx(nll / tokens, rel=1e-4)
    assert tokens == sum(row["predicted"][1] for row in result["examples"]), "the same tokens as every other system"
    pairs = [{"prompt": f"question {i} about fee", "chosen": "fee", "rejected": "refund"} for i in range(2)]
    ranked = evaluate_task(run_dir, tmp_path / "pairs", "preference", pairs, baselines=("base", "few-shot:2"))
    first = [{"role": "user", "content": pairs[0]["prompt"]}, {"role": "assistant", "content": "fee"}]
    with engine.base_model():
        ((chosen_with_shots, _),) = engine.loglikelihood([with_prefix(prefix, first)])
    shot_chosen = ranked["examples"][0]["baselines"]["few-shot:2"]["predicted"][0]
    assert shot_chosen == pytest.approx(chosen_with_shots - shots_logprob, rel=1e-4), "pairs: the reply, not the shots"
    assert shot_chosen != pytest.approx(ranked["examples"][0]["baselines"]["base"]["predicted"][0], rel=1e-4)


def test_a_baseline_that_cannot_apply_is_refused_before_any_model_runs(run_dir, tiny_model, tmp_path):
    text = [{"text": "the quick brown fox"}, {"text": "refund fee"}]
    with pytest.raises(UserError, match=r"text/perplexity.jsonl:1: few-shot:K puts example conversations before"):
        evaluate_task(run_dir, tmp_path / "text", "perplexity", text, baselines=("few-shot:2",))
    pairs = [{"prompt": "question 0", "chosen": "fee", "rejected": "the lazy dog"}] * 2
    with pytest.raises(UserError, match="a judge reads its rubric and nothing else"):
        evaluate_task(run_dir, tmp_path / "judge", "judge", pairs, baselines=("few-shot:2",))
    with pytest.raises(UserError, match="every system would score the same"):
        evaluate_task(
            run_dir, tmp_path / "rated", "preference", pairs, baselines=("base",), reward_model=str(tiny_model)
        )
    with pytest.raises(UserError, match=r"few-shot:50 needs 50 example conversations, and .*train.jsonl has 24"):
        evaluate_task(
            run_dir, tmp_path / "many", "classification", [{"text": "q", "label": "fee"}], baselines=("few-shot:50",)
        )


# ------------------------------------------------------------------------------------- free-text answers


def test_generation_is_scored_against_references_and_review_only_without(run_dir, tmp_path):
    rows = [{"prompt": f"question {i} about fee", "completion": "the fee is small"} for i in range(3)]
    scored = evaluate_task(run_dir, tmp_path, "generation", rows, baselines=("base",))
    assert {"rouge_l", "chrf", "bleu"} == set(scored["metrics"]) == set(scored["baselines"]["base"]["metrics"])
    assert {"rouge_l", "chrf", "bleu"} <= set(scored["comparisons"]["base"])
    assert all(row["expected"] == "the fee is small" for row in scored["examples"])
    assert "rouge_l" in format_summary(scored) and "chrf" in format_summary(scored)
    prompts = [
        {"prompt": "question 1 about fee", "reference": "the fee is small"},
        {"prompt": "hello", "reference": "hi"},
    ]
    assert evaluate_task(run_dir, tmp_path / "prompts", "generation", prompts)["metrics"]["chrf"]["n"] == 2
    with pytest.raises(UserError, match=r"mixed/generation.jsonl:2: this row has no reference reply, and others"):
        evaluate_task(run_dir, tmp_path / "mixed", "generation", [prompts[0], {"prompt": "hello"}])


def test_a_judge_scores_every_systems_replies_against_the_references(run_dir, tiny_model, tmp_path, capsys):
    data = write_jsonl(
        tmp_path / "qa.jsonl",
        [{"question": f"question {i} about fee", "answer": "fee", "answers": ["fee", "the fee"]} for i in range(4)],
    )
    code = main(
        [
            "eval",
            str(run_dir),
            "--data",
            str(data),
            "--task",
            "exact_match",
            "--baseline",
            "base",
            "--judge",
            str(tiny_model),
            "--judge-scale",
            "4",
            "--resamples",
            "50",
            "--max-new-tokens",
            "4",
            "--output",
            str(tmp_path / "out"),
        ]
    )
    assert code == 0
    result = json.loads((tmp_path / "out" / "eval.json").read_text())
    for metrics in (result["metrics"], result["baselines"]["base"]["metrics"]):
        judged = metrics["judge_score"]
        assert 1.0 <= judged["value"] <= 4.0 and judged["n"] == 4
        assert judged["ci95"][0] <= judged["value"] <= judged["ci95"][1]
    assert {"diff", "ci95"} <= set(result["comparisons"]["base"]["judge_score"])
    assert "mcnemar_p" in result["comparisons"]["base"] and list(result["comparisons"]["base"])[-1] == "mcnemar_p"
    scores = [row["judge_score"] for row in result["examples"]]
    assert result["metrics"]["judge_score"]["value"] == pytest.approx(sum(scores) / 4)
    assert all("judge_score" in row["baselines"]["base"] for row in result["examples"])
    assert result["judge"]["mode"] == "reference" and result["judge"]["scale"] == 4
    assert result["settings"]["judge"] == str(tiny_model) and "judge_s" in result["timing"]
    assert "judge_score" in capsys.readouterr().out
    with pytest.raises(UserError, match="--judge scores replies against reference answers"):
        evaluate_task(run_dir, tmp_path / "ppl", "perplexity", [{"text": "refund fee"}], judge=str(tiny_model))


def test_the_judge_task_measures_agreement_with_human_scores(tiny_model, tmp_path):
    rows = [
        {"prompt": f"question {i}", "reference": "fee", "response": reply, "score": score}
        for i, (reply, score) in enumerate([("fee", 5), ("the lazy dog", 1), ("the fee", 4), ("refund", 2)])
    ]
    result = evaluate_task(tiny_model, tmp_path, "judge", rows)
    assert set(result["metrics"]) == {"rating_correlation", "rating_mae", "rating_agreement"}
    judged = [row["predicted"] for row in result["examples"]]
    assert all(1.0 <= score <= 5.0 for score in judged)
    assert [row["expected"] for row in result["examples"]] == [5, 1, 4, 2]
    mae = sum(abs(j - h) for j, h in zip(judged, [5, 1, 4, 2])) / 4
    assert result["metrics"]["rating_mae"]["value"] == pytest.approx(mae)
    assert result["settings"]["judge_scale"] == 5 and "method" not in result["settings"]
    with pytest.raises(UserError, match=r"human/judge.jsonl:1: the human score 7 lies outside the judge's scale 1..5"):
        evaluate_task(tiny_model, tmp_path / "human", "judge", [{**rows[0], "score": 7}])
    unreferenced = [{key: rows[0][key] for key in ("prompt", "response", "score")}]
    with pytest.raises(UserError, match=r"noref/judge.jsonl:1: a scored reply for the judge task needs a 'reference'"):
        evaluate_task(tiny_model, tmp_path / "noref", "judge", unreferenced)
