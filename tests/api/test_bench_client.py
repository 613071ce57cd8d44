"""bench.serve's client reuses its keep-alive connection from one streamed request to the next.

It used to stop reading at `data: [DONE]`: the chunked body's terminator was still unread, so httpx closed
the connection and every request of a closed-loop load paid a new one (432 TIME-WAIT sockets after a
416-request load). The client is aiohttp now; the same holds. A small ASGI app streams like the server and
records each request's client port."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import uvicorn

from bench.serve.load import make_session, stream_completion


def _event(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"  # compact, as the server


def _sse_app(ports: list[int]):
    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        ports.append(scope["client"][1])
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream"), (b"x-request-id", b"cmpl-1")]})
        for index in range(3):
            chunk = {"id": "cmpl-1", "choices": [{"index": 0, "text": f"t{index}", "finish_reason": None}]}
            await send({"type": "http.response.body", "body": _event(chunk), "more_body": True})
        usage = {"id": "cmpl-1", "choices": [], "usage": {"completion_tokens": 3}}
        for body in (_event(usage), b"data: [DONE]\n\n"):
            await send({"type": "http.response.body", "body": body, "more_body": True})
        await asyncio.sleep(0.01)  # the terminator comes in a write of its own, after [DONE]
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


def test_consecutive_streams_share_one_connection():
    ports: list[int] = []
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(_sse_app(ports), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.01)

        async def two_requests():
            async with make_session(f"http://127.0.0.1:{sock.getsockname()[1]}", 1) as session:
                return [await stream_completion(session, "m", [1, 2, 3], 3, 0.0, 1.0) for _ in range(2)]

        results = asyncio.run(two_requests())
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
    for result in results:
        assert result.status == 200 and result.done is not None and result.completion_tokens == 3
        assert len(result.chunk_times) == 3
    assert len(ports) == 2 and ports[0] == ports[1]  # the second request came over the first's connection
