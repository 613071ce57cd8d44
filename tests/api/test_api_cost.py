"""`python -m bench.api_cost` runs the real app in-process and reports its per-request and per-token cost
(no timing is asserted: only that every request streamed every token and the figures are there)."""

from __future__ import annotations

import json

from bench.api_cost import main


def test_api_cost_reports_request_and_token_costs(tmp_path, capsys):
    assert main(["--requests", "20", "--tokens", "1", "4", "--cache-dir", str(tmp_path / "cache")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result["request_us"]) == {"1", "4"}
    assert all(value > 0 for value in result["request_us"].values())
    assert result["per_token_us"] is not None and result["per_request_us"] is not None
