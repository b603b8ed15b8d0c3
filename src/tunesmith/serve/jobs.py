"""A fine-tuning job as OpenAI's API describes it, turned into a tunesmith training config.

`method` is `supervised` (our `sft`), `dpo` or `reinforcement` (our `rft`: GRPO with the job's grader as the
reward); its hyperparameters are OpenAI's: n_epochs, batch_size, learning_rate_multiplier (beta for DPO;
eval_interval, eval_samples, compute_multiplier and reasoning_effort for reinforcement), each a number or "auto".
"auto" is resolved from the size of the training file when the job is validated; the job then shows the numbers
it trains with. The adapter is LoRA r=16 on all linear layers: the model the job makes is an adapter on the
shared base.

Reinforcement's hyperparameters, as tunesmith honours them: batch_size is prompts per step; compute_multiplier
scales the replies sampled per prompt (GRPO's group, GROUP_SIZE at 1, at least 2); eval_interval is the steps
between evaluations of the greedy replies to the validation prompts; eval_samples is how many validation prompts
(the file's first N) each of those scores. reasoning_effort other than "default" is refused: it needs a chat
template with a reasoning switch, and no level of it is wired to generation here.
"""

from __future__ import annotations

import re
from typing import Any

from tunesmith.config.auto import learning_rate, resolve_settings
from tunesmith.serve.shapes import METHOD_HYPERPARAMETERS, ApiError, checked_grader

