"""`tunesmith label`: RLAIF data. A policy answers each prompt N times; a judge model labels the replies.

* compare: every pair of a prompt's distinct replies is judged in both orders (eval/judge.py); the reply
  that wins most is `chosen`, the one that wins least `rejected`, and the pair is written only if the judge
  prefers the one to the other in both orders. Output: preference rows {prompt, chosen, rejected} for dpo/reward.
* rate: every reply gets the judge's expected score on a 1..K scale. Output: {prompt, response, score} rows.

The input is never overwritten, and a provenance file next to the output records what made it (policy,
judge, rubric hash, seed, sampling, counts), so a labelled file can be traced and remade.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from tunesmith.config.schema import DEFAULT_MODEL
from tunesmith.data.files import write_atomically
from tunesmith.data.formats import RowError
from tunesmith.data.prompts import prompt_of
from tunesmith.data.validate import read_objects, report
from tunesmith.engine.generation import Engine, Messages, Sampling
from tunesmith.errors import Problem, UserError
from tunesmith.eval.judge import Comparison, Judge, load_rubric


@dataclass
class LabelOptions:
    policy: str  # the model (or run directory) whose replies are labelled
    judge: str = DEFAULT_MODEL
    mode: str = "compare"  # compare: preference pairs; rate: scored replies
    samples: int = 4  # replies sampled per prompt
    seed: int = 0
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 128
    rubric: Path | None = None  # the judge's question (default: the built-in rubric of the mode)
    scale: int = 5  # rate: scores run from 1 to scale
    max_examples: int | None = None  # label the first N prompts
    batch_size: int = 8
    force: bool = False  # replace an existing output file (never the input)


@dataclass
class Prompt:
    line: int
    messages: Messages
    row_id: Any = None


@dataclass
class LabelResult:
    output: Path
    provenance: Path
    counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what the user should know about the labels (printed)


def label(source: Path, output: Path, options: LabelOptions) -> LabelResult:
    started = time.perf_counter()
    provenance_path = output.with_suffix(".provenance.json")
    check_paths(source, output, provenance_path, options.force)
    check_options(options)
    rubric = load_rubric(options.rubric, options.mode)
    prompts = read_prompts(source)[: options.max_examples]
    policy = Engine.load(options.policy)
    judge = (
        Judge(policy, rubric, options.batch_size, options.judge)
        if options.judge == options.policy
        else Judge.load(options.judge, rubric, options.batch_size)
    )
    replies = sample_replies(policy, [p.messages for p in prompts], options)
    if options.mode == "compare":
        rows, counts = preference_rows(judge, prompts, replies)
    else:
        rows, counts = score_rows(judge, prompts, replies, options.scale)
    counts = {"prompts": len(prompts), "rows": len(rows), **counts}
    write_atomically(output, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    record = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "input": str(source.resolve()),
        "input_sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
        "output": str(output.resolve()),
        "policy": options.policy,
        **judge.provenance(),
        "rubric_text": rubric.template,
        "options": {key: str(value) if isinstance(value, Path) else value for key, value in asdict(options).items()},
        "counts": counts,
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_atomically(provenance_path, json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    notes = []
    if counts.get("undecided"):
        notes.append(
            f"{counts['undecided']} of {len(prompts)} prompts gave no pair: the judge's verdict flipped when the "
            f"replies swapped places (position bias, not preference); a larger judge (--judge) decides more "
            f"pairs, and --mode rate scores each reply on its own"
        )
    return LabelResult(output, provenance_path, counts, notes)


def check_paths(source: Path, output: Path, provenance: Path, force: bool) -> None:
    if not source.is_file():
        raise UserError(f"{source}: input file not found; fix: check the path (relative to {Path.cwd()})")
    if output.resolve() == source.resolve() or provenance.resolve() == source.resolve():
        raise UserError(f"--output {output} would overwrite the input {source}; fix: write the labels to a new file")
    if output.exists() and not force:
        raise UserError(f"--output {output} already exists; fix: choose a new file, or add --force to replace it")


def check_options(options: LabelOptions) -> None:
    least = 2 if options.mode == "compare" else 1
    if options.samples < least:
        raise UserError(
            f"--samples {options.samples}: {options.mode} needs at least {least} replies per prompt; "
            f"fix: --samples {max(least, 4)}"
        )
    if options.mode == "compare" and options.temperature <= 0:
        raise UserError(
            "--temperature 0 gives every sample the same greedy reply, so there is nothing to compare; "
            "fix: sample, e.g. --temperature 0.8"
        )
    if options.mode == "rate" and not 2 <= options.scale <= 9:
        raise UserError(
            f"--scale {options.scale}: a rating scale runs from 1 to 2..9 (one token per score); fix: e.g. --scale 5"
        )
    if options.batch_size < 1 or options.max_new_tokens < 1:
        raise UserError("--batch-size and --max-new-tokens must be at least 1")


# ------------------------------------------------------------------------------------------------ prompts


def read_prompts(path: Path) -> list[Prompt]:
    """Every row's prompt; all unusable rows are reported at once, as `FILE:LINE: problem`."""
    prompts, problems = [], []
    for number, row in read_objects(path, problems):
        try:
            prompts.append(Prompt(number, prompt_of(row), row.get("id")))
        except RowError as error:
            problems.append(Problem(f"{path}:{number}", str(error)))
    if problems:
        raise UserError(
            f"{path}: {len(problems)} row(s) without a usable prompt; nothing was labelled\n{report(problems)}"
        )
    if not prompts:
        raise UserError(f'{path}: the file has no prompts; fix: one JSON object per line, e.g. {{"prompt": "..."}}')
    return prompts


