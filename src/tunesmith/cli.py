"""The `tunesmith` command: parse arguments, call one function, print its result. No logic lives here.

Exit codes: 0 success, 2 a user mistake (printed plainly, no traceback), 1 anything else.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import warnings
from pathlib import Path

from tunesmith.allocator import bound_kernel_caches, reexec_with_jemalloc
from tunesmith.errors import TrainingStopped, UserError
from tunesmith.offline import stay_offline


def cmd_train(args: argparse.Namespace) -> int:
    from tunesmith.config.loading import load_config, resolve_paths
    from tunesmith.registry import methods
    from tunesmith.train import distributed

    config = resolve_paths(load_config(args.config, args.overrides))  # a config mistake stops here, before any launch
    check_nproc(args.nproc)
    if args.nproc is not None and args.nproc > 1:
        check_gpu_count(args.nproc, config.train.device)
        return launch_processes(args)
    try:
        result = methods.get(config.method, key="method")(config)
    finally:
        distributed.stop(distributed.current_world())
    if not distributed.current_world().main:
        return 0
    if result.already_complete:
        print(finished_run_text(result, config.train))
    else:
        print(
            f"trained {result.steps} steps; final loss {loss_text(result.final_loss)}; "
            f"best validation loss {loss_text(result.best_val_loss)}"
        )
        print(f"{result.tokens_per_s:,.0f} tokens/s; peak memory {result.peak_rss_mb:,.0f} MB")
    print(f"saved {result.output}")
    return 0


def loss_text(loss: float | None) -> str:
    return "none" if loss is None else f"{loss:.4f}"


def finished_run_text(result, train) -> str:
    """A finished run run again: that it is complete, its final loss (from metrics.jsonl), how to train it further."""
    loss = f"{result.final_loss:.4g}" if result.final_loss is not None else "not logged"
    more = f"train.max_steps above {result.steps} (e.g. train.max_steps={2 * result.steps})"
    if result.stopped_early:
        further = "it stopped early (train.early_stopping); to train further, start a new run with another output_dir"
    elif train.max_steps is not None:
        further = f"to train further, raise {more}, or train afresh with another output_dir"
    else:
        further = (
            f"to train further, raise train.epochs above {train.epochs} or set {more}, or train afresh with "
            f"another output_dir"
        )
    return f"{result.run_dir} is already complete: {result.steps} steps; final loss {loss}\n{further}"


def check_gpu_count(nproc: int, device: str) -> None:
    """On GPUs each process takes one of this machine's; more processes than GPUs would share them."""
    import torch

    gpus = torch.cuda.device_count() if device != "cpu" and torch.cuda.is_available() else 0
    if gpus and nproc > gpus:
        raise UserError(
            f"--nproc={nproc}: this machine has {gpus} GPU{'s' if gpus > 1 else ''}, one per process; "
            f"fix: --nproc {gpus} (or train.device=cpu to train on CPU processes)"
        )


def launch_processes(args: argparse.Namespace) -> int:
    """`tunesmith train --nproc N`: this command on N processes of this machine, started by torchrun's own
    launcher (what `torchrun --standalone --nproc-per-node N -m tunesmith train ...` does). Each gets
    cores/N CPU threads unless OMP_NUM_THREADS says otherwise."""
    import logging
    import uuid

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    for name in [name for name in logging.root.manager.loggerDict if name.startswith("torch.distributed.elastic")]:
        logging.getLogger(name).setLevel(logging.CRITICAL)  # the ranks report their own errors and stops
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
    launch = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=args.nproc,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.5,
    )
    try:
        config = [str(args.config)] if args.config is not None else []
        elastic_launch(launch, sys.executable)("-m", "tunesmith", "train", *config, *args.overrides)
    except ChildFailedError as error:
        codes = [failure.exitcode for _, failure in sorted(error.failures.items())]
        return next((code for code in codes if code > 0), 1)  # a rank's own exit code (2: a user mistake)
    except SignalException as error:  # Ctrl-C or SIGTERM: passed to the ranks, which checkpointed and stopped
        return 128 + int(error.sigval)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from tunesmith.config.loading import load_config, resolve_paths
    from tunesmith.train.plan import describe, plan_run

    config = resolve_paths(load_config(args.config, args.overrides))
    check_nproc(args.nproc)
    print(describe(plan_run(config, processes=args.nproc or 1, measure=args.measure)))
    return 0


def check_nproc(nproc: int | None) -> None:
    if nproc is not None and nproc < 1:
        raise UserError(
            f"--nproc={nproc}: the number of processes must be at least 1; fix: --nproc 2 (or leave it out)"
        )


def cmd_validate(args: argparse.Namespace) -> int:
    from tunesmith.data.dataset import check_file
    from tunesmith.data.files import parse_columns
    from tunesmith.models import load_tokenizer

    tokenizer = load_tokenizer(args.model) if args.model else None
    report = check_file(args.file, args.format, args.method, tokenizer, args.max_length, parse_columns(args.columns))
    print(report.text, file=sys.stderr if report.problems else sys.stdout)
    return 2 if report.problems else 0