METHODS = {"supervised": "sft", "dpo": "dpo", "reinforcement": "rft"}
HYPERPARAMETERS = {  # name -> (type, lowest, highest)
    "n_epochs": (int, 1, 50),
    "batch_size": (int, 1, 256),
    "learning_rate_multiplier": (float, 1e-3, 100.0),
    "beta": (float, 1e-3, 10.0),
    "eval_interval": (int, 1, 100_000),
    "eval_samples": (int, 1, 100_000),
    "compute_multiplier": (float, 0.5, 8.0),
}
REASONING_EFFORTS = ("default", "low", "medium", "high")
REPLY_TOKENS = 128  # the longest reply a reinforcement job samples, unless the service says otherwise
GROUP_SIZE = 4  # replies sampled per prompt at compute_multiplier 1
EVAL_INTERVAL = 10  # steps between evaluations, as the other methods' jobs (eval_interval "auto")
EVAL_SAMPLES = 64  # validation prompts each evaluation scores at most (eval_samples "auto")
SUFFIX = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
ADAPTER = {"type": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target": "all-linear"}


def parse_request(body: dict[str, Any], base_models: dict[str, str]) -> dict[str, Any]:
    """The job's columns from a create request, or ApiError(400) naming the parameter and the fix."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    unknown = set(body) - {
        "model",
        "training_file",
        "validation_file",
        "hyperparameters",
        "method",
        "suffix",
        "seed",
        "metadata",
        "integrations",
    }
    if unknown:
        raise ApiError(400, f"Unrecognized request argument supplied: {', '.join(sorted(unknown))}", sorted(unknown)[0])
    for required in ("model", "training_file"):
        if not isinstance(body.get(required), str) or not body[required]:
            raise ApiError(400, f"Missing required parameter: '{required}'.", required, "missing_required_parameter")
    if body["model"] not in base_models:
        raise ApiError(
            400,
            f"Model {body['model']} is not available for fine-tuning; available: {', '.join(sorted(base_models))}",
            "model",
            "model_not_available",
        )
    if body.get("integrations"):
        raise ApiError(400, "integrations are not supported: tunesmith sends nothing to third parties", "integrations")
    suffix = body.get("suffix")
    if suffix is not None and not (isinstance(suffix, str) and SUFFIX.match(suffix)):
        raise ApiError(400, f"Invalid suffix {suffix!r}: use 1 to 64 letters, digits, '-' or '_'", "suffix")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**31):
        raise ApiError(400, f"Invalid seed {seed!r}: an integer from 0 to 2147483647", "seed")
    metadata = body.get("metadata")
    if metadata is not None and not (
        isinstance(metadata, dict)
        and len(metadata) <= 16
        and all(
            isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512 for k, v in metadata.items()
        )
    ):
        raise ApiError(400, "metadata: at most 16 string keys (64 characters) with string values (512)", "metadata")
    method, hyperparameters, grader = parse_method(body.get("method"), body.get("hyperparameters"))
    if (
        method == "reinforcement"
        and not body.get("validation_file")
        and hyperparameters.get("eval_samples", "auto") != "auto"
    ):
        raise ApiError(
            400,
            "method.reinforcement.hyperparameters.eval_samples scores validation prompts, and the job has no "
            "validation_file; fix: give a validation_file, or leave eval_samples out",
            "method.reinforcement.hyperparameters.eval_samples",
        )
    return {
        "model": body["model"],
        "training_file": body["training_file"],
        "validation_file": body.get("validation_file"),
        "method": method,
        "hyperparameters": hyperparameters,
        "grader": grader,
        "suffix": suffix,
        "seed": seed if seed is not None else int.from_bytes(__import__("os").urandom(4), "big") % 2**31,
        "metadata": metadata,
    }


def parse_method(method: Any, legacy: Any) -> tuple[str, dict[str, Any], dict[str, Any] | None]:
    """(the method's type, hyperparameters as given, checked, the reinforcement grader or None) from `method` or
    the legacy `hyperparameters`."""
    if method is None:
        return "supervised", check_hyperparameters(legacy or {}, "hyperparameters", "supervised"), None
    if not isinstance(method, dict) or method.get("type") not in METHODS:
        kind = method.get("type") if isinstance(method, dict) else method
        raise ApiError(400, f"method.type {kind!r} is not supported; use one of: {', '.join(METHODS)}", "method.type")
    kind = method["type"]
    settings = method.get(kind) or {}
    if not isinstance(settings, dict):
        raise ApiError(400, f"method.{kind} must be an object", f"method.{kind}")
    known = ("hyperparameters", "grader") if kind == "reinforcement" else ("hyperparameters",)
    for key in settings:
        if key not in known:
            raise ApiError(
                400,
                f"method.{kind}.{key} is not a setting of {kind} jobs; use: {', '.join(known)}",
                f"method.{kind}.{key}",
            )
    if legacy and settings.get("hyperparameters"):
        raise ApiError(400, "give hyperparameters either at the top level or in method, not both", "hyperparameters")
    given = settings.get("hyperparameters") or legacy or {}
    grader = None
    if kind == "reinforcement":
        grader = checked_grader(settings, "method.reinforcement.grader")
    return kind, check_hyperparameters(given, f"method.{kind}.hyperparameters", kind), grader


def check_hyperparameters(given: Any, where: str, kind: str) -> dict[str, Any]:
    if not isinstance(given, dict):
        raise ApiError(400, f"{where} must be an object", where)
    allowed = METHOD_HYPERPARAMETERS[kind]
    checked = {}
    for name, value in given.items():
        if name not in allowed:
            raise ApiError(
                400,
                f"{where}.{name} is not a hyperparameter of {kind} jobs; use: {', '.join(allowed)}",
                f"{where}.{name}",
            )
        if name == "reasoning_effort":
            if value not in (None, *REASONING_EFFORTS):
                raise ApiError(
                    400, f"{where}.{name} = {value!r}: use one of {', '.join(REASONING_EFFORTS)}", f"{where}.{name}"
                )
            checked[name] = value or "default"
            continue
        cast, low, high = HYPERPARAMETERS[name]
        if value == "auto" or value is None:
            checked[name] = "auto"
            continue
        number_ok = (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and (cast is float or float(value).is_integer())
        )
        if not number_ok or not low <= value <= high:
            shape = "an integer" if cast is int else "a number"
            raise ApiError(
                400, f'{where}.{name} = {value!r}: must be "auto" or {shape} from {low} to {high}', f"{where}.{name}"
            )
        checked[name] = cast(value)
    return checked


def resolve(
    hyperparameters: dict[str, Any], examples: int, method: str = "supervised", validation: int = 0
) -> dict[str, Any]:
    """The numbers "auto" stands for, from the number of training examples, by the rules `tunesmith train` uses for
    a config's "auto" settings (train/auto.py; a job's examples are not packed): n_epochs enough for about 200
    steps (1 to 10), batch_size about 16 examples (one per 50 on small files), learning_rate_multiplier 1 (the
    method's rate for the job's LoRA adapter). Reinforcement: one pass over RL_BATCH prompts a step, evaluated
    every EVAL_INTERVAL steps on the first EVAL_SAMPLES of the `validation` prompts."""
    settings = resolve_settings(METHODS[method], ADAPTER["type"], examples, 1.0)
    auto: dict[str, Any] = {
        "n_epochs": settings["epochs"].value,
        "batch_size": settings["batch_size"].value,
        "learning_rate_multiplier": 1.0,
    }
    if method == "dpo":
        auto["beta"] = 0.1
    if method == "reinforcement":
        auto.update(
            eval_interval=EVAL_INTERVAL,
            eval_samples=min(validation, EVAL_SAMPLES),
            compute_multiplier=1.0,
            reasoning_effort="default",
        )
    return {
        name: (auto[name] if hyperparameters.get(name, "auto") == "auto" else hyperparameters[name]) for name in auto
    }


def group_size(resolved: dict[str, Any]) -> int:
    """Replies sampled per prompt: GROUP_SIZE scaled by compute_multiplier, at least 2 (GRPO compares them)."""
    return max(2, round(GROUP_SIZE * resolved["compute_multiplier"]))


def check_grader_fields(grader: dict[str, Any], examples: list[Any], filename: str, param: str) -> None:
    """Every item field the grader's templates read ({{ item.answer }}) is in every row of the file (a chat row's
    final reply counts as `reference`, as rft reads it); else ApiError naming the first row without one."""
    from tunesmith.eval.graders.templates import item_fields

    fields = item_fields(grader, "method.reinforcement.grader")
    for example in examples:
        row = {**example.fields, **({"reference": example.meta["reference"]} if "reference" in example.meta else {})}
        missing = [name for name in fields if name not in row]
        if missing:
            raise ApiError(
                400,
                f"{filename}:{example.line}: the grader reads item.{missing[0]}, and this row has no field "
                f"'{missing[0]}' (it has: {', '.join(sorted(row)) or 'no fields besides the prompt'}); fix: add it to "
                f"every row, or change method.reinforcement.grader's template",
                param,
                f"invalid_{param}",
            )


def check_reinforcement(job: dict[str, Any], validation: int, base_spec: str) -> None:
    """What a reinforcement job's hyperparameters need of its files and base model; ApiError naming the field."""
    where = "method.reinforcement.hyperparameters"
    given = job["hyperparameters"]
    samples = given.get("eval_samples", "auto")
    if samples != "auto" and samples > validation:
        raise ApiError(
            400,
            f"{where}.eval_samples = {samples}: the validation file has {validation} examples; fix: at most "
            f'{validation}, or "auto"',
            f"{where}.eval_samples",
        )
    effort = given.get("reasoning_effort", "default")
    if effort != "default":
        from tunesmith.models.loading import load_tokenizer

        template = load_tokenizer(base_spec).chat_template or ""
        has_switch = "enable_thinking" in template or "reasoning_effort" in template
        why = (
            "its chat template has a reasoning switch, but tunesmith does not map effort levels to it"
            if has_switch
            else "its chat template has no reasoning switch (a reasoning model's, such as Qwen3's enable_thinking)"
        )
        raise ApiError(
            400,
            f"{where}.reasoning_effort = {effort!r} cannot be honoured for model {job['model']}: {why}; fix: leave "
            f'it out, or "default"',
            f"{where}.reasoning_effort",
        )


