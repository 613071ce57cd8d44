"""LORAPLEX_PROFILE_DIR: the profiled block leaves a cProfile dump and a text summary; unset, nothing."""

from __future__ import annotations

import os

from server.profiling import ENV_DIR, profiled


def _busy() -> int:
    return sum(i * i for i in range(20000))


def test_profile_files_name_the_role_and_pid_and_list_the_costly_function(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_DIR, str(tmp_path / "prof"))
    with profiled("api"):
        _busy()
    stem = tmp_path / "prof" / f"api-{os.getpid()}"
    assert (stem.parent / f"{stem.name}.prof").stat().st_size > 0
    assert "_busy" in (stem.parent / f"{stem.name}.txt").read_text()


def test_without_the_variable_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_DIR, raising=False)
    monkeypatch.chdir(tmp_path)
    with profiled("engine"):
        _busy()
    assert list(tmp_path.iterdir()) == []
