"""`python -m bench.hop_trace DIR [--skip N] [--json]`: the hop-to-hop table of a LORAPLEX_HOP_TRACE directory.

Joins every process's `hops-<pid>.txt` (server.hop_trace) by request id; requests are ordered by their
first hop and the first `--skip` left out (warm-up). Each row is one hop to the next hop that the
requests recorded (hops nobody recorded, e.g. the engine process's with the engine in a thread, are
left out; a request missing a hop others have is left out of the rows around it), in ms: p50, mean,
p99 and the number of requests.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from server.hop_trace import HOPS


def read(directory: Path) -> dict[str, dict[str, float]]:
    """request id -> hop -> the first time it was marked."""
    requests: dict[str, dict[str, float]] = defaultdict(dict)
    for path in sorted(directory.glob("hops-*.txt")):
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) != 3:
                continue  # a line cut short by a killed process
            request_id, hop, at = parts
            requests[request_id].setdefault(hop, float(at))
    return dict(requests)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summarize(requests: dict[str, dict[str, float]], skip: int = 0) -> list[dict]:
    """One row per pair of consecutive recorded hops: {"from", "to", "p50_ms", "mean_ms", "p99_ms", "count"},
    and a last row from the first hop to the last."""
    ordered = sorted(requests.values(), key=lambda hops: min(hops.values()))[skip:]
    present = [hop for hop in HOPS if any(hop in hops for hops in ordered)]
    rows = []
    for start, end in [*zip(present, present[1:], strict=False), (present[0], present[-1])] if present else []:
        gaps = [(hops[end] - hops[start]) * 1e3 for hops in ordered if start in hops and end in hops]
        if gaps:
            rows.append({"from": start, "to": end, "p50_ms": statistics.median(gaps),
                         "mean_ms": statistics.fmean(gaps), "p99_ms": _percentile(gaps, 99), "count": len(gaps)})
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'hop':<44} {'p50 ms':>8} {'mean ms':>8} {'p99 ms':>8} {'count':>6}"]
    for row in rows:
        lines.append(f"{row['from'] + ' -> ' + row['to']:<44} {row['p50_ms']:8.2f} {row['mean_ms']:8.2f} "
                     f"{row['p99_ms']:8.2f} {row['count']:6d}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--skip", type=int, default=0, help="leave out the first N requests (warm-up)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    rows = summarize(read(args.directory), args.skip)
    print(json.dumps(rows, indent=1) if args.json else format_rows(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
