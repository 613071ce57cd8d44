"""LORAPLEX_HOP_TRACE: a streamed request's hops are marked in the API process and in the engine (its own
process or a thread), under the response's X-Request-Id, in order."""

from __future__ import annotations

import pytest

from bench.hop_trace import read, summarize
from server import hop_trace
from tests.api.helpers import BASE_ID, ENGINE_MODES, api_settings, live_server

SERVER_HOPS = ("api_received", "api_admitted", "engine_received", "engine_first_token", "api_first_output",
               "api_response_start", "api_first_body_sent")


@pytest.mark.parametrize("mode", list(ENGINE_MODES))
def test_hops_of_a_streamed_request_are_marked_in_order(mode, tiny_llama_dir, tmp_path, monkeypatch):
    directory = tmp_path / "hops"
    monkeypatch.setenv(hop_trace.ENV, str(directory))  # the engine process reads it when it starts
    monkeypatch.setattr(hop_trace, "TRACE", hop_trace.HopTrace(directory))
    settings = api_settings(tiny_llama_dir, tmp_path / "store", engine_process=ENGINE_MODES[mode])
    with live_server(settings) as live, live.client() as client:
        ids = []
        for i in range(2):
            with client.stream("POST", "/v1/completions", json={"model": BASE_ID, "prompt": [5, 6, 7 + i],
                                                                "max_tokens": 3, "stream": True}) as reply:
                assert reply.status_code == 200
                reply.read()
                ids.append(reply.headers["x-request-id"])
    requests = read(directory)
    expected = SERVER_HOPS + (("engine_sent", "api_output_in") if mode == "process" else ())
    for request_id in ids:
        hops = requests[request_id]
        assert set(expected) <= set(hops), sorted(hops)
        times = [hops[hop] for hop in hop_trace.HOPS if hop in hops]
        assert times == sorted(times), hops  # each hop after the one before it
    rows = summarize(requests)
    assert rows[-1]["from"] == "api_received" and rows[-1]["to"] == "api_first_body_sent"
    assert all(row["count"] == 2 and row["p50_ms"] >= 0 for row in rows)
