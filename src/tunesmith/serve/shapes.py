"""How the service's objects look on the wire: OpenAI's JSON shapes, so the official SDK parses them unchanged.

Errors too: `ApiError` becomes `{"error": {"message", "type", "param", "code"}}` with its HTTP status.
"""

from __future__ import annotations

import re
from typing import Any


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def not_found(kind: str, object_id: str, param: str | None = None) -> ApiError:
    """Also what another project's object looks like: its existence is not revealed."""
    return ApiError(
        404, f"No such {kind}: '{object_id}'", param, f"{re.sub(r'[^a-z0-9]+', '_', kind.lower())}_not_found"
    )


def unknown_cursor(after: str, kind: str) -> ApiError:
    """An `after` that names no object of the list: a 400, the same for every list (files, jobs, events,
    checkpoints). An empty page would read as "no more", and restarting at page 1 would loop a client forever."""
    return ApiError(
        400,
        f"after='{after}' is not the id of a {kind} in this list; fix: pass the `last_id` of "
        f"the previous page, or leave `after` out for the first page",
        "after",
        "invalid_cursor",
    )


def page(rows: list[dict[str, Any]], limit: int, render) -> dict[str, Any]:
    """A list response; `rows` holds up to limit + 1 rows, the extra one only says there is more."""
    shown = rows[:limit]
    return {
        "object": "list",
        "data": [render(row) for row in shown],
        "has_more": len(rows) > limit,
        "first_id": shown[0]["id"] if shown else None,
        "last_id": shown[-1]["id"] if shown else None,
    }


def file_object(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "object": "file",
        "bytes": row["bytes"],
        "created_at": row["created_at"],
        "filename": row["filename"],
        "purpose": row["purpose"],
        "status": "processed",
        "status_details": None,
        "expires_at": None,
    }


COMMON_HYPERPARAMETERS = ("n_epochs", "batch_size", "learning_rate_multiplier")
METHOD_HYPERPARAMETERS = {  # a job method's hyperparameters, as its requests take them and its object shows them
    "supervised": COMMON_HYPERPARAMETERS,
    "dpo": (*COMMON_HYPERPARAMETERS, "beta"),
    "reinforcement": (
        *COMMON_HYPERPARAMETERS,
        "eval_interval",
        "eval_samples",
        "compute_multiplier",
        "reasoning_effort",
    ),
}


def job_status(row: dict[str, Any]) -> str:
    """As OpenAI shows it: a running job whose cancel was requested is `cancelled` at once (its worker stops it
    within seconds; the store keeps `running` until then, so the worker's lease still ends it)."""
    return "cancelled" if row["status"] == "running" and row["cancel_requested"] else row["status"]


def job_object(row: dict[str, Any]) -> dict[str, Any]:
    given = row["hyperparameters"] or {}
    shown = {**given, **(row["resolved"] or {})}  # "auto" shows the number it became once the job knows it
    hyperparameters = {key: shown.get(key, "auto") for key in COMMON_HYPERPARAMETERS}
    method = {"hyperparameters": {key: shown.get(key, "auto") for key in METHOD_HYPERPARAMETERS[row["method"]]}}
    if row.get("grader") is not None:
        method["grader"] = row["grader"]
    return {
        "id": row["id"],
        "object": "fine_tuning.job",
        "created_at": row["created_at"],
        "model": row["model"],
        "organization_id": row["project_id"],
        "training_file": row["training_file"],
        "validation_file": row["validation_file"],
        "status": job_status(row),
        "error": row["error"],
        "fine_tuned_model": row["fine_tuned_model"],
        "finished_at": row["finished_at"],
        "hyperparameters": hyperparameters,
        "method": {"type": row["method"], row["method"]: method},
        "result_files": row["result_files"] or [],
        "seed": row["seed"],
        "trained_tokens": row["trained_tokens"],
        "estimated_finish": None,
        "integrations": [],
        "metadata": row["metadata"],
        "suffix": row["suffix"],
    }


def event_object(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "object": "fine_tuning.job.event",
        "created_at": row["created_at"],
        "level": row["level"],
        "message": row["message"],
        "data": row["data"],
        "type": row["type"],
    }


def checkpoint_object(row: dict[str, Any], fine_tuned_model: str) -> dict[str, Any]:
    return {
        "id": row["id"],
        "object": "fine_tuning.job.checkpoint",
        "created_at": row["created_at"],
        "fine_tuned_model_checkpoint": f"{fine_tuned_model}:ckpt-step-{row['step']}",
        "fine_tuning_job_id": row["job_id"],
        "metrics": row["metrics"],
        "step_number": row["step"],
    }


def model_object(model_id: str, created: int, owned_by: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": owned_by}


def checked_grader(body: dict[str, Any], where: str = "grader") -> dict[str, Any]:
    """The body's `grader` (`where` is its place in the request), validated; every problem of it in one 400 whose
    param is the first one's field."""
    if "grader" not in body:
        raise ApiError(400, f"Missing required parameter: '{where}'", where, "missing_required_parameter")
    from tunesmith.errors import UserError
    from tunesmith.eval.graders import validate_grader

    try:
        validate_grader(body["grader"], where)
    except UserError as error:
        first = error.problems[0].where if error.problems else where
        raise ApiError(400, str(error), first, "invalid_grader") from None
    return body["grader"]
