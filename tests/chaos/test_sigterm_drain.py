"""SIGTERM under load: requests in flight finish (with their right output) or fail cleanly with an HTTP
error or an SSE error event, new ones get 503, /health stays 200, and the process exits 0 within the
drain timeout (request_timeout_s) plus uvicorn's grace period."""

from __future__ import annotations

import json
import random
import signal
import threading
import time

import httpx
import pytest

from server.serving import SHUTDOWN_GRACE_S
from tests.chaos.harness import (
    HANG_BOUND_S,
    HealthProbe,
    completion_body,
    expected_outputs,
    reference_outputs,
)

DRAIN_TIMEOUT_S = 4.0  # request_timeout_s: the drain waits at most this long
NUM_CLIENTS = 24
LONG_TOKENS = 480  # some requests outlast the drain and must end as a clean 504
STALLED_DRAIN_TIMEOUT_S = 1.0
SECOND_SIGNAL_AFTER_S = 0.5
TEARDOWN_S = 4.0  # interpreter teardown after uvicorn finishes: 1-2 s on a loaded 2-core machine


def test_sigterm_under_load_drains_then_exits(chaos_server, tiny_adapters, tmp_path, record_figures):
    server = chaos_server(tmp_path / "store", request_timeout_s=DRAIN_TIMEOUT_S, max_batch_size=8)
    with server.client() as client:
        references = reference_outputs(client, tiny_adapters)
    expected = expected_outputs(references)
    models = list(expected)
    signalled = threading.Event()
    outcomes: list[tuple[bool, str, object]] = []  # (sent after SIGTERM, kind, outcome)
    lock = threading.Lock()

    def client_loop(index: int) -> None:
        rng = random.Random(index)
        with httpx.Client(base_url=server.url, timeout=HANG_BOUND_S) as client:
            while server.process.poll() is None:
                model = rng.choice(models)
                is_long, is_stream = rng.random() < 0.3, rng.random() < 0.5
                body = completion_body(model, **({"max_tokens": LONG_TOKENS} if is_long else {}))
                after = signalled.is_set()
                try:
                    outcome = _stream(client, body) if is_stream else _json(client, body)
                except httpx.TransportError as exc:
                    outcome = f"{type(exc).__name__}"
                except Exception as exc:  # a malformed response: recorded, so the checks below see it
                    outcome = f"bad: {exc!r}"
                if outcome == ("length" if is_long else expected[model]):
                    outcome = "right output"
                with lock:
                    outcomes.append((after, "long" if is_long else "short", outcome))
                if after and outcome in ("ConnectError", "RemoteProtocolError", "ReadError"):
                    return  # the server is gone
                if after and isinstance(outcome, int):
                    time.sleep(0.1)  # refused while draining: retry a little later, as a client would

    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(NUM_CLIENTS)]
    with HealthProbe(server) as probe:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + HANG_BOUND_S
        while time.monotonic() < deadline:  # under way: the clients have had right answers
            with lock:
                if sum(outcome == "right output" for _, _, outcome in outcomes) >= NUM_CLIENTS // 2:
                    break
            time.sleep(0.05)
        else:
            raise AssertionError(f"the load did not get going: {outcomes[:5]}")
        peak_rss_mib = server.peak_rss_mib()
        signalled.set()
        probe.expect_exit()
        sent = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        status = server.process.wait(DRAIN_TIMEOUT_S + SHUTDOWN_GRACE_S + 10)
        exit_s = time.monotonic() - sent
    for thread in threads:
        thread.join(HANG_BOUND_S)
    assert not any(thread.is_alive() for thread in threads), "a request hung"
    assert status == 0, server.log_tail()
    assert "Traceback" not in server.log_path.read_text(errors="replace"), server.log_tail()
    assert exit_s < DRAIN_TIMEOUT_S + SHUTDOWN_GRACE_S + TEARDOWN_S, f"exit took {exit_s:.1f} s"

    before = [(kind, outcome) for after, kind, outcome in outcomes if not after]
    after = [outcome for is_after, _, outcome in outcomes if is_after]
    # Started before the signal: the right output, or a clean failure (504 past request_timeout_s, 503 if
    # it reached the server only after the signal) -- never a cut connection or a wrong output.
    unclean = [item for item in before if item[1] not in ("right output", 503, 504, "error event 504")]
    assert not unclean, unclean[:5]
    # Sent after it: refused with 503 while draining, or no connection once the server is gone.
    unclean_after = [o for o in after if o not in ("right output", 503, "ConnectError", "RemoteProtocolError",
                                                   "ReadError")]
    assert not unclean_after, unclean_after[:5]
    assert 503 in after, "no request was refused during the drain"
    assert not probe.failures, probe.failures[:5]
    record_figures({"peak_rss_mib": round(peak_rss_mib), "max_health_ms": round(probe.max_latency_s * 1000),
                    "health_probes": len(probe.latencies_s),
                    "exit_s": round(exit_s, 1), "requests": len(outcomes),
                    "finished_before_exit": sum(o == "right output" for _, o in before),
                    "timed_out_in_drain": sum(o in (504, "error event 504") for _, o in before)})


