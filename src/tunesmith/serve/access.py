"""Who is calling: the API key in a request's Authorization header, checked against the store, becomes the caller
(project, key, scope), or an OpenAI-shaped 401. The API and the dashboard both ask here.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Depends, Request

from tunesmith.security import apikeys
from tunesmith.security.apikeys import Scope
from tunesmith.serve.service import Service
from tunesmith.serve.shapes import ApiError


@dataclass(frozen=True)
class Caller:
    project: str
    key_id: str
    scope: Scope


def authenticate(service: Service, header: str | None) -> Caller:
    if not header or not header.startswith("Bearer "):
        raise ApiError(
            401,
            "You didn't provide an API key. Send it as 'Authorization: Bearer tsk_...'; "
            "`tunesmith keys create --project P --scope S` makes one",
            None,
            "missing_api_key",
        )
    try:
        parsed = apikeys.parse_key(header.removeprefix("Bearer ").strip())
    except apikeys.InvalidKeyError:
        raise ApiError(401, "Incorrect API key provided.", None, "invalid_api_key") from None
    row = service.store.key(parsed.key_id)
    if (
        row is None
        or row["revoked_at"] is not None
        or not apikeys.verify(f"{apikeys.KEY_PREFIX}{parsed.key_id}_{parsed.secret}", row["hash"])
    ):
        raise ApiError(401, "Incorrect API key provided.", None, "invalid_api_key")
    return Caller(row["project_id"], row["id"], Scope(row["scope"]))


def needs(scope: Scope):
    def check(request: Request) -> Caller:
        caller = authenticate(request.app.state.service, request.headers.get("authorization"))
        if not caller.scope.allows(scope):
            raise ApiError(
                403,
                f"This key's scope is '{caller.scope}'; this call needs '{scope}'. Use a key "
                f"made with `tunesmith keys create --scope {scope}`",
                None,
                "insufficient_scope",
                type="permission_error",
            )
        return caller

    return Depends(check)
