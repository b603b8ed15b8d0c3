"""multipart/form-data uploads read into memory, never spooled to a temporary file.

Frameworks spool large parts to disk, which would leave a plaintext copy of a user's data behind. Here the
body streams through python-multipart's push parser into memory, bounded by the upload limit, and the
caller encrypts it before anything touches the disk.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator

from python_multipart.multipart import MultipartParser, parse_options_header

from tunesmith.serve.shapes import ApiError

FIELD_LIMIT = 4096  # bytes of a non-file field


@dataclass
class Part:
    name: str = ""
    filename: str | None = None
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)


async def read_form(content_type: str, body: AsyncIterator[bytes], limit: int) -> dict[str, Part]:
    kind, options = parse_options_header(content_type or "")
    if kind != b"multipart/form-data" or b"boundary" not in options:
        raise ApiError(400, "uploads are multipart/form-data with fields 'file' and 'purpose'", "file")
    parts: dict[str, Part] = {}
    state = {"part": Part(), "field": b"", "value": b"", "headers": {}}

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def on_header_end() -> None:
        state["headers"][state["field"].lower()] = state["value"]
        state["field"], state["value"] = b"", b""

    def on_headers_finished() -> None:
        _, disposition = parse_options_header(state["headers"].get(b"content-disposition", b""))
        part = Part(name=disposition.get(b"name", b"").decode("utf-8", "replace"))
        if b"filename" in disposition:
            part.filename = disposition[b"filename"].decode("utf-8", "replace")
        state["part"], state["headers"] = part, {}

    def on_part_data(data: bytes, start: int, end: int) -> None:
        part = state["part"]
        part.size += end - start
        if part.size > (limit if part.filename is not None else FIELD_LIMIT):
            raise ApiError(413, f"File too large: the limit is {limit} bytes", "file", "file_too_large")
        part.chunks.append(bytes(data[start:end]))

    def on_part_end() -> None:
        parts[state["part"].name] = state["part"]

    parser = MultipartParser(options[b"boundary"], {
        "on_header_field": on_header_field, "on_header_value": on_header_value, "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished, "on_part_data": on_part_data, "on_part_end": on_part_end})
    async for chunk in body:
        parser.write(chunk)
    parser.finalize()
    return parts