def cmd_import(args: argparse.Namespace) -> int:
    from tunesmith.data.tickets import TicketOptions, format_report, import_tickets

    options = TicketOptions(
        mapping=args.mapping,
        flavour=args.flavour,
        system_prompt=args.system_prompt,
        redact=not args.no_redact,
        include_subject=args.include_subject,
        trailing=args.trailing,
        force=args.force,
    )
    print(format_report(import_tickets(args.file, args.output, options)))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import subprocess

    runner = Path(__file__).resolve().parents[2] / "bench" / "run.py"
    if not runner.is_file():
        raise UserError(
            "tunesmith bench runs from a source checkout (it needs bench/run.py); fix: clone the "
            "repository and install it with pip install -e '.[bench]'"
        )
    return subprocess.call([sys.executable, str(runner), *args.bench_args])


class HelpConfig(argparse.Action):
    """`tunesmith train --help-config`: every config key with its default and meaning, from the schema itself."""

    def __call__(self, parser, namespace, values, option_string=None):
        from tunesmith.config.schema import describe_fields
        from tunesmith.data.formats import describe_formats

        rows = describe_fields()
        width = max(len(key) for key, _, _ in rows)
        for key, default, description in rows:
            print(f"{key:<{width}}  {description} [default: {default}]")
        print(f"\n{describe_formats()}")  # data.format's values, from the format registry
        parser.exit()


class DefaultsFormatter(argparse.HelpFormatter):
    """Help that ends each option with its default as a user would type it (`(default: 256)`). Options with no
    default, switches (off unless given) and help that already names its default are shown as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if has_default(action) and "default" not in text:
            text = f"{text} (default: {str(action.default).replace('%', '%%')})".strip()
        return text

    def _format_action(self, action: argparse.Action) -> str:
        if not (action.help or "").strip() and has_default(action):  # argparse prints nothing for an empty help
            action = copy.copy(action)
            action.help = self._get_help_string(action)
        return super()._format_action(action)


def has_default(action: argparse.Action) -> bool:
    shown = action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE)
    nothing = (
        action.default is None or action.default is False or action.default is argparse.SUPPRESS or action.default == []
    )  # by identity: a default of 0 or 0.0 is shown
    return bool(shown) and not nothing


class Parser(argparse.ArgumentParser):
    """tunesmith's parser: every command's help shows its defaults (subparsers are made of this class too)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)


def installed_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tunesmith")
    except PackageNotFoundError:  # run from a source tree that was never installed
        from tunesmith import __version__

        return __version__


def split_train_arguments(args: argparse.Namespace) -> None:
    """`tunesmith train` takes a YAML file and/or overrides: a first argument with '=' that is no file is an
    override (`tunesmith train data.train=t.jsonl model=NAME`)."""
    if args.config is not None and "=" in args.config and not Path(args.config).is_file():
        args.overrides.insert(0, args.config)
        args.config = None
    if args.config is None and not args.overrides:
        command = args.command
        raise UserError(
            f"tunesmith {command} needs a config: a YAML file, key=value overrides, or both; fix: tunesmith "
            f"{command} CONFIG.yaml, or tunesmith {command} data.train=train.jsonl [model=NAME train.epochs=2 ...] "
            "(tunesmith train --help-config lists every key)"
        )
    args.config = Path(args.config) if args.config is not None else None


