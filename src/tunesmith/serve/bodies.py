"""A request's JSON body, read within limits: its size as it streams in, its nesting before it is parsed."""

from __future__ import annotations

import json
import re
from typing import Any

from fastapi import Request

from tunesmith.serve.shapes import ApiError

MAX_JSON_DEPTH = 64  # nesting of a request body; OpenAI's requests need under 10
MAX_JSON_BYTES = 8 << 20  # a JSON request body; a chat request filling a 128k-token context is about 1 MB


async def json_body(request: Request) -> dict[str, Any]:
    return parse_json_object(await read_bounded(request, MAX_JSON_BYTES))


_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_JSON_BRACKET = re.compile(rb"[\[\]{}]")


def json_depth(data: bytes, limit: int) -> int:
    """How deeply `data`'s arrays and objects nest, counted without recursion; stops counting past `limit`."""
    depth = deepest = 0
    for bracket in _JSON_BRACKET.findall(_JSON_STRING.sub(b"", data)):  # brackets in strings are text
        depth += 1 if bracket in b"[{" else -1
        deepest = max(deepest, depth)
        if deepest > limit:
            break
    return deepest


async def read_bounded(request: Request, limit: int) -> bytes:
    """The request's body, read as it streams in and given up one chunk past `limit` bytes (a 413): an
    oversized body is never held whole, whatever its Content-Length says or leaves out."""
    too_large = ApiError(
        413,
        f"The request body is larger than this service's limit of {limit} bytes; fix: send "
        f"less (files go to /v1/files)",
        None,
        "request_too_large",
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large  # refused before a byte of it is read
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json_object(data: bytes) -> dict[str, Any]:
    """A request's JSON object. Its nesting is checked first: json.loads recurses once per level, and a body
    nested 100,000 deep would raise RecursionError (a 500) here or in whatever walks the parsed value later."""
    if json_depth(data, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise ApiError(
            400, f"The JSON body of your request is nested more than {MAX_JSON_DEPTH} levels deep; fix: flatten it"
        )
    try:
        body = json.loads(data or b"{}")
    except (ValueError, RecursionError) as error:
        raise ApiError(400, f"We could not parse the JSON body of your request: {error}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body
