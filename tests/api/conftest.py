"""API test fixtures (helpers live in tests/api/helpers.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.api.helpers import LiveServer, api_settings, live_server


@pytest.fixture(scope="module")
def open_server(tiny_llama_dir, tmp_path_factory) -> Iterator[LiveServer]:
    """One open-mode server per test module (own adapter store)."""
    with live_server(api_settings(tiny_llama_dir, tmp_path_factory.mktemp("store"))) as live:
        yield live
