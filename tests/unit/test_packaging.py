"""What an installed copy (the Dockerfile's `pip install .`, no source tree) needs beside the modules: every CUDA
source the kernels build from at first use is package data."""

from __future__ import annotations

import fnmatch
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]


def test_every_csrc_file_is_package_data():
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    csrc_files = sorted(path for path in (ROOT / "server").rglob("csrc/*") if path.is_file())
    assert csrc_files, "no csrc folder found under server/"
    for path in csrc_files:
        package_dir = path.parent.parent
        package = ".".join(package_dir.relative_to(ROOT).parts)
        assert (package_dir / "__init__.py").exists(), f"{package} is not a package"
        relative = str(path.relative_to(package_dir))
        globs = package_data.get(package, [])
        assert any(fnmatch.fnmatch(relative, glob) for glob in globs), f"{path} is not in {package}'s package-data"
