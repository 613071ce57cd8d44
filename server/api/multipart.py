"""Split an adapter upload's multipart body, held in memory, into its parts, in one pass.

Starlette's form parser spools every part past 1 MB to a temporary file and hands each 64 KB chunk of
it to a worker thread: for an 84 MB adapter (8B shape, rank 16) that is about 1,300 thread hops and a
disk write and read-back, 400-500 ms on the 2-core dev CPU before the store saw a byte, the larger part
of the upload's time (issue 15: upload to usable within 300 ms). Here the body (already bounded by
max_upload_bytes as it arrived) goes to python-multipart's parser in one write, on a worker thread, and
a part that arrived in one piece is returned as a view of the body: no copy at all. The same library
parses, so the accepted syntax is the same; unlike Starlette, a body that stops before its closing
boundary is refused rather than taken as complete.
"""

from __future__ import annotations

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header

MAX_PARTS = 3


class MalformedMultipartError(ValueError):
    """The body is not a multipart body this upload accepts; the message says why (a 400)."""


def boundary_of(content_type: str) -> bytes:
    """The boundary parameter of a multipart/form-data Content-Type."""
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise MalformedMultipartError("the Content-Type has no boundary parameter")
    return boundary


def split_parts(body: bytearray | bytes, boundary: bytes) -> list[tuple[str, memoryview | bytes]]:
    """The (name, data) of every part of `body`, in order. A part's data is a view of `body` when it
    came in one piece (the usual case), else a copy joined from its pieces."""
    whole = memoryview(body)
    parts: list[tuple[str, memoryview | bytes]] = []
    pieces: list[tuple[object, int, int]] = []
    headers: dict[bytes, bytes] = {}
    field, value = bytearray(), bytearray()

    def on_part_begin() -> None:
        if len(parts) == MAX_PARTS:
            raise MalformedMultipartError(f"more than {MAX_PARTS} parts")
        pieces.clear()
        headers.clear()

    def on_header_field(data, start: int, end: int) -> None:
        field.extend(data[start:end])

    def on_header_value(data, start: int, end: int) -> None:
        value.extend(data[start:end])

    def on_header_end() -> None:
        headers[bytes(field).lower()] = bytes(value)
        field.clear()
        value.clear()

    def on_part_data(data, start: int, end: int) -> None:
        pieces.append((data, start, end))

    def on_part_end() -> None:
        _, options = parse_options_header(headers.get(b"content-disposition", b""))
        name = options.get(b"name")
        if name is None:
            raise MalformedMultipartError("a part has no Content-Disposition name")
        parts.append((name.decode("utf-8", "replace"), _join(pieces, body, whole)))

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_part_data": on_part_data, "on_part_end": on_part_end,
    })
    try:
        parser.write(body)
    except MultipartParseError as exc:
        raise MalformedMultipartError(str(exc)) from None
    if parser.state != MultipartState.END:
        raise MalformedMultipartError("the body ends before its closing boundary")
    return parts


def _join(pieces: list[tuple[object, int, int]], body, whole: memoryview) -> memoryview | bytes:
    """One view of `body` if the pieces are consecutive ranges of it, else their bytes joined."""
    if all(data is body for data, _, _ in pieces) and all(
            prev[2] == nxt[1] for prev, nxt in zip(pieces, pieces[1:], strict=False)):
        return whole[pieces[0][1]:pieces[-1][2]] if pieces else b""
    return b"".join(bytes(memoryview(data)[start:end]) for data, start, end in pieces)
