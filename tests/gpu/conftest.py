"""GPU-suite fixtures. An engine built by a test (LORAPLEX_NF4_AUTOTUNE, on by default) fills nf4_dispatch.TUNED,
which every later NF4 matmul of the process consults first; each test module gets the table as it found it back, so
that one module's engines cannot change which kernel another module's tests run."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="module")
def _tuned_kernels_stay_in_their_module():
    from server.kernels.nf4 import nf4_dispatch

    saved = dict(nf4_dispatch.TUNED)
    yield
    nf4_dispatch.TUNED.clear()
    nf4_dispatch.TUNED.update(saved)
