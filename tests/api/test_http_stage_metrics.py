"""The API's stages of a request's time to first token are exported, and they add up inside the client's."""

from __future__ import annotations

import time

from tests.api.helpers import BASE_ID


def _histogram(text: str, name: str) -> tuple[float, float]:
    """(count, sum) of a histogram summed over its labels."""
    count = total = 0.0
    for line in text.splitlines():
        if line.startswith(f"{name}_count"):
            count += float(line.rsplit(" ", 1)[1])
        elif line.startswith(f"{name}_sum"):
            total += float(line.rsplit(" ", 1)[1])
    return count, total


def test_admission_and_first_output_are_observed_once_per_request_and_fit_in_its_latency(open_server):
    with open_server.client() as client:
        before = client.get("/metrics").text
        start = time.monotonic()
        for i in range(3):
            reply = client.post("/v1/completions", json={"model": BASE_ID, "prompt": [5, 6, 7 + i],
                                                         "max_tokens": 2, "stream": i % 2 == 0})
            assert reply.status_code == 200
        elapsed = time.monotonic() - start
        after = client.get("/metrics").text
    for name in ("loraplex_http_admission_seconds", "loraplex_http_first_output_seconds"):
        (count0, sum0), (count1, sum1) = _histogram(before, name), _histogram(after, name)
        assert count1 - count0 == 3, name
        assert 0.0 < sum1 - sum0 < elapsed, name
