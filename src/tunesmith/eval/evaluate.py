"""`tunesmith eval`: a target and its baselines on the same examples, with intervals, comparisons and errors.

Systems: `target` (a run: base model + its adapter, or a model), `base` (the run's base model, zero-shot)
and `few-shot:K` (the base model with K training examples in the prompt — the prompt-engineering
alternative to fine-tuning). Every system answers the same items; metrics come with bootstrap
intervals and every baseline is compared to the target on the same resamples. A baseline that cannot apply
to the task is refused before any model runs. With `--judge MODEL`, a judge model also scores every system's
replies against the reference answers (judge_score).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from tunesmith.data.dataset import load_examples
from tunesmith.data.formats import Example
from tunesmith.engine.classifier import Classifier, is_classifier_run
from tunesmith.engine.generation import Engine, Sampling
from tunesmith.engine.reward_model import RewardScorer, is_reward_model
from tunesmith.errors import Problem, UserError
from tunesmith.eval import metrics as metric_functions
from tunesmith.eval.baselines import few_shot_prefix, label_set, parse_baseline, run_columns, run_config, system_context
from tunesmith.eval.calibration import calibration_section
from tunesmith.eval.graders.batch import grader_rater
from tunesmith.eval.judge import Judge, Rubric, load_rubric
from tunesmith.eval.preference_metrics import implicit_reward_accuracy
from tunesmith.eval.stats import cell, difference
from tunesmith.eval.tasks import Context, Item, ItemError, metric_task_of
from tunesmith.registry import tasks
from tunesmith.rundir import EVAL_FILE, is_run_dir

WORST_SHOWN = 25


@dataclass
class EvalOptions:
    task: str = "classification"
    baselines: tuple[str, ...] = ()
    max_examples: int | None = None
    method: str = "constrained"
    shots_file: Path | None = None
    resamples: int = 1000
    seed: int = 0
    max_new_tokens: int = 32
    batch_size: int = 16
    slice_by: str | None = None  # a row field (e.g. "services", "type"), or "length" for input-length terciles
    reward_model: str | None = None  # preference task: score with this reward model instead of log-probabilities
    rubric: Path | None = None  # judge task or --judge: the judge's question (default: the built-in rubric)
    judge: str | None = None  # exact_match, generation: also score each reply against its reference with this judge
    judge_scale: int = 5  # the judge's scores run from 1 to this (--judge, and the judge task on scored replies)
    grader: Path | None = None  # reward task: rate each reply with this OpenAI grader (YAML/JSON) and its row
    columns: dict[str, str] | None = None  # the data's columns under the format's field names (--columns)


def assign_slices(items: list[Item], field: str, data: Path) -> None:
    """Give every item the slice it is scored in: a field of its row, or its input-length tercile."""
    if field == "length":
        lengths = sorted(len(item.shown_input) for item in items)
        low, high = lengths[len(lengths) // 3], lengths[2 * len(lengths) // 3]
        for item in items:
            size = len(item.shown_input)
            item.slice = "short" if size < low else "long" if size > high else "medium"
        return
    for item in items:
        fields = item.example.fields if item.example else {}
        if field not in fields:
            raise UserError(
                f"{data}:{item.line}: --slice-by {field}: the row has no scalar field '{field}'; "
                f"fix: use one of {', '.join(sorted(fields)) or 'length'}"
            )
        item.slice = str(fields[field])


def reward_task(examples: list[Example], data: Path, options: EvalOptions) -> str:
    """How a reward model is evaluated: pairwise accuracy on pairs, MSE and MAE on scored replies; its one
    baseline is its base model's log-likelihood ranking of pairs."""
    kinds = sorted({example.kind for example in examples})
    task = {("preference",): "preference", ("score",): "regression"}.get(tuple(kinds))
    if task is None:
        raise UserError(
            f"{data}: a reward model is evaluated on {{prompt, chosen, rejected}} pairs (pairwise accuracy) "
            f"or {{prompt, response, score}} rows (MSE, MAE), and this file holds {', '.join(kinds)} rows; "
            f"fix: pass --data with pairs or scored replies"
        )
    if options.reward_model is not None:
        raise UserError(
            "--reward-model scores pairs with another model, and the target is itself a reward model; "
            "fix: drop --reward-model"
        )
    if options.baselines and (task != "preference" or set(options.baselines) != {"base"}):
        raise UserError(
            f"--baseline {', '.join(options.baselines)}: a reward model is compared only with its base "
            f"model's log-likelihood ranking of pairs; fix: use --baseline base on pair data, or none"
        )
    return task


