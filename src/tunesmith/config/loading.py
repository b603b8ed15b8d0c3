"""Reading a config: YAML with the line of every key, `key.sub=value` overrides, and clear errors; writing the
resolved config into the run directory.

Loading reports every problem at once, each as `FILE:LINE: key: problem (got VALUE); fix`, with a
"did you mean" for misspelt keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from tunesmith.config.schema import Config
from tunesmith.errors import Problem, UserError, did_you_mean

Location = dict[tuple[str, ...], str]  # key path -> "FILE:LINE" or "command line"


def _locations(
    node: yaml.Node, source: str, path: tuple[str, ...] = (), duplicates: list[Problem] | None = None
) -> Location:
    """Map every key path in a composed YAML tree to the line it is written on; a key written twice in
    one mapping is added to `duplicates` (YAML keeps the last one silently, which hides the first)."""
    found: Location = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key_path = path + (str(key_node.value),)
            line = f"{source}:{key_node.start_mark.line + 1}"
            if key_path in found and duplicates is not None:
                duplicates.append(
                    Problem(
                        line,
                        f"key '{'.'.join(key_path)}' is written twice (first at "
                        f"{found[key_path]}); fix: keep one and merge their values",
                    )
                )
            found[key_path] = line
            found.update(_locations(value_node, source, key_path, duplicates))
    return found


def read_yaml(path: Path) -> tuple[dict[str, Any], Location]:
    """Parse a YAML config into a dict and the line of each key; YAML errors name the line."""
    if not path.is_file():
        raise UserError(f"{path}: config file not found; fix: check the path (relative to {Path.cwd()})")
    text = path.read_text(encoding="utf-8")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise UserError(f"{path}{line}: not valid YAML: {getattr(error, 'problem', error)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(
            f"{path}:1: a config must be a mapping of keys (model:, data:, train:, ...), got {type(data).__name__}"
        )
    duplicates: list[Problem] = []
    where = _locations(node, str(path), duplicates=duplicates) if node is not None else {}
    if duplicates:
        raise UserError(f"{path}: the config has problems", duplicates)
    return data, where


def apply_overrides(data: dict[str, Any], overrides: list[str], where: Location) -> None:
    """Apply `key.sub=value` overrides in place; values are parsed as YAML scalars (2e-4, true, null)."""
    problems = []
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key.strip():
            problems.append(
                Problem("command line", f"'{override}' is not key.sub=value; fix: write e.g. train.lr=1e-4")
            )
            continue
        path = tuple(part.strip() for part in key.strip().split("."))
        target = data
        for depth, part in enumerate(path[:-1], start=1):
            if not isinstance(target.get(part), dict):
                target[part] = {}
                where[path[:depth]] = "command line"  # a section the override made is the command line's
            target = target[part]
        target[path[-1]] = override_value(raw)
        where[path] = "command line"
    if problems:
        raise UserError("bad override", problems)


def override_value(raw: str) -> Any:
    """An override's value as YAML reads it (2e-4, true, null, [a, b]), unless YAML would change the text:
    `Be brief: ok` is a sentence, not a mapping, and `Answer #1` is not cut at a comment."""
    text = raw.strip()
    if not text:
        return ""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, (dict, list)) and not text.startswith(("[", "{")):
        return text
    if isinstance(value, str) and value != text and not text.startswith(("'", '"')):
        return text
    return value


def _where(loc: tuple[Any, ...], where: Location, default: str) -> str:
    """The line of the deepest written key along `loc`."""
    path = tuple(str(part) for part in loc)
    while path:
        if path in where:
            return where[path]
        path = path[:-1]
    return default


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """The field names allowed in the section that contains `loc` (for "did you mean")."""
    model: Any = Config
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


# What other tools (PEFT, TRL, transformers' TrainingArguments) call our fields: a "did you mean" by meaning,
# where spelling alone would find nothing (rank is nowhere near r).
KEY_ALIASES = {
    "rank": "r",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "target_modules": "target",
    "learning_rate": "lr",
    "num_train_epochs": "epochs",
    "lr_scheduler_type": "schedule",
    "gradient_accumulation_steps": "grad_accum",
    "per_device_train_batch_size": "batch_size",
    "max_seq_length": "max_length",
}


def suggest_key(name: str, allowed: list[str]) -> str:
    """' (did you mean 'x'?)' for an unknown key: a known alias first, else the closest spelling."""
    alias = KEY_ALIASES.get(name)
    return f" (did you mean '{alias}'?)" if alias in allowed else did_you_mean(name, allowed)


# An example value of each required key, for the fix when a config lacks it.
REQUIRED_EXAMPLES = {"data.train": "path/to/train.jsonl"}


def missing_key_message(loc: tuple[Any, ...], on_command_line: bool) -> str:
    """`'KEY' is required` and how to add it: with no YAML file, as overrides; a missing section names the keys
    it needs (no `data:` at all needs data.train)."""
    key = ".".join(str(part) for part in loc)
    section = Config
    for part in loc:
        field = section.model_fields.get(str(part)) if isinstance(section, type) else None
        section = getattr(field, "annotation", None)
    needed = (
        [f"{key}.{name}" for name, field in section.model_fields.items() if field.is_required()]
        if isinstance(section, type) and issubclass(section, BaseModel)
        else []
    )
    needed = needed or [key]
    if on_command_line:
        overrides = " ".join(f"{name}={REQUIRED_EXAMPLES.get(name, 'VALUE')}" for name in needed)
        return (
            f"{', '.join(repr(name) for name in needed)} {'is' if len(needed) == 1 else 'are'} required; fix: add "
            f"{overrides} to the command line (or give a YAML config that sets it)"
        )
    return f"'{key}' is required; fix: add it (e.g. {needed[0]}: {REQUIRED_EXAMPLES.get(needed[0], 'VALUE')})"


def validation_problems(error: ValidationError, where: Location, source: str) -> list[Problem]:
    problems = []
    for item in error.errors():
        loc = tuple(item["loc"])
        key = ".".join(str(part) for part in loc) or "(top level)"
        if item["type"] == "extra_forbidden":
            allowed = _fields_at(loc)
            message = f"unknown key '{key}'{suggest_key(str(loc[-1]), allowed)}; allowed here: {', '.join(allowed)}"
        elif item["type"] == "missing":
            message = missing_key_message(loc, on_command_line=source == "command line")
        elif item["type"] == "value_error" and not loc:
            for line in str(item["msg"]).removeprefix("Value error, ").splitlines():
                problems.append(Problem(_where(tuple(line.split(":")[0].split(".")), where, source), line))
            continue
        else:
            value = item.get("input")
            message = f"'{key}' = {value!r}: {item['msg'].removeprefix('Value error, ')}"
        problems.append(Problem(_where(loc, where, source), message))
    return problems


def load_config(path: Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (or none), apply overrides, validate; every problem reported at once."""
    data, where = read_yaml(path) if path is not None else ({}, {})
    apply_overrides(data, list(overrides), where)
    source = str(path) if path is not None else "command line"
    try:
        return Config.model_validate(data)
    except ValidationError as error:
        problems = sorted(validation_problems(error, where, source), key=_line_number)  # in reading order
        raise UserError(f"{source}: the config has problems", problems) from None


def _line_number(problem: Problem) -> int:
    """The LINE of a `FILE:LINE` location; 0 for the file as a whole, after the file for the command line."""
    if problem.where == "command line":
        return 1 << 30
    tail = problem.where.rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def write_config(config: Config, path: Path) -> None:
    """Write the fully resolved config (defaults filled in, paths absolute) as YAML."""
    data = config.model_dump(mode="json")
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def resolve_paths(config: Config) -> Config:
    """Make every path absolute (relative to the working directory) so the saved config reproduces the run."""
    data = config.data
    updates = {"train": data.train.resolve()}
    if data.validation is not None:
        updates["validation"] = data.validation.resolve()
    resolved = config.model_copy(
        update={"data": data.model_copy(update=updates), "output_dir": config.output_dir.resolve()}
    )
    if config.eval.data is not None:
        resolved.eval = config.eval.model_copy(update={"data": config.eval.data.resolve()})
    return resolved
