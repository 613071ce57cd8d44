"""API test fixtures (helpers live in tests/api/helpers.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.api.helpers import ENGINE_MODES, LiveServer, api_settings, live_server


@pytest.fixture(scope="module", params=list(ENGINE_MODES))
def open_server(request, tiny_llama_dir, tmp_path_factory) -> Iterator[LiveServer]:
    """One open-mode server per test module (own adapter store), with the engine in a thread and in its
    own process."""
    settings = api_settings(tiny_llama_dir, tmp_path_factory.mktemp("store"),
                            engine_process=ENGINE_MODES[request.param])
    with live_server(settings) as live:
        yield live
