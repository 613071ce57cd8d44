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
