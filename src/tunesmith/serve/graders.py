"""OpenAI's grader endpoints, so a team's RFT code can test its graders here unchanged:
POST /v1/fine_tuning/alpha/graders/validate ({grader}) answers the grader, or a 400 naming the field at fault;
POST /v1/fine_tuning/alpha/graders/run ({grader, model_sample, item}) grades one sample (eval/graders).

A grader that fails on this sample (a python grader that raises, a judge's unreadable answer) is not an HTTP error:
as OpenAI's, the reply's reward is 0 and metadata.errors says why. Running a python grader runs the caller's code
(in the sandbox, eval/graders/sandbox.py), so /run needs a key that can write; /validate only reads.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from tunesmith.eval.graders import run_grader
from tunesmith.security.apikeys import Scope
from tunesmith.serve.access import Caller, needs
from tunesmith.serve.bodies import json_body
from tunesmith.serve.shapes import ApiError, checked_grader

router = APIRouter()


@router.post("/v1/fine_tuning/alpha/graders/validate")
async def validate(request: Request, _: Caller = needs(Scope.READ)) -> dict[str, Any]:
    grader = checked_grader(await json_body(request))
    return {"grader": grader}


@router.post("/v1/fine_tuning/alpha/graders/run")
async def run(request: Request, _: Caller = needs(Scope.WRITE)) -> dict[str, Any]:
    body = await json_body(request)
    grader = checked_grader(body)
    sample, item = body.get("model_sample"), body.get("item", {})
    if not isinstance(sample, str):
        raise ApiError(
            400, f"model_sample: {sample!r} is not a string; fix: send the model's reply as text", "model_sample"
        )
    if not isinstance(item, dict):
        raise ApiError(400, f"item: {item!r} is not an object; fix: send the dataset row as a JSON object", "item")
    grade = await run_in_threadpool(run_grader, grader, sample, item)  # a python grader waits on its sandbox
    return grade.response()