@contextlib.contextmanager
def rows_of(data: Path) -> Iterator[None]:
    """A row a task cannot use (ItemError, 'LINE: ...') reported as FILE:LINE."""
    try:
        yield
    except ItemError as error:
        raise UserError(f"{data}:{error.message}") from None


def check_applicable(task: Any, items: list[Item], options: EvalOptions, data: Path) -> None:
    """Refuse, before any model loads, a rubric, judge or baseline that cannot apply to this task and data."""
    metric_task = metric_task_of(task, items)
    if options.rubric is not None and options.task != "judge" and options.judge is None:
        raise UserError(
            f"--rubric applies to the judge task or to --judge MODEL, not to {options.task} alone; fix: "
            f"add --task judge, or --judge MODEL to score {options.task} replies against their references"
        )
    if options.judge is not None and metric_task not in ("exact_match", "text"):
        what = "rows without a reference reply" if options.task == "generation" else f"--task {options.task}"
        raise UserError(
            f"--judge scores replies against reference answers (--task exact_match, or generation on rows "
            f"with a reference), not {what}; fix: drop --judge, or give each row its reference"
        )
    if (options.judge is not None or metric_task == "rating_agreement") and not 2 <= options.judge_scale <= 9:
        raise UserError(
            f"--judge-scale {options.judge_scale}: the judge's scores run from 1 to 2..9 (one token per "
            f"score); fix: e.g. --judge-scale 5"
        )
    few_shot = [name for name in options.baselines if parse_baseline(name)]
    if few_shot and hasattr(task, "few_shot_problem") and (problem := task.few_shot_problem(items)) is not None:
        with rows_of(data):
            raise problem
    if options.baselines and options.reward_model is not None and options.task in ("preference", "regression"):
        raise UserError(
            f"--baseline {', '.join(options.baselines)}: with --reward-model, --task {options.task} rates "
            f"the replies given in the data whatever model is evaluated, so every system would score the "
            f"same; fix: drop --baseline, or --task reward to rate each model's own replies"
        )


def judge_rubric(task: Any, items: list[Item], options: EvalOptions) -> Rubric | None:
    """The judge's question: for --judge, a reference rubric; for the judge task, a compare rubric on pairs and a
    reference rubric on scored replies. The user's file (--rubric) or the built-in one."""
    if options.judge is not None:
        return load_rubric(options.rubric, "reference")
    if options.task == "judge":
        return load_rubric(options.rubric, "compare" if metric_task_of(task, items) == "judge" else "reference")
    return None


def reference_text(expected: Any) -> str:
    """A row's reference as the judge reads it: the answer, or every accepted answer."""
    answers = [expected] if isinstance(expected, str) else [str(answer) for answer in expected]
    return answers[0] if len(answers) == 1 else "any one of: " + "; ".join(answers)


