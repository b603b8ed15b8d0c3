"""OpenAI's text graders: `string_check` (1.0 or 0.0) and `text_similarity` (a similarity from 0 to 1). Both render
their `input` and `reference` templates (graders/templates.py) for each sample, then compare the two texts.

string_check's operations, as OpenAI's guide defines them: eq (equal, case-sensitive), ne (not equal,
case-sensitive), like (input contains reference, case-sensitive), ilike (input contains reference, ignoring case).

text_similarity's metrics, each from a maintained library, scored input (the hypothesis) against reference:
- fuzzy_match: rapidfuzz, which OpenAI names; OpenAI does not say which of its scorers, and this is `fuzz.ratio`
  (the normalised Indel similarity of the two strings, case-sensitive), the one that measures the whole strings
  against each other; the partial and token-sort scorers would give 1.0 to a reply that merely contains the answer.
- bleu: sacrebleu's sentence BLEU with its defaults (13a tokens, n-grams up to 4, exponential smoothing) and
  effective order, as sacrebleu recommends for one sentence: a reply shorter than 4 tokens is scored on the n-gram
  orders it has, rather than 0 for lacking 4-grams.
- gleu: nltk's sentence GLEU (Google BLEU: the smaller of n-gram precision and recall, orders 1 to 4) over the same
  13a tokens.
- meteor: nltk's METEOR (lower case, the same 13a tokens) with exact and Porter-stem matching only. Its third stage,
  WordNet synonyms, needs the WordNet corpus, which is a separate download that tunesmith does not fetch; rather than
  a score that changes with what a machine has downloaded, tunesmith always scores without synonyms. Where OpenAI
  counts "feline" against "cat", this does not, so scores are lower than OpenAI's where the texts differ by synonyms.
- rouge_1 .. rouge_5, rouge_l: rouge-score's F-measure (rouge1..rouge5, rougeL), on lower-cased Unicode word tokens.
  rouge-score's own tokeniser keeps only a-z and 0-9, so every non-Latin reply would score 0 (identical Russian
  texts included); for English text the two tokenisers agree.
- cosine: refused at check time. OpenAI embeds both texts with its embedding model (and offers it for evals only);
  tunesmith ships no embedding model, and a made-up score would be worse than none.

`pass_threshold` (the evals form of this grader) is accepted and checked but does not change the score: a grader
run answers the similarity itself.
"""

from __future__ import annotations

import math
import re
from functools import cache
from typing import Any, Callable

from tunesmith.errors import Problem, did_you_mean
from tunesmith.eval.graders import Context, GraderFailure, Sample, check_keys
from tunesmith.eval.graders.templates import check_template, render_template
from tunesmith.registry import graders

TEMPLATED = ("input", "reference")

OPERATIONS: dict[str, Callable[[str, str], bool]] = {
    "eq": lambda text, reference: text == reference,
    "ne": lambda text, reference: text != reference,
    "like": lambda text, reference: reference in text,
    # casefold, not lower: ilike is "ignoring case", and casefold also matches ß with ss
    "ilike": lambda text, reference: reference.casefold() in text.casefold(),
}

SIMILARITIES: dict[str, Callable[[str, str], float]] = {}  # evaluation_metric -> (input, reference) -> 0..1


def similarity(name: str) -> Callable[[Callable[[str, str], float]], Callable[[str, str], float]]:
    def add(function: Callable[[str, str], float]) -> Callable[[str, str], float]:
        SIMILARITIES[name] = function
        return function

    return add


def metric_names() -> list[str]:
    return [*SIMILARITIES, "cosine"]


def cosine_refusal() -> str:
    return (
        "cosine needs an embedding model, which tunesmith does not ship (OpenAI embeds with its own, for evals "
        f"only); fix: use another evaluation_metric: {', '.join(SIMILARITIES)}"
    )


def check_text_fields(spec: dict[str, Any], where: str) -> list[Problem]:
    """The problems of the templates both text graders share: `input` and `reference`."""
    problems = []
    for key in TEMPLATED:
        if key in spec:
            problems += check_template(spec[key], f"{where}.{key}")
    return problems


def check_choice(spec: dict[str, Any], key: str, choices: list[str], where: str) -> list[Problem]:
    value = spec.get(key)
    if key not in spec or value in choices:
        return []
    known = did_you_mean(str(value), choices)
    return [Problem(f"{where}.{key}", f"{value!r} is not one of {', '.join(choices)}{known}; fix: choose one")]


def rendered(spec: dict[str, Any], sample: Sample, item: dict[str, Any]) -> tuple[str, str]:
    """(input, reference) for this sample and item."""
    return render_template(spec["input"], sample, item), render_template(spec["reference"], sample, item)