def fine_tuned_name(job: dict[str, Any]) -> str:
    return f"ft:{job['model']}:{job['suffix'] or 'tunesmith'}:{job['id']}"


def build_config(
    job: dict[str, Any],
    base_spec: str,
    train: str,
    validation: str | None,
    resolved: dict[str, Any],
    reply_tokens: int = REPLY_TOKENS,
) -> dict[str, Any]:
    """The training config of a job (paths relative to the job's work directory); a reinforcement job samples
    replies of up to `reply_tokens` (the service's setting)."""
    method = METHODS[job["method"]]
    evaluate_every = resolved.get("eval_interval", EVAL_INTERVAL)
    # No packing: OpenAI's batch_size counts examples, and so does a step here (a packed row would hold many).
    data: dict[str, Any] = {"train": train, "format": "auto", "max_length": 1024, "packing": False}
    if validation:
        data["validation"] = validation
    if method == "dpo":
        data["truncation"] = "drop"
    config = {
        "model": base_spec,
        "method": method,
        "adapter": dict(ADAPTER),
        "data": data,
        "train": {
            "epochs": resolved["n_epochs"],
            "batch_size": resolved["batch_size"],
            "lr": learning_rate(method, ADAPTER["type"]).value * resolved["learning_rate_multiplier"],
            "seed": job["seed"],
            "save_every": 10,
            "eval_every": evaluate_every,
            "progress": False,
            "keep_last": 2,
        },
        "output_dir": "run",
    }
    if method == "dpo":
        config["dpo"] = {"beta": resolved["beta"]}
    if method == "rft":
        config["rft"] = {"grader": job["grader"]}
        config["grpo"] = {"num_generations": group_size(resolved)}
        config["rl"] = {"max_new_tokens": reply_tokens}
    return config
