"""server.api.multipart: an upload's body split into parts in one pass, the data a view of the body."""

from __future__ import annotations

import os

import pytest

from server.api.multipart import MalformedMultipartError, _join, boundary_of, split_parts

BOUNDARY = b"----loraplexBoundary7"


def _body(parts: list[tuple[str, bytes]], close: bool = True) -> bytearray:
    out = bytearray()
    for name, data in parts:
        out += (b"--" + BOUNDARY + b"\r\nContent-Disposition: form-data; name=\"" + name.encode()
                + b"\"; filename=\"f\"\r\nContent-Type: application/octet-stream\r\n\r\n" + data + b"\r\n")
    if close:
        out += b"--" + BOUNDARY + b"--\r\n"
    return out


def test_parts_come_back_in_order_and_the_large_one_is_a_view_of_the_body():
    weights = os.urandom(3 << 20)
    body = _body([("adapter_config.json", b'{"r": 8}'), ("adapter_model.safetensors", weights)])
    parts = split_parts(body, BOUNDARY)
    assert [name for name, _ in parts] == ["adapter_config.json", "adapter_model.safetensors"]
    assert bytes(parts[0][1]) == b'{"r": 8}'
    assert isinstance(parts[1][1], memoryview) and parts[1][1].obj is body  # not a copy
    assert bytes(parts[1][1]) == weights


def test_data_that_looks_like_the_start_of_a_boundary_is_kept_whole():
    # "\r\n--" followed by a near-boundary makes the parser report the data in several pieces.
    tricky = b"a\r\n--" + BOUNDARY[:-1] + b"X tail\r\n-\r\n--\r" + os.urandom(1000) + b"\r\n--" + BOUNDARY[:5]
    body = _body([("archive", tricky)])
    assert [(name, bytes(data)) for name, data in split_parts(body, BOUNDARY)] == [("archive", tricky)]


def test_pieces_not_from_one_run_of_the_body_are_joined():
    body = bytearray(b"0123456789")
    assert _join([(body, 2, 5), (body, 5, 7)], body, memoryview(body)).tobytes() == b"23456"
    assert _join([(body, 2, 5), (b"xyz", 0, 2), (body, 6, 7)], body, memoryview(body)) == b"234xy6"
    assert _join([(body, 2, 5), (body, 6, 7)], body, memoryview(body)) == b"2346"


def test_an_empty_part_is_empty_bytes():
    assert [(n, bytes(d)) for n, d in split_parts(_body([("archive", b"")]), BOUNDARY)] == [("archive", b"")]


@pytest.mark.parametrize(("body", "message"), [
    (_body([("archive", b"x" * 100)], close=False), "ends before its closing boundary"),
    (_body([("archive", b"x" * 100)])[:-30], "ends before its closing boundary"),
    (_body([(f"p{i}", b"x") for i in range(4)]), "more than 3 parts"),
    (_body([("archive", b"x")]).replace(b"form-data; name=\"archive\"; ", b"form-data; "),
     "no Content-Disposition name"),
    (bytearray(b"garbage without any boundary"), ""),
])
def test_malformed_bodies_are_refused_with_the_reason(body, message):
    with pytest.raises(MalformedMultipartError, match=message):
        split_parts(body, BOUNDARY)


def test_the_boundary_comes_from_the_content_type():
    assert boundary_of('multipart/form-data; boundary="abc"') == b"abc"
    with pytest.raises(MalformedMultipartError, match="no boundary"):
        boundary_of("multipart/form-data")
