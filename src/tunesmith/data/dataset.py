"""From the data config to tokenised train and validation sets, with every problem reported at once; and
`check_file`, which is `tunesmith validate`: every problem in a file, and with a tokenizer each example's length."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.config.schema import DataConfig
from tunesmith.data.formats import Example
from tunesmith.data.tokenize import ChatTokenizer, TokenizedExample, TokenizedPair, Unit
from tunesmith.data.validate import load_file, report
from tunesmith.errors import Problem, UserError
from tunesmith.registry import methods


@dataclass
class PreparedData:
    train: list[Unit]  # examples, or preference pairs
    validation: list[Unit]
    format: str
    skipped_rows: int = 0  # invalid rows skipped because data.skip_bad_rows is on
    dropped_long: int = 0  # examples longer than max_length dropped (truncation: drop)
    truncated: int = 0  # examples cut to max_length (truncation: truncate or split)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "train_examples": len(self.train),
            "validation_examples": len(self.validation),
            "train_tokens": sum(len(e) for e in self.train),
            "skipped_rows": self.skipped_rows,
            "dropped_long": self.dropped_long,
            "truncated": self.truncated,
        }


def fit_length(
    example: TokenizedExample, max_length: int, policy: str, where: str
) -> tuple[list[TokenizedExample], Problem | None]:
    """Apply the truncation policy to one example: (examples to keep, problem to report)."""
    if len(example) <= max_length:
        return [example], None
    if policy == "drop":
        return [], None
    if policy == "truncate":
        return [TokenizedExample(example.input_ids[:max_length], example.loss_mask[:max_length], example.line)], None
    if policy == "split":
        return [
            TokenizedExample(example.input_ids[i : i + max_length], example.loss_mask[i : i + max_length], example.line)
            for i in range(0, len(example), max_length)
        ], None
    return [], Problem(
        where,
        f"example is {len(example)} tokens, longer than data.max_length={max_length}; fix: raise "
        f"data.max_length, shorten the example, or set data.truncation to drop or truncate",
    )


def fit_input(
    example: TokenizedExample, max_length: int, policy: str, where: str
) -> tuple[list[TokenizedExample], Problem | None]:
    """The truncation policy on a classifier's input, which is read at its last token: `truncate` keeps its last
    max_length tokens (the end of the message and the generation prompt), not its first."""
    if policy == "truncate":
        return [keep_end(example, max_length)], None
    return fit_length(example, max_length, "error" if policy == "split" else policy, where)


def keep_end(example: TokenizedExample, max_length: int) -> TokenizedExample:
    """The last max_length tokens of an example (all of it when it is no longer)."""
    if len(example) <= max_length:
        return example
    return TokenizedExample(example.input_ids[-max_length:], example.loss_mask[-max_length:], example.line)


def tokenize_file(
    path: Path,
    config: DataConfig,
    chat: ChatTokenizer,
    accepts: tuple[str, ...],
    method: str,
    prepared: PreparedData,
    labels: dict[str, int] | None = None,
) -> tuple[list[Unit], list[Problem]]:
    loaded = load_file(path, config.format, accepts, method, columns=config.columns)
    prepared.format = loaded.format
    problems = list(loaded.problems)
    if loaded.problems and config.skip_bad_rows and not loaded.file_problems:
        prepared.skipped_rows += len(loaded.problems)
        problems = []
    if config.truncation == "split" and loaded.examples and loaded.examples[0].kind != "text":
        raise UserError(
            f"data.truncation=split only applies to raw text (format text), not {loaded.format}; "
            f"fix: use drop or truncate"
        )
    tokenized, length_problems = tokenize_examples(loaded.examples, path, config, chat, prepared, labels)
    return tokenized, problems + length_problems


def tokenize_examples(
    examples: list[Example],
    path: Path,
    config: DataConfig,
    chat: ChatTokenizer,
    prepared: PreparedData,
    labels: dict[str, int] | None = None,
) -> tuple[list[Unit], list[Problem]]:
    """Tokenise, apply the truncation policy, and refuse examples with nothing to train (training and validate).
    With `labels` (label -> class index: method classify), each example is its input and the class of its final
    reply; a label outside them is a problem of its line."""
    tokenized: list[Unit] = []
    problems: list[Problem] = []
    for example in examples:
        where = f"{path}:{example.line}"
        if labels is not None:
            label = example.messages[-1]["content"]
            if label not in labels:
                problems.append(
                    Problem(
                        where,
                        f"label {label!r} is not among the {len(labels)} labels of the "
                        f"training data; fix: train on rows of this label too, or drop it",
                    )
                )
                continue
            encoded = chat.tokenize_input(example.messages[:-1], example.line)
            kept, problem = fit_input(encoded, config.max_length, config.truncation, where)
            problems += [problem] if problem else []
            prepared.dropped_long += config.truncation == "drop" and not kept
            prepared.truncated += bool(kept) and len(kept[0]) < len(encoded)
            if kept:  # an input is one sequence: a split's later pieces would not end at the generation prompt
                kept[0].label = labels[label]
                tokenized.append(kept[0])
            continue
        encoded = chat(example)
        if isinstance(encoded, TokenizedPair):
            pair, problem = fit_pair(encoded, config.max_length, config.truncation, where, prepared)
            problems += [problem] if problem else []
            tokenized += [pair] if pair else []
            continue
        kept, problem = fit_length(encoded, config.max_length, config.truncation, where)
        if problem:
            problems.append(problem)
        prepared.dropped_long += config.truncation == "drop" and not kept
        prepared.truncated += bool(kept) and (len(kept) > 1 or len(kept[0]) < len(encoded))
        for piece in kept:
            piece.score = encoded.score
            if any(piece.loss_mask[1:]):
                tokenized.append(piece)
            elif piece is kept[0]:  # a split document's one-token tail is harmless to drop; a whole example is not
                problems.append(Problem(where, no_target_message(encoded, piece, config.max_length)))
    return tokenized, problems


def fit_pair(
    pair: TokenizedPair, max_length: int, policy: str, where: str, prepared: PreparedData
) -> tuple[TokenizedPair | None, Problem | None]:
    """The truncation policy on both sides of a preference pair (max_length holds for each); both or neither kept."""
    sides = []
    for name, side in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        kept, problem = fit_length(side, max_length, policy, where)
        if problem:
            return None, Problem(where, f"the {name} side: {problem.message}")
        if kept and not any(kept[0].loss_mask[1:]):
            return None, Problem(where, f"the {name} side: {no_target_message(side, kept[0], max_length)}")
        sides.append(kept[0] if kept else None)
    if None in sides:
        prepared.dropped_long += 1
        return None, None
    prepared.truncated += len(sides[0]) + len(sides[1]) < len(pair)
    return TokenizedPair(sides[0], sides[1], pair.line), None


def no_target_message(encoded: TokenizedExample, piece: TokenizedExample, max_length: int) -> str:
    if len(piece) < len(encoded):
        return (
            f"after truncation to data.max_length={max_length} no trained token remains (the prompt alone is longer); "
            f"fix: raise data.max_length, shorten the prompt, or set data.truncation=drop"
        )
    return "no token of this example is trained (the assistant text is empty after templating)"


def prepare_data(
    config: DataConfig,
    tokenizer: Any,
    accepts: tuple[str, ...],
    method: str,
    seed: int,
    labels: list[str] | None = None,
) -> PreparedData:
    """Load, check, tokenise and split the data; refuse it with a full report unless skip_bad_rows is on. With
    `labels` (method classify), each example is an input and the index of its label among them."""
    chat = ChatTokenizer(
        tokenizer, loss_on=config.loss_on, system_prompt=config.system_prompt, reasoning=config.reasoning
    )
    prepared = PreparedData([], [], config.format)
    index = {label: number for number, label in enumerate(labels)} if labels is not None else None
    train, problems = tokenize_file(config.train, config, chat, accepts, method, prepared, index)
    validation: list[TokenizedExample] = []
    if config.validation is not None:
        validation, val_problems = tokenize_file(config.validation, config, chat, accepts, method, prepared, index)
        problems += val_problems
    if problems:
        raise UserError(
            f"the data has {len(problems)} problem(s); nothing was trained "
            f"(fix them, or set data.skip_bad_rows=true to skip invalid rows)\n{report(problems)}"
        )
    if config.val_fraction is not None:
        train, validation = split_validation(train, config.val_fraction, seed)
    if not train:
        raise UserError(f"{config.train}: no usable training examples remain")
    prepared.train, prepared.validation = train, validation
    return prepared


def split_validation(examples: list[TokenizedExample], fraction: float, seed: int) -> tuple[list, list]:
    """A seeded random `fraction` of the examples (at least one) becomes validation; order is kept."""
    count = max(1, round(len(examples) * fraction))
    if count >= len(examples):
        raise UserError(
            f"data.val_fraction={fraction} leaves no training examples out of {len(examples)}; fix: lower it"
        )
    chosen = set(random.Random(f"tunesmith-val:{seed}").sample(range(len(examples)), count))
    return ([e for i, e in enumerate(examples) if i not in chosen], [e for i, e in enumerate(examples) if i in chosen])


def load_examples(path: Path, format_name: str = "auto", columns: dict[str, str] | None = None) -> list[Example]:
    """Examples of a file for evaluation or inference (`columns`: field -> the file's column); any invalid row is an
    error."""
    loaded = load_file(path, format_name, columns=columns)
    if loaded.problems:
        raise UserError(f"{path}: the data has {len(loaded.problems)} problem(s)\n{report(loaded.problems)}")
    return loaded.examples


@dataclass
class CheckReport:
    problems: list[Problem]
    text: str


def check_file(
    path: Path,
    format_name: str = "auto",
    method: str = "sft",
    tokenizer: Any = None,
    max_length: int = 1024,
    columns: dict[str, str] | None = None,
) -> CheckReport:
    """Parse and convert every row for `method` (`columns` mapping fields to the file's columns first); with a
    model's tokenizer, also check each example's token length."""
    accepts = methods.info(method)["accepts"] if method in methods else None
    if accepts is None:
        methods.get(method, key="--method")
    loaded = load_file(path, format_name, accepts, method, columns=columns)
    problems = list(loaded.problems)
    if tokenizer is not None and loaded.examples:
        from tunesmith.config.schema import DataConfig
        from tunesmith.data.tokenize import ChatTokenizer

        chat = ChatTokenizer(tokenizer)
        config = DataConfig(train=path, max_length=max_length, columns=columns or {})
        problems += tokenize_examples(loaded.examples, path, config, chat, PreparedData([], [], loaded.format))[1]
    problems.sort(key=lambda p: _line_of(p.where))
    if problems:
        summary = (
            f" in {loaded.rows} rows (format {loaded.format})"
            if loaded.read_whole
            else "; the file was read no further"
        )
        return CheckReport(problems, f"{report(problems, limit=200)}\n{path}: {len(problems)} problem(s){summary}")
    checked = "" if tokenizer is None else f", all within {max_length} tokens"
    return CheckReport(
        [], f"{path}: {len(loaded.examples)} examples OK (format {loaded.format}, method {method}{checked})"
    )


def _line_of(where: str) -> int:
    tail = where.rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else 0
