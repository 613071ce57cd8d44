"""Several processes writing one adapter store root (replicas sharing a disk): versions stay unique and
consecutive, no acknowledged version is lost, and a starting process does not sweep another's work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.unit.store_helpers import make_store

WRITER = """
import json, sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
from tests.unit.store_helpers import make_store, peft_adapter
store = make_store(Path({root!r}))
adapter = peft_adapter(r=4, seed={seed})
while time.time() < {start}:  # all writers start together
    time.sleep(0.001)
acked = [store.put("shared", adapter.config_bytes, adapter.safetensors_bytes).version for _ in range({count})]
print(json.dumps(acked))
"""


WRITERS, COUNT = 3, 15


def test_processes_uploading_one_name_get_distinct_versions(tmp_path):
    repo = str(Path(__file__).resolve().parents[2])
    root = tmp_path / "store"
    make_store(root)  # create the layout once
    import time

    start = time.time() + 12  # after every writer has imported torch and built its adapter
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER.format(repo=repo, root=str(root), seed=seed, count=COUNT,
                                                              start=start)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for seed in range(WRITERS)
    ]
    acked = []
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-2000:]
        acked += json.loads(out.strip().splitlines()[-1])
    assert sorted(acked) == list(range(1, WRITERS * COUNT + 1))  # each acknowledged version is unique
    store = make_store(root)  # a new process's start-up sweep keeps every committed version
    for version in acked:
        record = store.get("shared", version)
        assert record.version == version and (record.path / "manifest.json").is_file()
    assert list((root / ".staging").iterdir()) == []