def judge_systems(
    target: str,
    engine: Engine | None,
    rubric: Rubric | None,
    items: list[Item],
    predictions: dict[str, list],
    options: EvalOptions,
    timing: dict[str, float],
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """With --judge: each system's replies scored 1..scale against the references ({system: [score per item]}),
    and who judged with which rubric (eval.json's "judge"). Nothing without --judge."""
    if options.judge is None:
        return {}, {}
    started = time.perf_counter()
    judge = (
        Judge(engine, rubric, options.batch_size, options.judge)
        if options.judge == target and engine
        else Judge.load(options.judge, rubric, options.batch_size)
    )  # the target itself judges without a reload
    prompts = [item.prompt for item in items]
    references = [reference_text(item.expected) for item in items]
    ratings = {
        name: [
            rating.score
            for rating in judge.rate_against(prompts, references, [str(r) for r in replies], options.judge_scale)
        ]
        for name, replies in predictions.items()
    }
    timing["judge_s"] = round(time.perf_counter() - started, 2)
    return ratings, {**judge.provenance(), "scale": options.judge_scale}


def evaluate(target: str, data: Path, options: EvalOptions, output: Path) -> dict[str, Any]:
    config = run_config(target)
    examples = load_examples(data, columns=options.columns)[: options.max_examples]
    reward_target = is_reward_model(target)  # it rates replies: the data says how it is scored
    classifier = Classifier.load(Path(target)) if is_classifier_run(target) else None
    if classifier is not None and options.task != "classification":
        raise UserError(
            f"{target} is a classifier (method classify): it names a label; fix: evaluate it with --task "
            f"classification (not {options.task})"
        )
    if reward_target:
        options = dataclasses.replace(options, task=reward_task(examples, data, options))
    task = tasks.get(options.task, key="--task")
    with rows_of(data):
        items = task.items(examples)
    if not items:
        raise UserError(f"{data}: no examples to evaluate")
    if options.slice_by:
        assign_slices(items, options.slice_by, data)
    check_applicable(task, items, options, data)
    if classifier is not None:
        check_known_labels(items, classifier.labels, data)
    rubric = judge_rubric(task, items, options)  # a rubric file is read and checked before any model loads
    rated = reward_target or options.reward_model is not None
    grader = grader_rater(options.grader, options.task, rated) if options.grader else None  # and so is a grader
    engine = None if reward_target or classifier is not None else Engine.load(target)
    labels = label_set(items, config) if options.task == "classification" else []
    context = Context(
        Sampling(max_new_tokens=options.max_new_tokens),
        options.batch_size,
        options.method,
        labels,
        rubric=rubric if options.task == "judge" else None,
        scale=options.judge_scale,
    )
    if reward_target or options.reward_model is not None:
        if options.task not in ("preference", "regression", "reward"):
            raise UserError(
                f"--reward-model rates pairs (--task preference), scored replies (--task regression) or "
                f"the model's own replies (--task reward), not {options.task}; fix: add --task reward"
            )
        context.reward = RewardScorer.load(target if reward_target else options.reward_model)
    if grader is not None:
        context.reward = grader
    shots_file = options.shots_file or (config.data.train if config else None)

    predictions, timing, loaded = {}, {}, {}
    for name in ("target", *options.baselines):
        shots = parse_baseline(name) if name != "target" else 0
        prefix: list = []
        if shots:
            if shots_file is None:
                raise UserError("--baseline few-shot:K needs training examples; fix: pass --shots FILE.jsonl")
            shot_columns = options.columns if options.shots_file else run_columns(config)
            prefix = few_shot_prefix(
                load_examples(shots_file, columns=shot_columns),
                shots,
                labels,
                config.data.system_prompt if config else None,
                options.seed,
                options.task,
                source=str(shots_file),
            )
        started = time.perf_counter()
        reward = None if reward_target and name != "target" else context.reward  # the base has no reward head
        if name == "target" and classifier is not None:  # its head names a label; the baselines generate one
            probabilities = classifier.probabilities([item.prompt for item in items], options.batch_size)
            predictions[name] = [answer.label for answer in classifier.answers(probabilities)]
        else:
            with system_context(engine, name, config, loaded) as system, rows_of(data):
                context_now = dataclasses.replace(context, prefix=prefix, reward=reward)
                predictions[name] = task.predict(system, items, context_now)
        timing[f"{name}_s"] = round(time.perf_counter() - started, 2)
    ratings, judged_by = judge_systems(target, engine, rubric, items, predictions, options, timing)

    result = assemble(target, data, options, task, items, predictions, labels, timing, ratings)
    if classifier is not None:
        result["calibration"] = calibration_section(
            probabilities.numpy(),
            [item.expected for item in items],
            classifier.labels,
            classifier.calibration,
            predictions["target"],
            options.resamples,
            options.seed,
        )
    if judged_by:
        result["judge"] = judged_by
    if options.task == "preference" and "base" in options.baselines and context.reward is None:
        # a tuned model against its base, both ranking by log-likelihood: the implicit reward DPO trains
        result["comparisons"]["base"]["implicit_reward_accuracy"] = implicit_reward_accuracy(
            predictions["target"], predictions["base"], resamples=options.resamples, seed=options.seed
        )
    output.mkdir(parents=True, exist_ok=True)
    (output / EVAL_FILE).write_text(json.dumps(result, indent=1, ensure_ascii=False), encoding="utf-8")
    from tunesmith.eval.report import write_report

    metrics_jsonl = Path(target) / "metrics.jsonl"
    write_report(result, output / "report.html", metrics_jsonl if metrics_jsonl.is_file() else None)
    return result


def check_known_labels(items: list[Item], labels: list[str], data: Path) -> None:
    """A classifier names only the labels it was trained on: an expected label outside them is refused by line."""
    known = set(labels)
    problems = [
        Problem(
            f"{data}:{item.line}",
            f"label {item.expected!r} is not among the classifier's {len(labels)} labels (training never saw it); "
            f"fix: drop the row, or train with examples of it",
        )
        for item in items
        if item.expected not in known
    ]
    if problems:
        raise UserError(f"{data}: {len(problems)} row(s) have labels the classifier cannot name", problems)


def assemble(
    target: str,
    data: Path,
    options: EvalOptions,
    task: Any,
    items: list[Item],
    predictions: dict[str, list],
    labels: list[str],
    timing: dict[str, float],
    ratings: dict[str, list[float]] | None = None,
) -> dict[str, Any]:
    """The eval.json document: metrics, baselines, comparisons, error analysis and every example. `ratings` are
    the judge's scores of each system's replies (--judge), scored and compared as the metric judge_score."""
    expected = [item.expected for item in items]
    stats = dict(resamples=options.resamples, seed=options.seed)
    metric_task = metric_task_of(task, items)
    result: dict[str, Any] = {
        "target": str(target),
        "task": options.task,
        "data": str(data.resolve()),
        "n": len(items),
        "settings": {
            **stats,
            "baselines": list(options.baselines),
            **task_settings(task, metric_task, options, labels),
        },
        "timing": timing,
    }
    if metric_task is not None:
        rated = ratings or {}

        def system_metrics(name: str) -> dict[str, Any]:
            scores = metric_functions.score(metric_task, predictions[name], expected, **stats)
            return {**scores, **(metric_functions.score("rating", rated[name], None, **stats) if rated else {})}

        def comparison(name: str) -> dict[str, Any]:
            compared = metric_functions.compare(
                metric_task, predictions["target"], predictions[name], expected, **stats
            )
            if rated:
                compared.update(metric_functions.compare("rating", rated["target"], rated[name], None, **stats))
            return dict(sorted(compared.items(), key=lambda entry: entry[0] == "mcnemar_p"))  # the p-value last

        result["metrics"] = system_metrics("target")
        result["baselines"] = {name: {"metrics": system_metrics(name)} for name in options.baselines}
        result["comparisons"] = {name: comparison(name) for name in options.baselines}
    if options.task == "classification":
        for name, block in (("target", result), *((n, result["baselines"][n]) for n in options.baselines)):
            block["per_label"] = metric_functions.per_label(predictions[name], expected, **stats)
            block["confusion"] = metric_functions.confusion(predictions[name], expected)
    result["errors"] = error_analysis(task, items, predictions, options, metric_task, ratings or {})
    result["examples"] = [example_row(task, item, predictions, options.baselines, ratings or {}) for item in items]
    if is_run_dir(Path(target)):
        result["run"] = {"metrics_jsonl": str(Path(target) / "metrics.jsonl")}
    return result


def task_settings(task: Any, metric_task: str | None, options: EvalOptions, labels: list[str]) -> dict[str, Any]:
    """The options that shaped this task's predictions (eval/tasks.py: `settings`), and only those: a perplexity
    report shows no decoding or label settings."""
    values = {
        "method": options.method,
        "labels": len(labels),
        "max_new_tokens": options.max_new_tokens,
        "reward_model": options.reward_model,
        "grader": str(options.grader) if options.grader else None,
        "judge": options.judge,
        "rubric": str(options.rubric) if options.rubric else None,
        "judge_scale": options.judge_scale,
    }
    names = list(task.settings)
    if options.judge is not None:
        names += ["judge", "rubric", "judge_scale"]
    if metric_task != "rating_agreement" and options.judge is None:
        names = [name for name in names if name != "judge_scale"]  # only a judge's 1..K scores have a scale
    return {name: values[name] for name in dict.fromkeys(names) if values[name] is not None}


def shown(prediction: Any) -> Any:
    return list(prediction) if isinstance(prediction, tuple) else prediction


def example_row(
    task: Any, item: Item, predictions: dict[str, list], baselines: tuple[str, ...], ratings: dict[str, list[float]]
) -> dict[str, Any]:
    def system(name: str) -> dict[str, Any]:
        entry = {
            "predicted": shown(predictions[name][item.index]),
            "correct": task.correct(predictions[name][item.index], item.expected),
        }
        return {**entry, "judge_score": ratings[name][item.index]} if ratings else entry

    row = {
        "index": item.index,
        "line": item.line,
        "input": item.shown_input,
        "expected": item.expected,
        **system("target"),
    }
    if baselines:
        row["baselines"] = {name: system(name) for name in baselines}
    return row


def error_analysis(
    task: Any,
    items: list[Item],
    predictions: dict[str, list],
    options: EvalOptions,
    metric_task: str | None,
    ratings: dict[str, list[float]],
) -> dict[str, Any]:
    target = predictions["target"]
    correct = [task.correct(target[i.index], i.expected) for i in items]
    errors: dict[str, Any] = {}
    if options.task == "classification":
        errors["top_confusions"] = metric_functions.top_confusions(target, [i.expected for i in items])
    if any(c is False for c in correct):
        errors["worst"] = [
            {"index": i.index, "input": i.shown_input, "expected": i.expected, "predicted": shown(target[i.index])}
            for i, c in zip(items, correct)
            if c is False
        ][:WORST_SHOWN]
    elif options.task == "regression":
        scored = [
            (abs(target[i.index] - i.expected) if target[i.index] is not None else float("inf"), i) for i in items
        ]
        errors["worst"] = [
            {
                "index": i.index,
                "input": i.shown_input,
                "expected": i.expected,
                "predicted": target[i.index],
                "score": None if err == float("inf") else err,
            }
            for err, i in sorted(scored, key=lambda pair: -pair[0])[:WORST_SHOWN]
        ]
    errors["regressions"] = [
        {
            "index": i.index,
            "input": i.shown_input,
            "expected": i.expected,
            "predicted": shown(target[i.index]),
            "baseline": name,
            "baseline_predicted": shown(predictions[name][i.index]),
        }
        for name in options.baselines
        for i, c in zip(items, correct)
        if c is False and task.correct(predictions[name][i.index], i.expected) is True
    ][:WORST_SHOWN]
    slices = sorted({i.slice for i in items if i.slice is not None})
    if slices and metric_task is not None:
        errors["per_slice"] = {
            s: slice_metrics([i for i in items if i.slice == s], target, metric_task, ratings.get("target"), options)
            for s in slices
        }
    return errors


def slice_metrics(
    members: list[Item], target: list, metric_task: str, ratings: list[float] | None, options: EvalOptions
) -> dict[str, Any]:
    """The target's metrics on one slice of the items (and its judge_score there, when judged)."""
    stats = dict(resamples=options.resamples, seed=options.seed)
    scores = metric_functions.score(
        metric_task, [target[i.index] for i in members], [i.expected for i in members], **stats
    )
    if ratings is not None:
        scores.update(metric_functions.score("rating", [ratings[i.index] for i in members], None, **stats))
    return scores


def format_summary(result: dict[str, Any]) -> str:
    """The comparison table printed at the end of `tunesmith eval`: the task's headline metrics per system."""
    if "metrics" not in result:
        return f"{result['n']} generations saved side by side"
    names = [name for name in tasks.get(result["task"]).headline if name in result["metrics"]]
    rows = [("system", *names)]
    target = "tuned" if result.get("run") else "target"
    for name, metrics in ((target, result["metrics"]), *((n, b["metrics"]) for n, b in result["baselines"].items())):
        rows.append((name, *(cell(metrics[m], rate=metric_functions.is_share(m)) for m in names)))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(value).ljust(width) for value, width in zip(row, widths)) for row in rows]
    for name, comparison in result.get("comparisons", {}).items():
        diffs = ", ".join(f"{m} {difference(comparison[m])}" for m in names)
        p = f", McNemar p={comparison['mcnemar_p']:.2g}" if "mcnemar_p" in comparison else ""
        lines.append(f"{target} - {name}: {diffs}{p}")
        if "implicit_reward_accuracy" in comparison:
            implicit = comparison["implicit_reward_accuracy"]
            lines.append(
                f"implicit reward (log p_tuned - log p_{name}) ranks the chosen reply first: {cell(implicit)} "
                f"(no preference: 50%); minus {name}'s log-likelihood ranking: "
                f"{difference(implicit['vs_base_loglik'])}"
            )
    return "\n".join(lines)
