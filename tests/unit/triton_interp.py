"""Import a Triton kernel module under the Triton CPU interpreter, or skip the test."""

from __future__ import annotations

import importlib
import os
import sys

import pytest


def interpreted(module_name: str):
    """The module with TRITON_INTERPRET=1; opt-in with LORAPLEX_TRITON_INTERPRET=1 (CI does not set it)."""
    if os.environ.get("LORAPLEX_TRITON_INTERPRET") != "1":
        pytest.skip("set LORAPLEX_TRITON_INTERPRET=1 to run the Triton kernels under the interpreter")
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton was already imported for a GPU in this session")
    os.environ["TRITON_INTERPRET"] = "1"  # read when any @triton.jit runs, Triton's own included
    pytest.importorskip("triton")
    return importlib.import_module(module_name)
