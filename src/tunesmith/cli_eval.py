"""The commands that measure a model: `eval` (tuned against baselines, with intervals), `score` (a reward model's
ratings), `classify` (a classifier's labels and probabilities), `label` (RLAIF: a judge labels sampled replies),
`redteam` (refusal rates) and `grade` (an OpenAI grader over a file of samples). Like cli.py, they parse, call one
function and print its result.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tunesmith.errors import UserError


def cmd_eval(args: argparse.Namespace) -> int:
    from tunesmith.config.schema import EvalConfig
    from tunesmith.data.files import parse_columns
    from tunesmith.eval.baselines import run_columns, run_config
    from tunesmith.eval.evaluate import EvalOptions, evaluate, format_summary
    from tunesmith.rundir import is_run_dir

    config = run_config(args.target)
    defaults = config.eval if config else EvalConfig(max_examples=None)  # a model, not a run: every row
    data = args.data or defaults.data
    if data is None:
        raise UserError("no evaluation data; fix: pass --data FILE.jsonl or set eval.data in the run's config")
    options = EvalOptions(
        task=args.task or defaults.task,
        baselines=tuple(args.baseline or defaults.baselines),
        max_examples=args.max_examples or defaults.max_examples,
        method=args.method,
        shots_file=args.shots,
        resamples=args.resamples,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens or defaults.max_new_tokens,
        batch_size=args.batch_size or defaults.batch_size,
        slice_by=args.slice_by,
        reward_model=args.reward_model,
        grader=args.grader,
        rubric=args.rubric,
        # the run's own mapping describes the run's own eval.data
        columns=parse_columns(args.columns) if args.columns or args.data else run_columns(config),
        judge=args.judge,
        judge_scale=args.judge_scale,
    )
    output = args.output or (Path(args.target) if is_run_dir(Path(args.target)) else Path("eval-output"))
    result = evaluate(args.target, data, options, output)
    print(format_summary(result))
    print(f"wrote {output / 'eval.json'} and {output / 'report.html'}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from tunesmith.datagen.scoring import score_file

    result = score_file(args.target, args.data, args.output, args.batch_size)
    print(f"rated {result.replies} replies in {result.rows} rows; mean reward {result.mean_reward:.4g}")
    if result.chosen_wins is not None:
        print(f"chosen rated above rejected in {result.chosen_wins:.1%} of pairs")
    print(f"wrote {result.output}")
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    from tunesmith.datagen.classifying import classify_file

    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: must be at least 1")
    result = classify_file(args.target, args.data, args.output, args.batch_size)
    written = f"; wrote {result.output}" if result.output else ""
    summary = f"classified {result.rows} rows ({result.abstained} abstained){written}"
    print(summary, file=sys.stdout if result.output else sys.stderr)  # on standard output, only the rows
    return 0


def cmd_label(args: argparse.Namespace) -> int:
    from tunesmith.datagen.label import LabelOptions, label

    options = LabelOptions(
        policy=args.policy,
        mode=args.mode,
        samples=args.samples,
        seed=args.seed,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        rubric=args.rubric,
        scale=args.scale,
        max_examples=args.max_examples,
        batch_size=args.batch_size,
        force=args.force,
        **({"judge": args.judge} if args.judge else {}),
    )
    result = label(args.input, args.output, options)
    counts = ", ".join(f"{key} {value}" for key, value in result.counts.items())
    print(f"wrote {result.output} ({counts}); provenance in {result.provenance}")
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    return 0


def cmd_redteam(args: argparse.Namespace) -> int:
    from tunesmith.eval import redteam

    if args.check_classifier is not None:
        print(
            redteam.format_check(
                redteam.check_classifier(args.check_classifier, args.judge, args.max_examples, args.batch_size)
            )
        )
        return 0
    if args.target is None:
        raise UserError(
            "redteam needs a TARGET (a run directory or a model); fix: tunesmith redteam smollm2-135m-instruct"
        )
    options = redteam.RedteamOptions(
        sets=redteam.parse_sets(args.sets),
        prompt_files=tuple(args.prompts or ()),
        max_examples=args.max_examples,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        judge=args.judge,
    )
    result = redteam.run_redteam(args.target, options, args.output)
    print(redteam.format_table(result))
    print(f"wrote {Path(result['output']) / 'redteam.json'} and {Path(result['output']) / 'responses.jsonl'}")
    return 0


def cmd_grade(args: argparse.Namespace) -> int:
    from tunesmith.eval.graders.batch import grade_file, load_grader

    if args.data is None:
        load_grader(args.grader)
        print(f"{args.grader}: the grader is valid")
        return 0
    print(grade_file(args.grader, args.data, args.sample_field, args.output).summary())
    return 0


def add_parsers(commands) -> None:
    evaluate = commands.add_parser("eval", help="evaluate a run or model against baselines, with 95%% intervals")
    evaluate.add_argument("target", help="a run directory (base model + adapter) or a model")
    evaluate.add_argument(
        "--data", type=Path, help="evaluation data, .jsonl/.csv/.tsv/.parquet (default: the run's eval.data)"
    )
    evaluate.add_argument(
        "--columns",
        metavar="FIELD=COLUMN,...",
        help="the data's columns under the format's field names, e.g. question=q,answer=a",
    )
    evaluate.add_argument(
        "--task",
        help="classification | exact_match | regression | perplexity | preference | generation "
        "(free text: ROUGE-L, chrF, BLEU when rows carry a reference reply, else review only) "
        "| judge (the target as a judge: agreement with the human choice of {prompt, chosen, rejected} pairs, "
        "or with the human scores of {prompt, reference, response, score} rows) | reward (the "
        "target's replies to the prompts, rated by --reward-model: mean reward)",
    )
    evaluate.add_argument("--baseline", action="append", help="base, or few-shot:K (repeatable)")
    evaluate.add_argument("--output", type=Path, help="where eval.json and report.html go (default: the run directory)")
    evaluate.add_argument("--max-examples", type=int, help="evaluate the first N rows")
    evaluate.add_argument(
        "--method",
        choices=["constrained", "loglik"],
        default="constrained",
        help="classification: generation constrained to the labels, or log-likelihood ranking",
    )
    evaluate.add_argument("--shots", type=Path, help="few-shot examples (default: the run's training data)")
    evaluate.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples for the intervals")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--max-new-tokens", type=int)
    evaluate.add_argument("--batch-size", type=int)
    evaluate.add_argument(
        "--rubric",
        type=Path,
        help="judge task or --judge: the judge's question, a text file with "
        "{prompt}, {response_a} and {response_b} (pairs) or {prompt}, {reference} and {response} "
        "(--judge; scored replies) (default: the built-in rubric)",
    )
    evaluate.add_argument(
        "--judge",
        metavar="MODEL",
        help="exact_match / generation: a local judge model (name, model or "
        "run directory) also scores every reply against its reference from 1 to --judge-scale: judge_score",
    )
    evaluate.add_argument("--judge-scale", type=int, default=5, help="the judge's scores run from 1 to this (2..9)")
    evaluate.add_argument(
        "--reward-model",
        help="preference / regression task: rate the replies with this reward model "
        "(a reward run or a sequence-classification model directory)",
    )
    evaluate.add_argument(
        "--grader",
        type=Path,
        help="reward task: rate each reply with this OpenAI grader (a YAML/JSON file, docs/graders.md), its row as "
        "the item",
    )
    evaluate.add_argument("--slice-by", help="score per value of this row field, or 'length' for input-length terciles")
    evaluate.set_defaults(handler=cmd_eval)
    score = commands.add_parser("score", help="rate replies with a reward model; writes JSONL with a reward per row")
    score.add_argument(
        "target", help="a reward run directory (method: reward) or a sequence-classification model directory"
    )
    score.add_argument(
        "--data",
        type=Path,
        required=True,
        help="JSONL rows {prompt, response}, or pairs {prompt, chosen, rejected} (both sides rated)",
    )
    score.add_argument("--output", type=Path, help="the rated rows (default: DATA.scored.jsonl beside the input)")
    score.add_argument("--batch-size", type=int, default=16, help="replies scored together")
    score.set_defaults(handler=cmd_score)
    classify = commands.add_parser(
        "classify", help="label a data file with a classifier run: JSONL rows with label, probability and abstained"
    )
    classify.add_argument("target", help="a run directory trained with method: classify")
    classify.add_argument(
        "--data",
        type=Path,
        required=True,
        help='rows to label: {"text"}, {"text", "label"} or {"messages"} (a final assistant turn is the label, '
        "and is not read)",
    )
    classify.add_argument(
        "--output",
        type=Path,
        help="the JSONL file to write: each row with label, probability, abstained and probabilities added "
        "(default: standard output)",
    )
    classify.add_argument("--batch-size", type=int, default=16, help="rows classified together")
    classify.set_defaults(handler=cmd_classify)
    labeller = commands.add_parser(
        "label", help="RLAIF: sample replies from a policy, a judge model labels them; writes preference or score JSONL"
    )
    labeller.add_argument(
        "input",
        type=Path,
        help="prompts: JSONL rows with a prompt (text or messages), or any "
        "conversation, preference or score rows (never overwritten)",
    )
    labeller.add_argument("--policy", required=True, help="the model or run directory whose replies are labelled")
    labeller.add_argument(
        "--output",
        type=Path,
        required=True,
        help="the JSONL file to write (provenance goes next to it, as NAME.provenance.json)",
    )
    labeller.add_argument(
        "--judge",
        help="the judge: a built-in model name, model directory or run directory "
        "(default: the built-in smollm2-135m-instruct)",
    )
    labeller.add_argument(
        "--mode",
        default="compare",
        choices=["compare", "rate"],
        help="compare: {prompt, chosen, rejected} pairs (dpo, reward); rate: {prompt, response, score}",
    )
    labeller.add_argument("--samples", type=int, default=4, help="replies sampled per prompt")
    labeller.add_argument(
        "--rubric",
        type=Path,
        help="the judge's question, a text file with {prompt} and {response_a}, "
        "{response_b} (compare) or {response} and {scale} (rate); default: the built-in rubric",
    )
    labeller.add_argument("--scale", type=int, default=5, help="rate: scores run from 1 to this (at most 9)")
    labeller.add_argument("--seed", type=int, default=0, help="sampling seed")
    labeller.add_argument("--temperature", type=float, default=0.8)
    labeller.add_argument("--top-p", type=float, default=0.95)
    labeller.add_argument("--max-new-tokens", type=int, default=128)
    labeller.add_argument("--max-examples", type=int, help="label the first N prompts")
    labeller.add_argument("--batch-size", type=int, default=8)
    labeller.add_argument("--force", action="store_true", help="replace an existing output file")
    labeller.set_defaults(handler=cmd_label)
    red = commands.add_parser(
        "redteam",
        help="attack prompts through a model: refusal, harmful-compliance and over-refusal rates with 95%% intervals",
    )
    red.add_argument("target", nargs="?", help="a run directory or a model")
    red.add_argument(
        "--sets",
        help="shipped prompt sets, comma-separated: hh-rlhf, xstest-unsafe, xstest-safe "
        "(default: all); an empty value runs only --prompts files",
    )
    red.add_argument(
        "--prompts",
        type=Path,
        action="append",
        help="your own set (repeatable): JSONL rows with a prompt and an optional label, unsafe (default) or safe",
    )
    red.add_argument(
        "--output",
        type=Path,
        help="where redteam.json and responses.jsonl go (default: RUN/redteam or ./redteam-output)",
    )
    red.add_argument(
        "--max-examples",
        type=int,
        help="N evenly spaced prompts of each set (--check-classifier: N evenly spaced rows)",
    )
    red.add_argument("--max-new-tokens", type=int, default=96, help="reply budget; refusals show in the opening")
    red.add_argument("--batch-size", type=int, default=32)
    red.add_argument("--judge", help="also classify replies as refusal or compliance with this judge model")
    red.add_argument(
        "--check-classifier",
        type=Path,
        metavar="FILE",
        help="instead of a target: the refusal "
        "classifiers' agreement with human labels (rows with completion and XSTest's final_label)",
    )
    red.set_defaults(handler=cmd_redteam)

    grade = commands.add_parser(
        "grade", help="run an OpenAI grader (JSON or YAML) over samples, with a 95%% interval; or check it"
    )
    grade.add_argument("grader", type=Path, help="a file holding one grader object (string_check, python, multi, ...)")
    grade.add_argument(
        "data",
        type=Path,
        nargs="?",
        help="rows to grade (.jsonl/.csv/.parquet): each row is the item; without it, only check the grader",
    )
    grade.add_argument("--sample-field", default="sample", help="the rows' field holding the reply to grade")
    grade.add_argument("--output", type=Path, help="write each row's grade (reward, sub-rewards, errors) as JSONL")
    grade.set_defaults(handler=cmd_grade)