def _json(client: httpx.Client, body: dict) -> str | int:
    response = client.post("/v1/completions", json=body)
    if response.status_code != 200:
        assert "error" in response.json(), response.text  # a clean, OpenAI-shaped error
        return response.status_code
    choice = response.json()["choices"][0]
    return choice["text"] if body["max_tokens"] < LONG_TOKENS else _long_outcome(choice, response.json()["usage"])


def _stream(client: httpx.Client, body: dict) -> str | int:
    with client.stream("POST", "/v1/completions", json={**body, "stream": True,
                                                         "stream_options": {"include_usage": True}}) as response:
        if response.status_code != 200:
            response.read()
            assert "error" in response.json(), response.text
            return response.status_code
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    if not events or events[-1] != "[DONE]":
        return "stream cut without [DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    if "error" in chunks[-1]:
        return f"error event {chunks[-1]['error']['code']}"
    text = "".join(choice["text"] for chunk in chunks for choice in chunk["choices"])
    if body["max_tokens"] < LONG_TOKENS:
        return text
    finish = [choice["finish_reason"] for chunk in chunks for choice in chunk["choices"] if choice["finish_reason"]]
    return _long_outcome({"finish_reason": finish[-1]}, chunks[-1]["usage"])


def _long_outcome(choice: dict, usage: dict) -> str:
    if choice["finish_reason"] == "length" and usage["completion_tokens"] == LONG_TOKENS:
        return "length"
    return f"long request ended with {choice['finish_reason']} after {usage['completion_tokens']} tokens"


@pytest.mark.parametrize("num_signals", [1, 2])
def test_sigterm_with_a_stalled_upload_exits_after_drain_and_grace(chaos_server, tiny_adapters, tmp_path,
                                                                    record_figures, num_signals):
    """An upload whose body stops arriving holds the drain to its timeout (or to a second SIGTERM);
    uvicorn's grace period then cuts it. The process still exits 0 within that wait + grace, and
    nothing of the upload is stored."""
    store = tmp_path / "store"
    drain_timeout_s = STALLED_DRAIN_TIMEOUT_S if num_signals == 1 else 60.0
    server = chaos_server(store, request_timeout_s=drain_timeout_s)
    stop = threading.Event()
    outcome: list[object] = []

    def body():
        yield b"--b\r\nContent-Disposition: form-data; name=\"archive\"; filename=\"a.zip\"\r\n\r\n"
        while not stop.is_set():
            time.sleep(0.05)
            yield b"\0" * 512

    def stalled_upload() -> None:
        try:
            response = httpx.put(f"{server.url}/v1/adapters/stalled", content=body(), timeout=HANG_BOUND_S,
                                 headers={"content-type": "multipart/form-data; boundary=b"})
            outcome.append(response.status_code)
        except httpx.TransportError as exc:
            outcome.append(type(exc).__name__)

    thread = threading.Thread(target=stalled_upload, daemon=True)
    thread.start()
    time.sleep(0.5)
    sent = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    if num_signals == 2:
        time.sleep(SECOND_SIGNAL_AFTER_S)
        server.process.send_signal(signal.SIGTERM)  # ends the drain at once
    waited_s = STALLED_DRAIN_TIMEOUT_S if num_signals == 1 else SECOND_SIGNAL_AFTER_S
    status = server.process.wait(waited_s + SHUTDOWN_GRACE_S + 10)
    exit_s = time.monotonic() - sent
    stop.set()
    thread.join(HANG_BOUND_S)
    assert status == 0, server.log_tail()
    assert exit_s < waited_s + SHUTDOWN_GRACE_S + TEARDOWN_S, f"exit took {exit_s:.1f} s"
    assert outcome and outcome[0] != 201, outcome  # cut: uvicorn's 500 or a closed connection

    assert not (store / "stalled").exists()
    assert not list((store / ".staging").iterdir())
    record_figures({"exit_s": round(exit_s, 1), "upload_outcome": outcome[0]})
