"""Evaluation tasks and baselines end to end on a tiny trained run: eval.json has the contract's shape."""
from __future__ import annotations

import dataclasses
import json

import pytest

from conftest import write_config_file, write_jsonl
from tunesmith.cli import main
from tunesmith.data.formats import convert_classification, convert_messages
from tunesmith.errors import UserError
from tunesmith.eval.run import EvalOptions, evaluate, few_shot_prefix, parse_baseline
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
    return evaluate(str(run_dir), data, EvalOptions(task=task, resamples=50, max_new_tokens=8, **options), tmp_path / task)


def test_classification_with_baselines_fills_the_contract(run_dir, tmp_path):
    rows = [{"text": f"question {i} about {label}", "label": label} for i in range(2) for label in LABELS]
    result = evaluate_task(run_dir, tmp_path, "classification", rows, baselines=("base", "few-shot:2"))
    assert result["task"] == "classification" and result["n"] == 8
    for name in ("accuracy", "macro_f1", "micro_f1", "weighted_f1"):
        metric = result["metrics"][name]
        assert set(metric) == {"value", "ci95", "n"} and metric["ci95"][0] <= metric["value"] <= metric["ci95"][1]
    assert set(result["baselines"]) == {"base", "few-shot:2"}
    assert {"diff", "ci95"} <= set(result["comparisons"]["base"]["accuracy"]) and "mcnemar_p" in result["comparisons"]["base"]
    assert set(result["per_label"]) >= set(LABELS) and len(result["confusion"]["matrix"]) >= len(LABELS)
    assert all(row["predicted"] in LABELS for row in result["examples"]), "constrained decoding keeps to the label set"
    assert all(row["baselines"]["few-shot:2"]["predicted"] in LABELS for row in result["examples"])
    on_disk = json.loads((tmp_path / "classification" / "eval.json").read_text())
    assert on_disk["metrics"] == result["metrics"] and (tmp_path / "classification" / "report.html").is_file()


def test_loglik_ranking_picks_the_most_likely_label(run_dir, tmp_path):
    from tunesmith.serve.engine import Engine

    rows = [{"text": f"question 0 about {label}", "label": label} for label in LABELS]
    ranked = evaluate_task(run_dir, tmp_path, "classification", rows, method="loglik")
    engine = Engine.load(str(run_dir))
    for row, example in zip(rows, ranked["examples"]):
        conversations = [[{"role": "user", "content": row["text"]}, {"role": "assistant", "content": label}]
                         for label in LABELS]
        scores = [total for total, _ in engine.loglikelihood(conversations)]
        assert example["predicted"] == LABELS[scores.index(max(scores))]


def test_exact_match_regression_perplexity_preference_generation(run_dir, tmp_path):
    qa = evaluate_task(run_dir, tmp_path, "exact_match",
                       [{"question": "what is the fee", "answer": "fee", "answers": ["fee", "the fee"]}] * 3)
    assert set(qa["metrics"]) >= {"exact_match", "normalized_exact_match", "token_f1"}
    regression = evaluate_task(run_dir, tmp_path, "regression", [{"prompt": "how many", "completion": "3"}] * 3)
    assert {"mse", "mae"} <= set(regression["metrics"])
    text = evaluate_task(run_dir, tmp_path, "perplexity", [{"text": "the quick brown fox"}, {"text": "refund fee"}])
    assert text["metrics"]["perplexity"]["value"] > 1.0
    assert text["metrics"]["perplexity"]["value"] == pytest.approx(2.718281828 ** text["metrics"]["loss"]["value"], rel=1e-6)
    preference = evaluate_task(run_dir, tmp_path, "preference",
                               [{"prompt": "question 0 about fee", "chosen": "fee", "rejected": "the quick brown fox jumps"},
                                {"prompt": "question 1 about fee", "chosen": "the fee", "rejected": "hello"}],
                               baselines=("base",))
    assert preference["metrics"]["preference_accuracy"]["value"] in (0.0, 0.5, 1.0)
    assert all(len(row["predicted"]) == 2 for row in preference["examples"])
    implicit = [(tc - bc) > (tr - br) for (tc, tr), (bc, br) in  # the tuned model's log-ratio to its base, per reply
                ((row["predicted"], row["baselines"]["base"]["predicted"]) for row in preference["examples"])]
    assert preference["comparisons"]["base"]["implicit_reward_accuracy"]["value"] == sum(implicit) / 2
    free = evaluate_task(run_dir, tmp_path, "generation", [{"prompt": "hello", "completion": "hi"}], baselines=("base",))
    assert "metrics" not in free and "base" in free["examples"][0]["baselines"]


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
    query = convert_messages({"messages": [{"role": "system", "content": "own"}, {"role": "user", "content": "q"},
                                           {"role": "assistant", "content": "a"}]}).messages[:2]
    combined = with_prefix(prefix, query)
    assert combined[0] == prefix[0] and combined[-1] == {"role": "user", "content": "q"}
    assert [m["role"] for m in combined].count("system") == 1


