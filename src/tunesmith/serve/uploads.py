"""multipart/form-data uploads read into memory, never spooled to a temporary file.

Frameworks spool large parts to disk, which would leave a plaintext copy of a user's data behind. Here the
body streams through python-multipart's push parser into memory, bounded by the upload limit, and the
caller encrypts it before anything touches the disk. The form holds one `file` part and the `purpose` field:
a second file part is refused, other fields are skipped unread, and the whole body (not each part) is bounded
by the upload limit plus FORM_OVERHEAD.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from tunesmith.serve.shapes import ApiError

FIELD_LIMIT = 4096  # bytes of a non-file field
FORM_OVERHEAD = 16 << 10  # bytes of a form besides its file: boundaries, part headers, fields; a real one needs < 1 KiB
KEPT_FIELDS = ("file", "purpose")  # what /v1/files reads; other fields (the SDK's expires_after) are skipped


@dataclass
class Part:
    name: str = ""
    filename: str | None = None
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)


async def read_form(
    content_type: str, body: AsyncIterator[bytes], limit: int, content_length: str = ""
) -> dict[str, Part]:
    """The form's `file` and `purpose` parts. `limit` bounds the file; the whole body may add FORM_OVERHEAD."""
    kind, options = parse_options_header(content_type or "")
    if kind != b"multipart/form-data" or b"boundary" not in options:
        raise ApiError(400, "uploads are multipart/form-data with fields 'file' and 'purpose'", "file")
    total_limit = limit + FORM_OVERHEAD
    too_large = ApiError(
        413,
        f"File too large: the limit is {limit} bytes, and {total_limit} for the whole form",
        "file",
        "file_too_large",
    )
    if content_length.isdigit() and int(content_length) > total_limit:
        raise too_large  # refused before a byte of it is read
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
        if part.filename is not None and part.name != "file":
            raise ApiError(
                400,
                f"Unexpected file part '{part.name}': an upload carries one file, in the part "
                f"named 'file', and its 'purpose'",
                "file",
            )
        if part.name in parts:
            raise ApiError(400, f"The form has more than one '{part.name}' part; fix: send one per upload", part.name)
        state["part"], state["headers"] = part, {}

    def on_part_data(data: bytes, start: int, end: int) -> None:
        part = state["part"]
        if part.name not in KEPT_FIELDS:
            return  # skipped unread; the whole body's bound still counts it
        part.size += end - start
        if part.filename is None and part.size > FIELD_LIMIT:
            raise ApiError(
                400,
                f"Invalid '{part.name}': the field is over {FIELD_LIMIT} bytes; fix: send a "
                f"purpose such as 'fine-tune'",
                part.name,
            )
        if part.size > limit:
            raise ApiError(413, f"File too large: the limit is {limit} bytes", "file", "file_too_large")
        part.chunks.append(bytes(data[start:end]))

    def on_part_end() -> None:
        if state["part"].name in KEPT_FIELDS:
            parts[state["part"].name] = state["part"]

    parser = MultipartParser(
        options[b"boundary"],
        {
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
        },
    )
    size = 0
    try:
        async for chunk in body:
            size += len(chunk)
            if size > total_limit:
                raise too_large
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as error:
        raise ApiError(400, f"The upload is not a well-formed multipart/form-data body: {error}", "file") from None
    return parts
