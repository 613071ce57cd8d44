"""The Makefile runs everything with the venv's interpreter and has the targets the README names."""

from __future__ import annotations

import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def _recipes() -> dict[str, list[str]]:
    recipes: dict[str, list[str]] = {}
    target = None
    for line in (REPO_ROOT / "Makefile").read_text().splitlines():
        if match := re.match(r"^([A-Za-z$()._-]+):", line):
            target = match.group(1)
            recipes[target] = []
        elif line.startswith("\t") and target is not None:
            recipes[target].append(line.strip())
    return recipes


def test_every_python_command_uses_the_venv():
    for target, lines in _recipes().items():
        for line in lines:
            if "$(PY) -m venv" in line:
                continue  # the one place the system interpreter is right: creating the venv
            assert not re.search(r"(^|\s)python3?\s", line), f"{target}: {line}"


def test_readme_targets_exist():
    readme = (REPO_ROOT / "README.md").read_text()
    named = set(re.findall(r"`make ([a-z-]+)", readme)) | set(re.findall(r"^make ([a-z-]+)", readme, re.M))
    assert {"serve", "test", "demo", "test-triton"} <= named
    assert named <= set(_recipes()), named - set(_recipes())


def test_serve_on_the_cpu_sizes_memory_for_the_embedded_model():
    makefile = (REPO_ROOT / "Makefile").read_text()
    cpu_args = re.search(r"^CPU_SERVE_ARGS := (.+)$", makefile, re.M).group(1)
    assert "--kv-cache-blocks" in cpu_args and "--max-rank" in cpu_args
    assert "torch.cuda.is_available()" in re.search(r"^SERVE_ARGS \?= (.+)$", makefile, re.M).group(1)
    assert _recipes()["serve"] == ["$(BIN)/python -m server $(SERVE_ARGS)"]
