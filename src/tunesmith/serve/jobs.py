"""A fine-tuning job as OpenAI's API describes it, turned into a tunesmith training config.

`method` is `supervised` (our `sft`) or `dpo`; its hyperparameters are OpenAI's: n_epochs, batch_size,
learning_rate_multiplier (and beta for DPO), each a number or "auto". "auto" is resolved from the size
of the training file when the job is validated; the job then shows the numbers it trains with.
The adapter is LoRA r=16 on all linear layers: the model the job makes is an adapter on the shared base.
"""

from __future__ import annotations

import re
from typing import Any

from tunesmith.config.auto import learning_rate, resolve_settings
from tunesmith.serve.shapes import ApiError

METHODS = {"supervised": "sft", "dpo": "dpo"}
HYPERPARAMETERS = {
    "n_epochs": (int, 1, 50),
    "batch_size": (int, 1, 256),
    "learning_rate_multiplier": (float, 1e-3, 100.0),
    "beta": (float, 1e-3, 10.0),
}
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
    method, hyperparameters = parse_method(body.get("method"), body.get("hyperparameters"))
    return {
        "model": body["model"],
        "training_file": body["training_file"],
        "validation_file": body.get("validation_file"),
        "method": method,
        "hyperparameters": hyperparameters,
        "suffix": suffix,
        "seed": seed if seed is not None else int.from_bytes(__import__("os").urandom(4), "big") % 2**31,
        "metadata": metadata,
    }


def parse_method(method: Any, legacy: Any) -> tuple[str, dict[str, Any]]:
    """('supervised' | 'dpo', hyperparameters as given, checked) from `method` or the legacy `hyperparameters`."""
    if method is None:
        return "supervised", check_hyperparameters(legacy or {}, "hyperparameters", "supervised")
    if not isinstance(method, dict) or method.get("type") not in METHODS:
        kind = method.get("type") if isinstance(method, dict) else method
        raise ApiError(400, f"method.type {kind!r} is not supported; use one of: {', '.join(METHODS)}", "method.type")
    kind = method["type"]
    settings = method.get(kind) or {}
    if not isinstance(settings, dict):
        raise ApiError(400, f"method.{kind} must be an object", f"method.{kind}")
    if legacy and settings.get("hyperparameters"):
        raise ApiError(400, "give hyperparameters either at the top level or in method, not both", "hyperparameters")
    given = settings.get("hyperparameters") or legacy or {}
    return kind, check_hyperparameters(given, f"method.{kind}.hyperparameters", kind)


def check_hyperparameters(given: Any, where: str, kind: str) -> dict[str, Any]:
    if not isinstance(given, dict):
        raise ApiError(400, f"{where} must be an object", where)
    allowed = [name for name in HYPERPARAMETERS if name != "beta" or kind == "dpo"]
    checked = {}
    for name, value in given.items():
        if name not in allowed:
            raise ApiError(
                400,
                f"{where}.{name} is not a hyperparameter of {kind} jobs; use: {', '.join(allowed)}",
                f"{where}.{name}",
            )
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


def resolve(hyperparameters: dict[str, Any], examples: int, method: str = "supervised") -> dict[str, Any]:
    """The numbers "auto" stands for, from the number of training examples, by the rules `tunesmith train` uses for
    a config's "auto" settings (train/auto.py; a job's examples are not packed): n_epochs enough for about 200
    steps (1 to 10), batch_size about 16 examples (one per 50 on small files), learning_rate_multiplier 1 (the
    method's rate for the job's LoRA adapter)."""
    settings = resolve_settings(METHODS[method], ADAPTER["type"], examples, 1.0)
    auto = {
        "n_epochs": settings["epochs"].value,
        "batch_size": settings["batch_size"].value,
        "learning_rate_multiplier": 1.0,
        "beta": 0.1,
    }
    return {
        name: (auto[name] if hyperparameters.get(name, "auto") == "auto" else hyperparameters[name]) for name in auto
    }


def fine_tuned_name(job: dict[str, Any]) -> str:
    return f"ft:{job['model']}:{job['suffix'] or 'tunesmith'}:{job['id']}"


def build_config(
    job: dict[str, Any], base_spec: str, train: str, validation: str | None, resolved: dict[str, Any]
) -> dict[str, Any]:
    """The training config of a job (paths relative to the job's work directory)."""
    method = METHODS[job["method"]]
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
            "eval_every": 10,
            "progress": False,
            "keep_last": 2,
        },
        "output_dir": "run",
    }
    if method == "dpo":
        config["dpo"] = {"beta": resolved["beta"]}
    return config