def shown_prompt(messages: Messages) -> str | Messages:
    """A single user message is written as plain text, a longer conversation as its message list."""
    return messages[0]["content"] if len(messages) == 1 and messages[0]["role"] == "user" else messages


# ------------------------------------------------------------------------------------------------ labelling


def sample_replies(policy: Engine, prompts: list[Messages], options: LabelOptions) -> list[list[str]]:
    """`options.samples` replies per prompt, seeded: the same options give the same replies."""
    torch.manual_seed(options.seed)
    sampling = Sampling(max_new_tokens=options.max_new_tokens, temperature=options.temperature, top_p=options.top_p)
    per_batch = max(1, options.batch_size // options.samples)  # prompts per generate call, each repeated N times
    replies: list[list[str]] = []
    for start in range(0, len(prompts), per_batch):
        chunk = prompts[start : start + per_batch]
        flat = policy.generate([prompt for prompt in chunk for _ in range(options.samples)], sampling)
        replies += [flat[i * options.samples : (i + 1) * options.samples] for i in range(len(chunk))]
    return replies


def distinct(replies: list[str]) -> list[str]:
    """Non-empty replies, each once, in sampling order."""
    return list(dict.fromkeys(reply.strip() for reply in replies if reply.strip()))


def preference_rows(judge: Judge, prompts: list[Prompt], replies: list[list[str]]) -> tuple[list[dict], dict[str, int]]:
    """One pair per prompt: the reply that wins most against the one that wins least, when the judge is sure."""
    candidates = [distinct(r) for r in replies]
    pairs = [
        (p, i, j) for p, options in enumerate(candidates) for i, j in itertools.combinations(range(len(options)), 2)
    ]
    comparisons = judge.compare(
        [prompts[p].messages for p, _, _ in pairs],
        [candidates[p][i] for p, i, _ in pairs],
        [candidates[p][j] for p, _, j in pairs],
    )
    results: dict[int, dict[tuple[int, int], Comparison]] = {}
    for (p, i, j), comparison in zip(pairs, comparisons):
        results.setdefault(p, {})[(i, j)] = comparison
    rows, counts = [], {"fewer_than_two_distinct": 0, "undecided": 0}
    for p, prompt in enumerate(prompts):
        if len(candidates[p]) < 2:
            counts["fewer_than_two_distinct"] += 1
            continue
        best, worst, probability = extremes(len(candidates[p]), results[p])
        if probability is None:
            counts["undecided"] += 1
            continue
        row = {
            "prompt": shown_prompt(prompt.messages),
            "chosen": candidates[p][best],
            "rejected": candidates[p][worst],
            "judge_probability": round(probability, 4),
            "source_line": prompt.line,
        }
        rows.append(row if prompt.row_id is None else {"id": prompt.row_id, **row})
    return rows, counts


def extremes(count: int, results: dict[tuple[int, int], Comparison]) -> tuple[int, int, float | None]:
    """(best, worst, P(best beats worst)) by wins (a tie is half a win; the debiased probability breaks ties).

    The probability is None when the judge's verdict between the two flips with their order.
    """
    wins, soft = [0.0] * count, [0.0] * count
    for (i, j), comparison in results.items():
        share = {"first": 1.0, "second": 0.0, "tie": 0.5}[comparison.verdict]
        wins[i], wins[j] = wins[i] + share, wins[j] + 1 - share
        soft[i], soft[j] = soft[i] + comparison.probability, soft[j] + 1 - comparison.probability
    order = sorted(range(count), key=lambda k: (-wins[k], -soft[k], k))
    best, worst = order[0], order[-1]
    direct = results[(min(best, worst), max(best, worst))]
    if direct.verdict == "tie":
        return best, worst, None
    return best, worst, direct.probability if best < worst else 1 - direct.probability


def score_rows(
    judge: Judge, prompts: list[Prompt], replies: list[list[str]], scale: int
) -> tuple[list[dict], dict[str, int]]:
    """Every non-empty reply with the judge's expected score."""
    flat = [(prompt, reply.strip()) for prompt, options in zip(prompts, replies) for reply in options if reply.strip()]
    ratings = judge.rate([prompt.messages for prompt, _ in flat], [reply for _, reply in flat], scale)
    rows = []
    for (prompt, reply), rating in zip(flat, ratings):
        row = {
            "prompt": shown_prompt(prompt.messages),
            "response": reply,
            "score": round(rating.score, 4),
            "source_line": prompt.line,
        }
        rows.append(row if prompt.row_id is None else {"id": prompt.row_id, **row})
    return rows, {"empty_replies": sum(len(options) for options in replies) - len(flat)}
