"""Free-text metrics (ROUGE-L, chrF, BLEU) through the bootstrap machinery, and a judge scoring replies against
their references. The libraries' own corpus functions are the definition the prepared statistics must meet."""

from __future__ import annotations

import numpy as np
import pytest
import sacrebleu
from rouge_score import rouge_scorer

from tunesmith.errors import UserError
from tunesmith.eval import metrics as M
from tunesmith.eval.judge import Judge, default_rubric, load_rubric
from tunesmith.eval.stats import bootstrap_indices
from tunesmith.eval.text_metrics import reference_streams, resample_sums, text_statistics

WORDS = "the a cat dog sat ran on under mat house red blue quickly slowly Paris France capital is of".split()


def sentences(n: int, seed: int, length=(2, 12)) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(*length))) for _ in range(n)]


def noisy_copies(references: list[str], seed: int, keep: float) -> list[str]:
    """Each reference with every word kept with probability `keep`, else replaced by a random word."""
    rng = np.random.default_rng(seed)
    return [" ".join(w if rng.random() < keep else str(rng.choice(WORDS)) for w in r.split()) for r in references]


def library_scores(hypotheses: list[str], references: list[list[str]]) -> dict[str, float]:
    streams = reference_streams(references)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    return {
        "bleu": sacrebleu.corpus_bleu(hypotheses, streams).score,
        "chrf": sacrebleu.corpus_chrf(hypotheses, streams).score,
        "rouge_l": float(
            np.mean([scorer.score_multi(refs, hyp)["rougeL"].fmeasure for hyp, refs in zip(hypotheses, references)])
        ),
    }


def test_values_equal_the_libraries_corpus_scores_with_several_references():
    references = [[r] for r in sentences(60, seed=0)]
    for index in range(0, 60, 3):  # a third of the rows accept a second answer, one row a third
        references[index].append(sentences(1, seed=100 + index)[0])
    references[1] += ["red house", "blue house"]
    hypotheses = noisy_copies([refs[0] for refs in references], seed=1, keep=0.6)
    hypotheses[5] = ""  # an empty reply is scored, not skipped
    result = M.score("text", hypotheses, references, resamples=200)
    expected = library_scores(hypotheses, references)
    assert set(result) == {"bleu", "chrf", "rouge_l"}
    for name, value in expected.items():
        exactly = value if name != "rouge_l" else pytest.approx(value)  # BLEU and chrF: to the last bit
        assert result[name]["value"] == exactly, name
        assert result[name]["n"] == 60


def test_exact_match_carries_the_text_metrics_beside_its_own():
    answers = [["Paris"], ["blue", "dark blue"], ["the red house"]]
    result = M.score("exact_match", ["Paris", "dark blue", "a red house by the sea"], answers, resamples=100)
    assert {"exact_match", "normalized_exact_match", "token_f1", "rouge_l", "chrf", "bleu"} == set(result)
    assert result["rouge_l"]["value"] == pytest.approx(
        library_scores(["Paris", "dark blue", "a red house by the sea"], answers)["rouge_l"]
    )
    assert result["exact_match"]["value"] == pytest.approx(2 / 3)


def test_rouge_l_takes_the_best_reference_and_more_references_never_lower_bleu():
    hypotheses = ["the cat sat on the mat", "a dog ran"]
    one = M.score("text", hypotheses, [["a cat is under a house"], ["the dog ran quickly"]], resamples=10)
    two = M.score(
        "text",
        hypotheses,
        [["a cat is under a house", "the cat sat on the mat"], ["the dog ran quickly"]],
        resamples=10,
    )
    dog = rouge_scorer.RougeScorer(["rougeL"]).score("the dog ran quickly", "a dog ran")["rougeL"].fmeasure
    assert two["rouge_l"]["value"] == pytest.approx((1.0 + dog) / 2), "the matching reference scores 1"
    assert one["rouge_l"]["value"] < two["rouge_l"]["value"]
    assert two["bleu"]["value"] > one["bleu"]["value"] and two["chrf"]["value"] > one["chrf"]["value"]


