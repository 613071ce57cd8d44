"""Unexpected input and unexpected failures: a lone surrogate is a 400 naming the field, and any
unhandled exception is a JSON 500 that leaves the keep-alive connection usable (issue 9, defect 4)."""

from __future__ import annotations

import json
import logging
import socket
import time

import pytest

from tests.api.helpers import BASE_ID, api_settings, assert_error, live_server

LONE = "\\ud800"  # as JSON spells it: json.loads gives a str no UTF-8 encoder accepts


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    with live_server(api_settings(tiny_llama_dir, tmp_path_factory.mktemp("store"))) as live:
        yield live


SURROGATE_CASES = [
    ("/v1/completions", f'{{"model": "{BASE_ID}", "prompt": "Hi {LONE} there"}}', "prompt"),
    ("/v1/completions", f'{{"model": "{BASE_ID}", "prompt": ["{LONE}"]}}', "prompt.0"),
    ("/v1/chat/completions",
     f'{{"model": "{BASE_ID}", "messages": [{{"role": "user", "content": "ok"}}, '
     f'{{"role": "user", "content": "x{LONE}"}}]}}', "messages.1.content"),
    ("/v1/chat/completions",
     f'{{"model": "{BASE_ID}", "messages": [{{"role": "user", "content": [{{"type": "text", "text": "{LONE}"}}]}}]}}',
     "messages.0.content.0.text"),
    ("/generate", f'{{"inputs": "{LONE}"}}', "inputs"),
    ("/generate_stream", f'{{"inputs": "a{LONE}b"}}', "inputs"),
    ("/v1/completions", f'{{"model": "{BASE_ID}", "prompt": "Hi", "stop": ["{LONE}"]}}', "stop.0"),
    ("/generate", f'{{"inputs": "Hi", "parameters": {{"stop": ["{LONE}"]}}}}', "parameters.stop.0"),
    ("/generate", f'{{"inputs": "Hi", "parameters": {{"adapter_id": "{LONE}"}}}}', "parameters.adapter_id"),
    ("/v1/completions", f'{{"model": "a{LONE}", "prompt": "Hi"}}', "model"),
]


@pytest.mark.parametrize("path, raw_body, field", SURROGATE_CASES, ids=[c[2] + c[0] for c in SURROGATE_CASES])
def test_lone_surrogate_is_400_naming_the_field(server, path, raw_body, field):
    with server.client() as client:
        response = client.post(path, content=raw_body.encode(), headers={"content-type": "application/json"})
        error = assert_error(response, 400, field, "surrogate")
        assert error["param"] == field
        assert client.get("/health").status_code == 200


def _exchange(sock: socket.socket, request: bytes) -> tuple[int, dict]:
    """Send one HTTP/1.1 request on `sock` and read one response with a Content-Length body."""
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    length = int(headers["content-length"])
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection mid-body")
        body += chunk
    return int(lines[0].split()[1]), json.loads(body)


def _post(path: str, payload: dict) -> bytes:
    body = json.dumps(payload).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_unhandled_error_is_json_500_and_the_connection_lives_on(server, monkeypatch):
    """An exception no handler knows: JSON 500 without details, nothing re-raised to uvicorn, and the
    same HTTP/1.1 connection answers the next request."""

    def broken_resolve(name):
        raise RuntimeError("secret detail of a bug")

    monkeypatch.setattr(server.state.registry, "resolve", broken_resolve)
    records = _Records()
    uvicorn_log = logging.getLogger("uvicorn.error")
    uvicorn_log.addHandler(records)
    host, port = server.url.removeprefix("http://").split(":")
    try:
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            status, body = _exchange(sock, _post("/v1/completions", {"model": "some-adapter", "prompt": "Hi"}))
            assert status == 500 and body["error"]["code"] == 500
            assert "secret" not in body["error"]["message"]
            status, body = _exchange(sock, b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
            assert status == 200 and body == {"status": "ready"}
            status, _ = _exchange(sock, _post("/v1/completions", {"model": BASE_ID, "prompt": "Hi",
                                                                   "max_tokens": 2}))
            assert status == 200
    finally:
        uvicorn_log.removeHandler(records)
    assert not [m for m in records.messages if "Exception in ASGI application" in m]


def test_error_mid_stream_is_an_error_event_then_done(server, monkeypatch):
    """A bug while rendering the second chunk of a stream: the client gets an error event (no details)
    and [DONE], uvicorn logs no ASGI exception, and the connection serves the next request."""
    from server.api import openai

    render, calls = openai._finish_reason, []

    def failing_finish_reason(output):
        calls.append(output)
        if len(calls) == 2:
            raise RuntimeError("secret detail of a bug")
        return render(output)

    monkeypatch.setattr(openai, "_finish_reason", failing_finish_reason)
    records = _Records()
    uvicorn_log = logging.getLogger("uvicorn.error")
    uvicorn_log.addHandler(records)
    body = {"model": BASE_ID, "prompt": "Hi", "max_tokens": 8, "ignore_eos": True, "stream": True}
    try:
        with server.client() as client:
            with client.stream("POST", "/v1/completions", json=body) as response:
                lines = [line for line in response.iter_lines() if line.startswith("data: ")]
            assert lines[-1] == "data: [DONE]"
            error = json.loads(lines[-2][6:])["error"]
            assert error["code"] == 500 and "secret" not in error["message"]
            assert client.get("/health").status_code == 200
    finally:
        uvicorn_log.removeHandler(records)
    assert not [m for m in records.messages if "Exception in ASGI application" in m]


def test_upload_abandoned_mid_body_is_no_server_error(server):
    """A client that leaves while its upload's body is arriving is a 499 logged in one line, not an
    'unhandled error' with a traceback (found by tests/chaos/test_disconnect_storm.py)."""
    records = _Records()
    errors_log = logging.getLogger("server.api.errors")
    errors_log.addHandler(records)
    level = errors_log.level
    errors_log.setLevel(logging.INFO)
    host, port = server.url.removeprefix("http://").split(":")
    head = (b"PUT /v1/adapters/abandoned HTTP/1.1\r\nHost: test\r\nContent-Length: 100000\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\n\r\n"
            b"--b\r\nContent-Disposition: form-data; name=\"archive\"; filename=\"a.zip\"\r\n\r\n" + b"\0" * 1000)
    try:
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(head)
        with server.client() as client:
            deadline = time.monotonic() + 5
            while not records.messages and time.monotonic() < deadline:
                time.sleep(0.01)
            assert client.get("/v1/adapters/abandoned").status_code == 404
    finally:
        errors_log.removeHandler(records)
        errors_log.setLevel(level)
    assert records.messages == ["client closed the request before its body arrived"]
