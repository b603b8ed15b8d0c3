"""The typed config: every shipped example loads; every mistake is reported at once, at its FILE:LINE,
with the key, the value and a "did you mean"; overrides are typed; the resolved config round-trips."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from pydantic import BaseModel

from tunesmith.config.loading import load_config, resolve_paths, write_config
from tunesmith.config.schema import Config, describe_fields
from tunesmith.errors import UserError

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


def write_yaml(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def problems_of(path: Path | None, overrides: list[str] = ()) -> list[str]:
    """The problems load_config reports, as `WHERE: message` strings."""
    with pytest.raises(UserError) as caught:
        load_config(path, overrides)
    return [str(problem) for problem in caught.value.problems]


def test_there_are_example_configs():
    assert EXAMPLES, "examples/*.yaml is empty"


@pytest.mark.parametrize("path", EXAMPLES, ids=[path.name for path in EXAMPLES])
def test_every_example_config_loads(path):
    config = load_config(path)
    assert isinstance(config, Config)
    assert config.data.train.is_file(), f"{path.name}: data.train {config.data.train} is not a shipped file"


# ---------------------------------------------------------------------------------------------
# Unknown keys, bad values, all at once, at their lines.


@pytest.mark.parametrize(
    "text, line, key, suggestion",
    [
        (
            """
     data: {train: t.jsonl}
     trian:
       epochs: 2
     """,
            2,
            "trian",
            "train",
        ),
        (
            """
     data: {train: t.jsonl}
     train:
       epochs: 2
       lrr: 0.1
     """,
            4,
            "train.lrr",
            "lr",
        ),
        (
            """
     data: {train: t.jsonl}
     adapter:
       type: lora
       rank: 8
     """,
            4,
            "adapter.rank",
            "r",
        ),
        (
            """
     data:
       train: t.jsonl
       max_seq_length: 512
     """,
            3,
            "data.max_seq_length",
            "max_length",
        ),
        (
            """
     data: {train: t.jsonl}
     train:
       early_stopping: {patiense: 2}
     """,
            3,
            "train.early_stopping.patiense",
            "patience",
        ),
    ],
    ids=["top-level", "train.lrr", "adapter.rank", "data.max_seq_length", "nested"],
)
def test_unknown_keys_are_rejected_with_did_you_mean_at_their_line(tmp_path, text, line, key, suggestion):
    path = write_yaml(tmp_path, text)
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}:{line}: unknown key '{key}' (did you mean '{suggestion}'?)")
    assert "allowed here:" in problem


def test_an_unknown_key_with_nothing_close_lists_the_allowed_keys(tmp_path):
    path = write_yaml(
        tmp_path,
        """
        data: {train: t.jsonl}
        flux_capacitor: 1
        """,
    )
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}:2: unknown key 'flux_capacitor'; allowed here: model, method, adapter")


def test_every_problem_is_reported_at_once(tmp_path):
    path = write_yaml(
        tmp_path,
        """
        model: smollm2-135m-instruct
        method: sftt
        data:
          train: t.jsonl
          max_length: long
        train:
          lrr: 0.1
        """,
    )
    with pytest.raises(UserError) as caught:
        load_config(path)
    error = caught.value
    assert str(error).startswith(f"{path}: the config has problems")
    assert [problem.where for problem in error.problems] == [f"{path}:2", f"{path}:5", f"{path}:7"]
    method, max_length, lrr = (problem.message for problem in error.problems)
    assert "'method' = 'sftt'" in method and "did you mean 'sft'" in method
    assert "'data.max_length' = 'long'" in max_length
    assert "unknown key 'train.lrr'" in lrr
    for problem in error.problems:  # every one printed
        assert str(problem) in str(error)


@pytest.mark.parametrize(
    "text, line, fragments",
    [
        ("train: {lr: -1}", 2, ["'train.lr' = -1", "greater than 0"]),
        ('data: {train: t.jsonl, max_length: "long"}', 1, ["'data.max_length' = 'long'", "valid integer"]),
        (
            "method: sftt",
            2,
            ["'method' = 'sftt'", "not a known method (did you mean 'sft'?)", "choose one of:", "pretrain"],
        ),
        ("adapter: {type: lorra}", 2, ["'adapter.type' = 'lorra'", "(did you mean 'lora'?)", "full"]),
        (
            "train: {schedule: cosin}",
            2,
            ["'train.schedule' = 'cosin'", "(did you mean 'cosine'?)", "constant, cosine, linear"],
        ),
        (
            "data: {train: t.jsonl, truncation: cut}",
            1,
            ["'data.truncation' = 'cut'", "'error', 'drop', 'truncate' or 'split'"],
        ),
        ("train: {batch_size: 0}", 2, ["'train.batch_size' = 0", "greater than or equal to 1"]),
        ("adapter: {dropout: 1.5}", 2, ["'adapter.dropout' = 1.5", "less than 1"]),
        (
            "data: {train: t.jsonl, validation: v.jsonl, val_fraction: 0.1}",
            1,
            ["give data.validation or data.val_fraction"],
        ),
        ("train: 5", 2, ["'train' = 5", "valid dictionary"]),
        (
            "train: {micro_batch_tokens: lots}",
            2,
            ["'train.micro_batch_tokens' = 'lots'", "a token count (e.g. 1024), auto"],
        ),
        ("train: {micro_batch_tokens: 0}", 2, ["'train.micro_batch_tokens' = 0", "at least 1 token"]),
    ],
    ids=[
        "lr",
        "max_length",
        "method",
        "adapter.type",
        "schedule",
        "truncation",
        "batch_size",
        "dropout",
        "validation-twice",
        "section-not-mapping",
        "micro_batch_tokens-word",
        "micro_batch_tokens-zero",
    ],
)
def test_bad_values_name_key_value_and_line(tmp_path, text, line, fragments):
    # The line under test is line 2 unless it is the data section itself (line 1).
    body = text if text.startswith("data:") else f"data: {{train: t.jsonl}}\n{text}"
    path = write_yaml(tmp_path, body + "\n")
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}:{line}: "), problem
    for fragment in fragments:
        assert fragment in problem
    assert "Value error," not in problem  # pydantic's wording is not for users


def test_a_missing_required_key_says_how_to_add_it(tmp_path):
    path = write_yaml(tmp_path, "model: smollm2-135m-instruct\n")
    [problem] = problems_of(path)
    assert "'data' is required" in problem and "data.train:" in problem
    path = write_yaml(tmp_path, "data:\n  max_length: 64\n")
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}:1: 'data.train' is required")


def test_yaml_syntax_errors_name_the_line(tmp_path):
    path = write_yaml(
        tmp_path,
        """
        model: smollm2-135m-instruct
        method: sft
        train: lr: 1
        """,
    )
    with pytest.raises(UserError) as caught:
        load_config(path)
    assert str(caught.value).startswith(f"{path}:3: not valid YAML")


def test_a_key_written_twice_is_an_error(tmp_path):
    path = write_yaml(
        tmp_path,
        """
        data: {train: t.jsonl}
        train: {lr: 0.1}
        train: {epochs: 2}
        """,
    )
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}:3: key 'train' is written twice (first at {path}:2)")


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n"])
def test_a_config_that_is_not_a_mapping_is_an_error(tmp_path, text):
    path = write_yaml(tmp_path, text)
    with pytest.raises(UserError, match=f"^{path}:1: a config must be a mapping"):
        load_config(path)


def test_a_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


# ---------------------------------------------------------------------------------------------
# Overrides on the command line.


def test_overrides_are_typed_and_win_over_the_file(tmp_path):
    path = write_yaml(
        tmp_path,
        """
        data: {train: t.jsonl, packing: true}
        train: {lr: 0.1, epochs: 3}
        """,
    )
    config = load_config(
        path,
        [
            "train.lr=1e-4",
            "data.packing=false",
            "data.max_length=64",
            "train.max_steps=null",
            "train.early_stopping.patience=2",
            "model=some/dir",
            "data.system_prompt=Be brief: ok",
        ],
    )
    assert config.train.lr == 1e-4 and isinstance(config.train.lr, float)
    assert config.data.packing is False
    assert config.data.max_length == 64 and isinstance(config.data.max_length, int)
    assert config.train.max_steps is None
    assert config.train.early_stopping.patience == 2
    assert config.train.epochs == 3  # untouched keys keep the file's values
    assert config.model == "some/dir"
    assert config.data.system_prompt == "Be brief: ok"


def test_overrides_alone_make_a_config():
    config = load_config(None, ["data.train=t.jsonl", "adapter.type=full", "train.schedule=linear"])
    assert (config.data.train, config.adapter.type, config.train.schedule) == (Path("t.jsonl"), "full", "linear")


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.lr=abc", "'train.lr' = 'abc'"),
        ("train.lrr=0.1", "unknown key 'train.lrr' (did you mean 'lr'?)"),
        ("method=sftt", "did you mean 'sft'"),
        ("train.lr.x=3", "'train.lr' = {'x': 3}"),
    ],
)
def test_a_bad_override_names_the_command_line(tmp_path, override, fragment):
    path = write_yaml(tmp_path, "data: {train: t.jsonl}\ntrain: {lr: 0.1}\n")
    [problem] = problems_of(path, [override])
    assert problem.startswith("command line: ")
    assert fragment in problem


def test_an_override_without_equals_is_an_error():
    with pytest.raises(UserError) as caught:
        load_config(None, ["data.train=t.jsonl", "train.lr"])
    [problem] = caught.value.problems
    assert problem.where == "command line" and "'train.lr' is not key.sub=value" in problem.message


def test_file_and_override_problems_are_reported_together(tmp_path):
    path = write_yaml(tmp_path, "data: {train: t.jsonl}\ntrain: {lr: -1}\n")
    problems = problems_of(path, ["train.epochs=0"])
    assert [problem.split(": ")[0] for problem in problems] == [f"{path}:2", "command line"]


# ---------------------------------------------------------------------------------------------
# Resolving, writing and describing.


def test_resolve_paths_makes_every_path_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(
        None,
        ["data.train=data/t.jsonl", "data.validation=data/v.jsonl", "eval.data=data/e.jsonl", "output_dir=runs/one"],
    )
    resolved = resolve_paths(config)
    assert resolved.data.train == tmp_path / "data" / "t.jsonl"
    assert resolved.data.validation == tmp_path / "data" / "v.jsonl"
    assert resolved.eval.data == tmp_path / "data" / "e.jsonl"
    assert resolved.output_dir == tmp_path / "runs" / "one"
    assert config.data.train == Path("data/t.jsonl") and config.eval.data == Path("data/e.jsonl")  # not mutated
    assert resolve_paths(load_config(None, ["data.train=t.jsonl"])).data.validation is None


@pytest.mark.parametrize("source", EXAMPLES[:1] + [None], ids=["example", "non-defaults"])
def test_write_config_then_load_config_round_trips(tmp_path, monkeypatch, source):
    monkeypatch.chdir(tmp_path)
    overrides = (
        []
        if source
        else [
            "data.train=t.jsonl",
            "data.val_fraction=0.1",
            "data.system_prompt='Say: \"yes\"\n— ok'",
            "adapter.target=[q_proj, v_proj]",
            "train.betas=[0.8, 0.95]",
            "train.early_stopping.patience=2",
            "train.max_steps=7",
            "method=pretrain",
            "adapter.type=full",
            "data.truncation=split",
            "train.threads=2",
        ]
    )
    config = resolve_paths(load_config(source, overrides))
    path = tmp_path / "written.yaml"
    write_config(config, path)
    assert load_config(path) == config
    assert str(tmp_path) in path.read_text(encoding="utf-8")  # the paths written are absolute


def _leaf_fields(model: type[BaseModel], prefix: str = "") -> set[str]:
    names = set()
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            names |= _leaf_fields(field.annotation, f"{prefix}{name}.")
        else:
            names.add(f"{prefix}{name}")
    return names


def test_describe_fields_documents_every_field():
    rows = describe_fields()
    keys = [key for key, _, _ in rows]
    assert len(keys) == len(set(keys))
    assert set(keys) == _leaf_fields(Config)
    assert {"data.train", "train.lr", "train.early_stopping.patience", "adapter.r"} <= set(keys)
    undocumented = [key for key, _, description in rows if not description.strip()]
    assert undocumented == []
    defaults = {key: default for key, default, _ in rows}
    assert defaults["data.train"] == "(required)" and defaults["train.lr"] == "auto"
    assert (defaults["output_dir"], defaults["train.max_steps"], defaults["train.progress"]) == (
        "runs/run",
        "null",
        "true",
    )
