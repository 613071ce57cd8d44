"""Shrink the GPU machine's wheel folder so it and the built CUDA extension fit the 64 MiB carry limit.

    python -m bench.slim_wheels [.whl] [--keep cpu,cuda13]

`../shared/gpu/wheels.sh` downloads bitsandbytes whole: 42 MB, almost all of it native libraries for
CUDA 11.8-12.8, ROCm and XPU. The GPU machine runs CUDA 13, so this rewrites the wheel in place with
only the libraries whose names carry a kept tag (`libbitsandbytes_cpu.so`, `..._cuda130.so`,
`..._cuda132.so`), and drops the others from its RECORD too (pip installs what RECORD lists). 42 MB -> 7 MB.
"""

from __future__ import annotations

import argparse
import re
import zipfile
from pathlib import Path

NATIVE = re.compile(r"libbitsandbytes_([a-z]+\d*)\.so$")


def keeps(name: str, tags: tuple[str, ...]) -> bool:
    """Whether a wheel member stays: everything but the native libraries of other backends."""
    found = NATIVE.search(name)
    return found is None or found.group(1).startswith(tags)


def slim(wheel: Path, tags: tuple[str, ...]) -> tuple[int, int]:
    """Rewrite `wheel` keeping only the native libraries of `tags`; returns (bytes before, after)."""
    before = wheel.stat().st_size
    slimmed = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(slimmed, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            if not keeps(info.filename, tags):
                continue
            data = source.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines()
                data = "\n".join(line for line in lines if keeps(line.split(",")[0], tags)).encode() + b"\n"
            target.writestr(info, data)
    slimmed.replace(wheel)
    return before, wheel.stat().st_size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", nargs="?", type=Path, default=Path(".whl"))
    parser.add_argument("--keep", default="cpu,cuda13", help="comma-separated library tag prefixes to keep")
    args = parser.parse_args(argv)
    tags = tuple(args.keep.split(","))
    for wheel in sorted(args.folder.glob("bitsandbytes-*.whl")):
        before, after = slim(wheel, tags)
        print(f"{wheel.name}: {before / 2**20:.1f} -> {after / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