def check_targets(args: argparse.Namespace) -> None:
    """A run or model a command is pointed at (its TARGET, label's --policy) that names a path which does not
    exist is refused first, whatever else the command would check before loading it."""
    from tunesmith.models.loading import check_target

    for name in ("target", "policy"):
        if isinstance(getattr(args, name, None), str):
            check_target(getattr(args, name))


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="tunesmith", description="Fine-tune language models on your own data.")
    parser.add_argument("--version", action="version", version=f"tunesmith {installed_version()}")
    commands = parser.add_subparsers(dest="command", required=True)  # every command's parser is a Parser too

    train = commands.add_parser("train", help="run one training recipe; writes a run directory")
    train.add_argument(
        "config",
        nargs="?",
        help="the YAML config; optional: key=value overrides alone make a "
        "config (e.g. tunesmith train data.train=train.jsonl train.epochs=2)",
    )
    train.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.lr=1e-4")
    train.add_argument("--help-config", action=HelpConfig, nargs=0, help="list every config key and exit")
    train.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="train on N processes of this machine (torchrun; "
        "train.parallel picks DDP or FSDP); for several machines run torchrun yourself (docs/distributed.md)",
    )
    train.set_defaults(handler=cmd_train)

    plan = commands.add_parser(
        "plan", help="a run's memory (per part, and its peak on this machine) and time, before it trains"
    )
    plan.add_argument("config", nargs="?", help="the YAML config `tunesmith train` would take")
    plan.add_argument("overrides", nargs="*", help="key.sub=value overrides, as train takes them")
    plan.add_argument("--nproc", type=int, metavar="N", help="plan for N processes (train.parallel: ddp or fsdp)")
    plan.add_argument("--measure", action="store_true", help="time 5 real steps (its own process, a scratch directory)")
    plan.set_defaults(handler=cmd_plan)

    validate = commands.add_parser("validate", help="check a data file before any compute")
    validate.add_argument(
        "file", type=Path, help="the data: .jsonl (or .json), .csv, .tsv (with a header row) or .parquet"
    )
    validate.add_argument(
        "--format",
        default="auto",
        help="the data format (default: detect it; `tunesmith train --help-config` lists them)",
    )
    validate.add_argument(
        "--columns",
        metavar="FIELD=COLUMN,...",
        help="your columns under the format's field names, "
        "e.g. question=q,answer=a (what data.columns does in a config)",
    )
    validate.add_argument("--method", default="sft", help="the method the data is for (default: sft)")
    validate.add_argument("--model", help="also check token lengths with this model's tokenizer")
    validate.add_argument("--max-length", type=int, default=1024, help="longest example in tokens (with --model)")
    validate.set_defaults(handler=cmd_validate)

    importer = commands.add_parser("import", help="turn another tool's export into training data")
    sources = importer.add_subparsers(dest="source", required=True)
    tickets = sources.add_parser(
        "tickets",
        help="helpdesk tickets (Zendesk-, Freshdesk-like or mapped CSV/JSON/JSONL) "
        "→ one conversation per ticket, PII redacted",
    )
    tickets.add_argument(
        "file",
        type=Path,
        help="the export: .csv (one row per message), .json or .jsonl (one object per ticket with its thread)",
    )
    tickets.add_argument("--output", type=Path, required=True, help="the messages-format JSONL file to write")
    tickets.add_argument(
        "--mapping",
        type=Path,
        help="a YAML or JSON file naming the export's columns (ticket_id, "
        "body, role with customer/agent values, timestamp, skip, names; see docs/tickets.md)",
    )
    tickets.add_argument("--flavour", default="auto", help="zendesk or freshdesk (default: detect from the columns)")
    tickets.add_argument("--system-prompt", help="a system message at the start of every conversation")
    tickets.add_argument("--no-redact", action="store_true", help="keep e-mails, phones, card numbers and names")
    tickets.add_argument(
        "--include-subject", action="store_true", help="put the ticket's subject on the customer's first message"
    )
    tickets.add_argument(
        "--trailing",
        default="trim",
        choices=["trim", "skip"],
        help="customer messages after the last agent reply: trim them (default) or skip the ticket",
    )
    tickets.add_argument("--force", action="store_true", help="replace an existing output file")
    tickets.set_defaults(handler=cmd_import)

    from tunesmith import cli_models

    cli_models.add_parsers(commands)
    bench = commands.add_parser(
        "bench", help="side-by-side benchmark against TRL + PEFT (see BENCHMARKS.md)", add_help=False
    )
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="passed to bench/run.py (--help lists them)")
    bench.set_defaults(handler=cmd_bench)
    from tunesmith import cli_eval, cli_service

    cli_eval.add_parsers(commands)
    cli_service.add_parsers(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    bound_kernel_caches()  # training, serving and evaluating meet many shapes (allocator.py)
    stay_offline()  # no library beneath reaches the Hub (offline.py)
    if argv is None and sys.argv[1:2] in (["train"], ["plan"]):  # a real command line: see allocator.py (plan
        # runs under training's allocator, so that what it measures of its own process is what training will hold)
        reexec_with_jemalloc([sys.executable, "-m", "tunesmith", *sys.argv[1:]])
    # transformers' deprecation notices about its own internals (e.g. is_gradient_checkpointing) are not for users.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")
    try:
        parser = build_parser()
        args, unknown = parser.parse_known_args(argv)
        if args.command in ("train", "plan"):  # overrides may come after an option: `train c.yaml --nproc 2 x=1`
            args.overrides += [item for item in unknown if not item.startswith("-")]
            unknown = [item for item in unknown if item.startswith("-")]
            split_train_arguments(args)
        if unknown and args.command != "bench":  # only bench passes its options through (to bench/run.py)
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        if args.command == "bench":
            args.bench_args = unknown + args.bench_args
        if argv is None:  # the `tunesmith` command itself, not a caller's argv (which may want bitsandbytes)
            from tunesmith.models.loading import defer_bitsandbytes

            defer_bitsandbytes()
        check_targets(args)
        return args.handler(args)
    except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except UserError as error:
        if os.environ.get("RANK", "0") == "0":  # every rank of a distributed run stops on it; one says so
            print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except TrainingStopped as error:
        if os.environ.get("RANK", "0") == "0":
            print(f"stopped: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
