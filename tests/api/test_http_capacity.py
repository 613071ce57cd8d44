"""bench.http_capacity: the real server with a sleeping fake model streams every token of every request."""

from __future__ import annotations

import json
import os

from bench import http_capacity


def test_http_capacity_small_load(tmp_path):
    before = dict(os.environ)
    assert http_capacity.main(["--concurrency", "4", "--requests", "8", "--output-len", "8", "--prompt-len", "16",
                               "--step-ms", "2", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*-cpu-http-capacity-c4-thread.json")
    data = json.loads(path.read_text())
    assert data["load"]["requests_ok"] == 8 and data["load"]["output_tokens"] == 64
    assert data["load"]["errors_by_status"] == {}
    # A sleeping model bounds the rate: no load can beat its own time.
    assert 0 < data["ratios"]["serve_over_ideal"] <= 1.05
    assert dict(os.environ) == before  # the fake model's switch never leaks to later servers


def test_http_capacity_two_tenants(tmp_path):
    """--heavy-concurrency: the light tenant's load alone, then beside a heavy tenant's, each with its own key (the
    auth file's tenants): every light request served both times, the heavy tenant served meanwhile, and the ratio."""
    assert http_capacity.main(["--concurrency", "2", "--requests", "6", "--output-len", "8", "--prompt-len", "16",
                               "--step-ms", "2", "--heavy-concurrency", "4", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*-cpu-http-fairness-h4-thread.json")
    data = json.loads(path.read_text())
    for load in ("light_alone", "light_with_heavy"):
        assert data[load]["errors_by_status"] == {} and data[load]["requests_ok"] == 6
    assert data["heavy"]["tokens_per_s"] > 0
    assert data["ratios"]["fair_light_p99_ratio"] == (data["light_with_heavy"]["ttft_ms_p99"]
                                                      / data["light_alone"]["ttft_ms_p99"])
