"""`python -m bench.api_cost` runs the real app in-process and reports its per-request and per-token cost
(no timing is asserted: only that every request streamed every token, which it checks itself, and that the
figures are there). In a subprocess: its app's metric series would otherwise stay in this process's registry."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_api_cost_reports_request_and_token_costs(tmp_path):
    done = subprocess.run([sys.executable, "-m", "bench.api_cost", "--requests", "20", "--tokens", "1", "4",
                           "--cache-dir", str(tmp_path / "cache")], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(result["request_us"]) == {"1", "4"}
    assert all(value > 0 for value in result["request_us"].values())
    assert result["per_token_us"] is not None and result["per_request_us"] is not None
