"""Limits applied before work (issue 9, defect 2): the body size is bounded while the body streams in,
the prompt length in characters is checked before tokenizing, and /health answers fast while the
largest requests are handled."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from server.api.body_limit import BodyLimit, BodyLimitMiddleware
from server.api.prompts import PromptEncoder
from server.config import Settings, parse_settings
from tests.api.helpers import BASE_ID, api_settings, assert_error, free_port, live_server, spawn_server, wait_ready

MAX_BODY = 64 * 1024
MAX_PROMPT_CHARS = 1000


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    settings = api_settings(tiny_llama_dir, tmp_path_factory.mktemp("store"), max_request_body_bytes=MAX_BODY,
                            max_prompt_chars=MAX_PROMPT_CHARS, max_model_len=128)
    with live_server(settings) as live:
        yield live


def _address(live) -> tuple[str, int]:
    host, port = live.url.removeprefix("http://").split(":")
    return host, int(port)


def _read_response(sock: socket.socket) -> tuple[int, bytes]:
    """Status line, headers and JSON body of the one response on `sock`."""
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head = data.split(b"\r\n", 1)[0].decode()
    return int(head.split()[1]), data


def test_declared_oversized_body_is_refused_before_it_is_sent(server):
    """Headers only: the 413 comes back although not one byte of the 50 MB body was sent."""
    with socket.create_connection(_address(server), timeout=5) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 50000000\r\n\r\n")
        status, data = _read_response(sock)
    assert status == 413, data
    assert b"max_request_body_bytes" in data and b"50000000" in data


def test_chunked_oversized_body_is_cut_off_while_it_streams(server):
    """No Content-Length: twice the limit is sent, never the end of the body, and the 413 comes back."""
    with socket.create_connection(_address(server), timeout=5) as sock:
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        piece = b'{"inputs": "' + b"x" * 8180
        for _ in range(2 * MAX_BODY // len(piece)):
            sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            piece = b"x" * 8192
        status, data = _read_response(sock)
    assert status == 413, data
    assert b"max_request_body_bytes" in data


def test_junk_fields_cannot_carry_a_huge_body(server):
    with server.client() as client:
        body = {"model": BASE_ID, "prompt": "Hi", "max_tokens": 1, "junk": "x" * (MAX_BODY + 1)}
        assert_error(client.post("/v1/completions", json=body), 413, "max_request_body_bytes")
        body["junk"] = "x" * (MAX_BODY // 2)
        assert client.post("/v1/completions", json=body).status_code == 200
        assert client.get("/health").status_code == 200


def test_adapter_uploads_have_their_own_limit(server):
    """A multipart upload larger than max_request_body_bytes reaches the adapter route (here: a 422 for
    the bogus archive), while one over max_upload_bytes is a 413 naming that setting."""
    max_upload = server.state.settings.max_upload_bytes
    with server.client() as client:
        files = {"archive": ("a.zip", b"\0" * (MAX_BODY * 2))}
        assert client.put("/v1/adapters/big", files=files).status_code == 422
        files = {"archive": ("a.zip", b"\0" * (max_upload + 1))}
        assert_error(client.put("/v1/adapters/big", files=files), 413, "max_upload_bytes")


def test_body_longer_than_its_content_length_is_counted():
    """At the ASGI level a body may run past what Content-Length declares: the bytes are what count,
    and the app reads no chunk past the limit."""
    chunks = [b"x" * 1024] * 64
    taken: list[bytes] = []

    async def receive():
        taken.append(chunks[len(taken)])
        return {"type": "http.request", "body": taken[-1], "more_body": len(taken) < len(chunks)}

    async def app(scope, receive, send):
        while (await receive()).get("more_body"):
            pass
        raise AssertionError("the whole body was read")

    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": [(b"content-length", b"10")]}
    middleware = BodyLimitMiddleware(app, BodyLimit(4096, "max_request_body_bytes"), BodyLimit(10**9, "max_upload"))
    asyncio.run(middleware(scope, receive, send))
    assert sent[0]["status"] == 413 and b"max_request_body_bytes" in sent[1]["body"]
    assert len(taken) == 5


@pytest.fixture()
def tokenizer_calls(server, monkeypatch) -> list[str]:
    calls: list[str] = []
    tokenizer = server.state.prompts.tokenizer
    encode, render = tokenizer.encode, tokenizer.apply_chat_template

    def spy(fn):
        def call(*args, **kwargs):
            calls.append(fn.__name__)
            return fn(*args, **kwargs)
        return call

    monkeypatch.setattr(tokenizer, "encode", spy(encode))
    monkeypatch.setattr(tokenizer, "apply_chat_template", spy(render))
    return calls


PROMPT_CASES = [
    ("/v1/completions", {"model": BASE_ID, "prompt": "y" * (MAX_PROMPT_CHARS + 1)}, "prompt"),
    ("/v1/completions", {"model": BASE_ID, "prompt": ["y" * (MAX_PROMPT_CHARS + 1)]}, "prompt"),
    ("/v1/chat/completions", {"model": BASE_ID, "messages": [{"role": "user", "content": "y" * 600},
                                                             {"role": "user", "content": "y" * 401}]}, "messages"),
    ("/generate", {"inputs": "y" * (MAX_PROMPT_CHARS + 1)}, "inputs"),
    ("/generate_stream", {"inputs": "y" * (MAX_PROMPT_CHARS + 1)}, "inputs"),
]


@pytest.mark.parametrize("path, body, field", PROMPT_CASES, ids=[f"{i}{c[0]}" for i, c in enumerate(PROMPT_CASES)])
def test_prompt_characters_are_checked_before_tokenizing(server, tokenizer_calls, path, body, field):
    with server.client() as client:
        error = assert_error(client.post(path, json=body), 400, field, "max_prompt_chars",
                             str(MAX_PROMPT_CHARS + 1), str(MAX_PROMPT_CHARS))
    assert error["param"] == field
    assert tokenizer_calls == []


def test_prompt_at_the_character_limit_is_tokenized(server, tokenizer_calls):
    with server.client() as client:
        response = client.post("/v1/completions", json={"model": BASE_ID, "prompt": "y" * MAX_PROMPT_CHARS})
    assert_error(response, 400, "max_model_len")  # past the character check, refused on its tokens
    assert tokenizer_calls == ["encode"]


def test_limit_settings_defaults_and_flags():
    assert Settings(max_model_len=128).max_prompt_chars == 16 * 128
    assert Settings().max_request_body_bytes == 4 * 1024 * 1024
    settings = parse_settings(["--max-prompt-chars", "500", "--max-request-body-bytes", "2048",
                               "--tokenizer-threads", "3"])
    assert (settings.max_prompt_chars, settings.max_request_body_bytes, settings.tokenizer_threads) == (500, 2048, 3)


class _SlowTokenizer:
    """Records where and how many at once `encode` runs; each call takes 50 ms of sleep."""

    def __init__(self):
        self.lock, self.num_running, self.peak, self.threads = threading.Lock(), 0, 0, set()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        with self.lock:
            self.num_running += 1
            self.peak = max(self.peak, self.num_running)
            self.threads.add(threading.current_thread().name)
        time.sleep(0.05)
        with self.lock:
            self.num_running -= 1
        return [1]


def test_tokenization_runs_on_a_bounded_pool_off_the_event_loop():
    tokenizer = _SlowTokenizer()
    encoder = PromptEncoder(tokenizer, max_prompt_chars=100, num_threads=2)

    async def main() -> int:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.005)

        ticker = asyncio.ensure_future(tick())
        await asyncio.gather(*(encoder.encode_text("hello", "prompt") for _ in range(6)))
        ticker.cancel()
        return ticks

    try:
        ticks = asyncio.run(main())
    finally:
        encoder.close()
    assert tokenizer.peak == 2  # six prompts, two threads: three rounds of 50 ms
    assert all(name.startswith("loraplex-tokenize") for name in tokenizer.threads)
    assert ticks >= 10  # the event loop kept running meanwhile (150 ms at one tick per 5 ms is ~30)


# ---- /health under the largest requests, on a server process with the default limits --------------

# What this guards against (a huge body parsed, or a huge prompt tokenized, on the event loop) stalls /health for
# seconds at these sizes; 0.1 s was the first budget, but a clean-clone CI run on the 2-core machine (2026-12-05)
# measured 236 ms for the 50 MB body twice in a row, retry included, under the suite's own load. 0.5 s keeps the
# guard and not the CPU's contention.
HEALTH_BUDGET_S = 0.5


def _health_during(url: str, path: str, body: bytes) -> tuple[httpx.Response | None, float]:
    """Send one request while probing /health every 5 ms; its response and the slowest probe (s)."""
    stop, latencies = threading.Event(), []

    def probe() -> None:  # a failed or timed-out probe counts as an endless one (checked in the caller's thread)
        with httpx.Client(base_url=url, timeout=10) as client:
            while not stop.is_set():
                started = time.perf_counter()
                try:
                    ok = client.get("/health").status_code == 200
                except httpx.TransportError:
                    ok = False
                latencies.append(time.perf_counter() - started if ok else float("inf"))
                time.sleep(0.005)

    prober = threading.Thread(target=probe)
    prober.start()
    time.sleep(0.05)
    try:
        response = httpx.post(url + path, content=body, timeout=60, headers={"content-type": "application/json"})
    except httpx.TransportError:  # a client still sending may see the 413 as a reset connection
        response = None
    finally:
        time.sleep(0.05)
        stop.set()
        prober.join()
    return response, max(latencies)


def _huge_requests(url: str) -> list[tuple[str, bytes, int]]:
    """(path, body, expected status) for the largest requests a client can send with default limits."""
    with httpx.Client(base_url=url) as client:
        max_prompt_chars = 16 * 2048  # defaults: PROMPT_CHARS_PER_TOKEN x max_model_len
        max_body = 4 * 1024 * 1024
        assert client.post("/v1/completions", json={"model": BASE_ID, "prompt": "x" * (max_prompt_chars + 1)}
                           ).status_code == 400
    worst_prompt = "\U0001f600" * max_prompt_chars  # four byte tokens a character with a byte-level BPE
    junk = "y" * (max_body - 200)
    return [
        ("/v1/completions", json.dumps({"model": BASE_ID, "prompt": worst_prompt, "max_tokens": 1}).encode(), 400),
        ("/v1/chat/completions", json.dumps({"model": BASE_ID, "messages": [
            {"role": "user", "content": "z" * 1_000_000}]}).encode(), 400),
        ("/v1/completions", json.dumps({"model": BASE_ID, "prompt": "z" * (max_body - 100)}).encode(), 400),
        ("/v1/completions", json.dumps({"model": BASE_ID, "prompt": "Hi", "max_tokens": 1, "junk": junk}).encode(),
         200),
        ("/v1/completions", b'{"junk": "' + b"j" * 50_000_000 + b'"}', 413),
    ]


def test_health_stays_responsive_during_the_largest_requests(tiny_llama_dir, tmp_path):
    port = free_port()
    args = ["--model", str(tiny_llama_dir), "--served-model-name", BASE_ID, "--device", "cpu",
            "--quantization", "none", "--dtype", "float32", "--no-cuda-graphs", "--kv-cache-blocks", "256",
            "--adapters-dir", str(tmp_path / "store")]
    process = spawn_server(args, port, log_path=Path(tmp_path / "server.log"))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process=process)
        for path, body, status in _huge_requests(url):
            response, slowest = _health_during(url, path, body)
            if slowest >= HEALTH_BUDGET_S:  # once more: a stall the request causes recurs, CPU contention
                response, slowest = _health_during(url, path, body)  # from other jobs seldom does
            print(f"{path} body {len(body)} B: slowest /health {slowest * 1000:.1f} ms")  # figures with -s
            assert slowest < HEALTH_BUDGET_S, (path, len(body), f"/health took {slowest * 1000:.0f} ms")
            if response is not None:
                assert response.status_code == status, response.text[:300]
    finally:
        process.terminate()
        process.wait(30)
