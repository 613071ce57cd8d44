"""Opt-in whole-process profiles for serving runs where py-spy cannot attach (the GPU machine allows no
ptrace): LORAPLEX_PROFILE_DIR=DIR makes the API process and the engine process each run under cProfile
and, on a clean exit, write DIR/<role>-<pid>.prof and the 40 costliest functions by own time as
DIR/<role>-<pid>.txt. cProfile slows Python-heavy code about twofold, so read the shares, not the
absolute times."""

from __future__ import annotations

import contextlib
import cProfile
import io
import os
import pstats
from collections.abc import Iterator
from pathlib import Path

ENV_DIR = "LORAPLEX_PROFILE_DIR"


@contextlib.contextmanager
def profiled(role: str) -> Iterator[None]:
    """Profile the body when LORAPLEX_PROFILE_DIR is set (else do nothing)."""
    directory = os.environ.get(ENV_DIR)
    if not directory:
        yield
        return
    profile = cProfile.Profile()
    profile.enable()
    try:
        yield
    finally:
        profile.disable()
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        stem = out / f"{role}-{os.getpid()}"
        profile.dump_stats(f"{stem}.prof")
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(40)
        Path(f"{stem}.txt").write_text(text.getvalue())
