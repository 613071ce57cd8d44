"""The CPU image builds, starts, passes its HEALTHCHECK and becomes ready (deploy/image_smoke.sh).

Needs root, podman and minutes, so it runs only when asked: LORAPLEX_IMAGE_TEST=1. In the loraplex
sandbox (no registry, crun refused) also set the stand-ins the script documents, e.g.
LORAPLEX_IMAGE_TEST=1 SMOKE_LOCAL_BASE=1 SMOKE_WHEELS=/opt/wheels SMOKE_CHROOT=1.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.api.helpers import REPO_ROOT

pytestmark = pytest.mark.skipif(
    os.environ.get("LORAPLEX_IMAGE_TEST") != "1" or shutil.which("podman") is None,
    reason="set LORAPLEX_IMAGE_TEST=1 on a machine with podman (root) to build and start the image",
)


def test_cpu_image_builds_starts_and_becomes_ready():
    done = subprocess.run(["bash", "deploy/image_smoke.sh"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    assert '"status":"ready"' in done.stdout
    assert "HEALTHCHECK passes" in done.stderr
