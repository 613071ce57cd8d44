"""Where a kernel's warps wait, instruction by instruction: read ncu's source page (gpu_nf4.sh NCU_SOURCE=1 writes
it as source_sass.csv.gz: warp-stall samples per SASS instruction) and print each profiled kernel's stall reasons
and the instructions that hold the most samples, with their top reasons.

    python -m bench.ncu_source bench/results/<file>.csv.gz [--kernel 0] [--top 25] [--around 371]

A wait on `long_sb` at an instruction that only moves or consumes a loaded register is the loop waiting out a global
load; `--around N` lists the loop's loads, MMAs, barriers and moves near instruction N to find which load.
"""

from __future__ import annotations

import argparse
import collections
import csv
import gzip
from pathlib import Path

SAMPLES = "Warp Stall Sampling (All Samples)"
LANDMARKS = ("LDG", "LDS", "STS", "MMA", "BAR", "BRA", "DEPBAR", "FENCE", "IMAD.MOV", "UMOV")


def kernels(path: Path) -> list[tuple[str, list[str], list[list[str]]]]:
    """(kernel name, header, instruction rows) for each profiled launch in the csv."""
    with gzip.open(path, "rt") if path.suffix == ".gz" else path.open() as f:
        rows = list(csv.reader(f))
    found, i = [], 0
    while i < len(rows):
        if rows[i] and rows[i][0] == "Kernel Name":
            name, header, lines, i = rows[i][1], rows[i + 1], [], i + 2
            while i < len(rows) and rows[i] and rows[i][0] != "Kernel Name":
                lines.append(rows[i])
                i += 1
            found.append((name, header, lines))
        else:
            i += 1
    return found


def summary(header: list[str], lines: list[list[str]], top: int) -> list[str]:
    col = {h: k for k, h in enumerate(header)}
    reasons = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]
    count = lambda line, name: int(line[col[name]] or 0)  # noqa: E731
    total = sum(count(line, SAMPLES) for line in lines) or 1
    by_reason = collections.Counter({r[6:]: sum(count(line, r) for line in lines) for r in reasons})
    out = [f"{total} samples; " + ", ".join(f"{r} {n / total:.3f}" for r, n in by_reason.most_common(8))]
    for index, line in sorted(enumerate(lines), key=lambda e: -count(e[1], SAMPLES))[:top]:
        best = sorted(((count(line, r), r[6:]) for r in reasons), reverse=True)[:3]
        out.append(f"{index:5d} {count(line, SAMPLES) / total:6.3f} {line[1].strip()[:64]:64s} "
                   + ", ".join(f"{r} {n}" for n, r in best if n))
    return out


def around(header: list[str], lines: list[list[str]], center: int, span: int = 200) -> list[str]:
    col = {h: k for k, h in enumerate(header)}
    return [f"{k:5d} {int(lines[k][col[SAMPLES]] or 0):6d} {lines[k][1].strip()[:90]}"
            for k in range(max(0, center - span), min(len(lines), center + span))
            if any(mark in lines[k][1] for mark in LANDMARKS)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("csv", type=Path)
    parser.add_argument("--kernel", type=int, default=None, help="index of the launch (default: every launch)")
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--around", type=int, default=None, help="list the landmarks near this instruction")
    args = parser.parse_args()
    for index, (name, header, lines) in enumerate(kernels(args.csv)):
        if args.kernel is not None and index != args.kernel:
            continue
        print(f"[{index}] {name[:150]} ({len(lines)} instructions)")
        print("\n".join(summary(header, lines, args.top)))
        if args.around is not None:
            print("\n".join(around(header, lines, args.around)))


if __name__ == "__main__":
    main()