def test_parse_number_reads_worked_solutions():
    assert parse_number("so she has 1,234 apples") == 1234.0
    assert parse_number("3 + 4 = 7\n#### 7") == 7.0 and parse_number("-2.5 degrees") == -2.5
    assert parse_number("no number") is None


def test_shared_prefix_cache_changes_no_output(run_dir):
    """Encoding a batch's common prompt prefix once gives exactly the replies of encoding every row whole."""
    from tunesmith.serve.engine import PREFIX_CACHE_MIN_TOKENS, Engine, Sampling, common_prefix_length

    engine = Engine.load(str(run_dir))
    shots = [m for i in range(6) for m in ({"role": "user", "content": f"question {i} about fee"},
                                            {"role": "assistant", "content": "fee"})]
    conversations = [shots + [{"role": "user", "content": text}] for text in ("question 1", "a much longer question 2 about fee", "q")]
    assert common_prefix_length([engine.chat.prompt_ids(c) for c in conversations]) >= PREFIX_CACHE_MIN_TOKENS
    allowed = [engine.reply_ids(label) for label in LABELS]
    results = {}
    for caching in (True, False):
        engine.prefix_caching = caching
        results[caching] = (engine.generate(conversations, Sampling(max_new_tokens=6)),
                            engine.generate(conversations, Sampling(), allowed))
    assert results[True] == results[False]
    assert common_prefix_length([[1, 2, 3], [1, 2, 4]]) == 2 and common_prefix_length([[1, 2], [1, 2]]) == 1


def test_per_slice_metrics_by_a_row_field_and_by_length(run_dir, tmp_path):
    rows = [{"text": f"question {i} about {label}" + " more" * i, "label": label, "channel": "app" if i % 2 else "web"}
            for i in range(6) for label in LABELS[:2]]
    by_field = evaluate_task(run_dir, tmp_path, "classification", rows, slice_by="channel")
    assert set(by_field["errors"]["per_slice"]) == {"app", "web"}
    assert by_field["errors"]["per_slice"]["app"]["accuracy"]["n"] == 6
    by_length = evaluate_task(run_dir, tmp_path / "length", "classification", rows, slice_by="length")
    assert set(by_length["errors"]["per_slice"]) <= {"short", "medium", "long"} and len(by_length["errors"]["per_slice"]) >= 2
    with pytest.raises(UserError, match="no scalar field 'shop'"):
        evaluate_task(run_dir, tmp_path / "missing", "classification", rows, slice_by="shop")


def test_preference_by_a_reward_model(run_dir, tiny_model, tmp_path):
    """A reward model (a one-output sequence classifier) scores chosen vs rejected instead of log-probabilities."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tunesmith.eval.reward import RewardScorer

    torch.manual_seed(1)
    reward_dir = tmp_path / "reward"
    AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1).save_pretrained(reward_dir)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(reward_dir)
    rows = [{"prompt": f"question {i}", "chosen": "fee", "rejected": f"the quick brown fox {i}"} for i in range(4)]
    result = evaluate_task(run_dir, tmp_path, "preference", rows, reward_model=str(reward_dir))
    scorer = RewardScorer.load(str(reward_dir))
    for row, example in zip(rows, result["examples"]):
        prompt = [{"role": "user", "content": row["prompt"]}]
        expected = scorer.score([prompt + [{"role": "assistant", "content": row["chosen"]}],
                                 prompt + [{"role": "assistant", "content": row["rejected"]}]], batch_size=1)
        assert example["predicted"] == pytest.approx(expected, abs=1e-5), "batched, padded scoring equals one at a time"
    with pytest.raises(UserError, match="one output"):
        AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=3).save_pretrained(tmp_path / "three")
        AutoTokenizer.from_pretrained(tiny_model).save_pretrained(tmp_path / "three")
        RewardScorer.load(str(tmp_path / "three"))


def test_rows_a_task_cannot_use_are_named_by_file_and_line(run_dir, tmp_path):
    data = write_jsonl(tmp_path / "reg.jsonl", [{"prompt": "how many", "completion": "3"},
                                                {"prompt": "how many", "completion": "several"}])
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