def test_intervals_contain_the_point_estimate_and_paired_differences_have_the_right_sign():
    references = [[r] for r in sentences(80, seed=2)]
    good = noisy_copies([r[0] for r in references], seed=3, keep=0.9)
    poor = noisy_copies([r[0] for r in references], seed=4, keep=0.3)
    scored = M.score("text", good, references, resamples=300)
    for name, entry in scored.items():
        assert entry["ci95"][0] <= entry["value"] <= entry["ci95"][1], name
        assert entry["ci95"][0] < entry["ci95"][1], f"{name}: a real interval, not a point"
    compared = M.compare("text", good, poor, references, resamples=300)
    for name in ("bleu", "chrf", "rouge_l"):
        assert compared[name]["diff"] > 0 and compared[name]["ci95"][0] > 0, name
        assert compared[name]["diff"] == pytest.approx(
            scored[name]["value"] - M.score("text", poor, references, resamples=10)[name]["value"]
        )
    backwards = M.compare("text", poor, good, references, resamples=300)
    assert backwards["bleu"]["diff"] < 0 and backwards["bleu"]["ci95"][1] < 0


def test_resampled_sums_equal_summing_the_drawn_examples():
    columns = {"count": np.ones(7), "pairs": np.arange(14, dtype=float).reshape(7, 2)}
    indices = bootstrap_indices(7, resamples=5, seed=3)
    sums = resample_sums(columns, indices)
    assert np.array_equal(sums["pairs"], columns["pairs"][indices].sum(axis=1))
    assert np.array_equal(sums["count"], np.full(5, 7.0))


def test_references_must_hold_text():
    with pytest.raises(UserError, match="reference 1 has no accepted answers"):
        text_statistics(["a", "b"], ["a", []])


# ------------------------------------------------------------------------------------------------ judge


def test_judge_rates_replies_against_references_on_its_scale(tiny_model):
    from tunesmith.engine.generation import Engine

    judge = Judge(Engine.load(str(tiny_model)), default_rubric("reference"), batch_size=2)
    prompts = [[{"role": "user", "content": f"question {i}"}] for i in range(3)]
    references, replies = ["fee", "refund", "card arrival"], ["fee", "the quick brown fox", "card"]
    ratings = judge.rate_against(prompts, references, replies, scale=4)
    assert len(ratings) == 3
    for rating in ratings:
        assert 1.0 <= rating.score <= 4.0 and len(rating.probabilities) == 4
        assert sum(rating.probabilities) == pytest.approx(1.0)
        assert rating.score == pytest.approx(sum((k + 1) * p for k, p in enumerate(rating.probabilities)))
    again = judge.rate_against(prompts, references, replies, scale=4)
    assert [r.score for r in again] == [r.score for r in ratings], "one forward pass, no sampling: deterministic"
    one_by_one = [
        judge.rate_against(prompts[i : i + 1], references[i : i + 1], replies[i : i + 1], 4)[0].score for i in range(3)
    ]
    assert one_by_one == pytest.approx([r.score for r in ratings], abs=1e-5), "batching changes nothing"
    with pytest.raises(UserError, match="reference rubric"):
        Judge(judge.engine, default_rubric("rate")).rate_against(prompts, references, replies)


def test_the_reference_rubric_fills_its_placeholders_once(tmp_path):
    rubric = default_rubric("reference")
    assert all(name in rubric.template for name in ("{prompt}", "{reference}", "{response}", "{scale}"))
    own = tmp_path / "grade.txt"
    own.write_text("Q: {prompt}\nGold: {reference}\nAnswer: {response}\nScore 1-{scale}.\nreply-start: Score:")
    loaded = load_rubric(own, "reference")
    assert loaded.reply_start == "Score:"
    shown = loaded.render({"prompt": "p", "reference": "{response}", "response": "r", "scale": "5"})
    assert shown == "Q: p\nGold: {response}\nAnswer: r\nScore 1-5.", "text inside a value is never substituted"
    missing = tmp_path / "no-reference.txt"
    missing.write_text("Q: {prompt}\nAnswer: {response}")
    with pytest.raises(UserError, match=r"no-reference.txt: the reference rubric has no \{reference\} placeholder"):
        load_rubric(missing, "reference")