@graders.register("string_check")
class StringCheck:
    """1.0 when `operation` holds between the rendered input and reference, else 0.0."""

    @staticmethod
    def check(spec: dict[str, Any], where: str) -> list[Problem]:
        problems = check_keys(spec, where, ("name", "input", "reference", "operation"))
        return problems + check_text_fields(spec, where) + check_choice(spec, "operation", [*OPERATIONS], where)

    @staticmethod
    def templates(spec: dict[str, Any], where: str) -> list[tuple[str, str]]:
        return [(f"{where}.{key}", spec[key]) for key in TEMPLATED]

    @staticmethod
    def grade(spec: dict[str, Any], sample: Sample, item: dict[str, Any], context: Context) -> float:
        text, reference = rendered(spec, sample, item)
        return float(OPERATIONS[spec["operation"]](text, reference))


@graders.register("text_similarity")
class TextSimilarity:
    """The rendered input's similarity to the rendered reference by `evaluation_metric`, from 0 to 1."""

    @staticmethod
    def check(spec: dict[str, Any], where: str) -> list[Problem]:
        problems = check_keys(spec, where, ("name", "input", "reference", "evaluation_metric"), ("pass_threshold",))
        problems += check_text_fields(spec, where) + check_choice(spec, "evaluation_metric", metric_names(), where)
        if spec.get("evaluation_metric") == "cosine":
            problems.append(Problem(f"{where}.evaluation_metric", cosine_refusal()))
        threshold = spec.get("pass_threshold", 0.0)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            problems.append(Problem(f"{where}.pass_threshold", f"{threshold!r} is not a number; fix: give e.g. 0.5"))
        return problems

    @staticmethod
    def templates(spec: dict[str, Any], where: str) -> list[tuple[str, str]]:
        return [(f"{where}.{key}", spec[key]) for key in TEMPLATED]

    @staticmethod
    def grade(spec: dict[str, Any], sample: Sample, item: dict[str, Any], context: Context) -> float:
        metric = SIMILARITIES.get(spec["evaluation_metric"])
        if metric is None:  # cosine, in a grader nobody checked
            raise GraderFailure("other_error", cosine_refusal())
        text, reference = rendered(spec, sample, item)
        return min(1.0, max(0.0, metric(text, reference)))  # sacrebleu's 100.00000000000004 for a perfect match


@cache
def bleu_scorer():
    from sacrebleu.metrics import BLEU  # imported on first use, as every library below: a lookup stays light

    return BLEU(effective_order=True)


@cache
def tokenizer_13a() -> Callable[[str], str]:
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return Tokenizer13a()


def words(text: str) -> list[str]:
    """BLEU's 13a tokens (words, with punctuation split off), for the nltk metrics, which take tokens."""
    return tokenizer_13a()(text).split()


class UnicodeWords:
    """rouge-score's tokeniser interface: lower-cased runs of Unicode letters and digits."""

    @staticmethod
    def tokenize(text: str) -> list[str]:
        return re.findall(r"[^\W_]+", text.lower())


@cache
def rouge_scorer():
    from rouge_score import rouge_scorer as scorers  # ~2 s to import (nltk)

    return scorers.RougeScorer([*ROUGE_TYPES.values()], tokenizer=UnicodeWords())


class NoSynonyms:
    """Stands in for nltk's WordNet reader in METEOR: no word has synonyms (see the module's docstring)."""

    @staticmethod
    def synsets(word: str) -> list:
        return []


@similarity("fuzzy_match")
def fuzzy_match(text: str, reference: str) -> float:
    from rapidfuzz import fuzz

    return fuzz.ratio(text, reference) / 100


@similarity("bleu")
def bleu(text: str, reference: str) -> float:
    return bleu_scorer().sentence_score(text, [reference]).score / 100


@similarity("gleu")
def gleu(text: str, reference: str) -> float:
    from nltk.translate.gleu_score import sentence_gleu

    return sentence_gleu([words(reference)], words(text))


@similarity("meteor")
def meteor(text: str, reference: str) -> float:
    from nltk.translate.meteor_score import single_meteor_score

    return single_meteor_score(words(reference), words(text), wordnet=NoSynonyms())


ROUGE_TYPES = {f"rouge_{n}": f"rouge{n}" for n in range(1, 6)} | {"rouge_l": "rougeL"}  # OpenAI's -> rouge-score's


def rouge(kind: str) -> Callable[[str, str], float]:
    def score(text: str, reference: str) -> float:
        return rouge_scorer().score(reference, text)[kind].fmeasure  # rouge-score takes (target, prediction)

    return score


SIMILARITIES |= {name: rouge(kind) for name, kind in ROUGE_TYPES.items()}
