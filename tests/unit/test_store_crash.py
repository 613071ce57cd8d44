"""adapters_store durability: failures and crashes mid-put never expose a partial version."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import adapters_store.records as records_module
import adapters_store.store as store_module
from adapters_store import AdapterIntegrityError, AdapterNotFoundError, AdapterStore, BaseModelSpec
from tests.unit.store_helpers import make_store, peft_adapter, save_tensors, snapshot

REPO_ROOT = Path(__file__).resolve().parents[2]


def seeded(root):
    store = make_store(root)
    adapter = peft_adapter(seed=0)
    return store, store.put("a", adapter.config_bytes, adapter.safetensors_bytes)


def assert_only_v1(root, record):
    reopened = make_store(root)
    assert reopened.list() == [record]
    assert reopened.get("a") == record
    assert sorted(os.listdir(root / "a")) == ["v1"]
    assert os.listdir(root / ".staging") == []
    q_a = reopened.load_weights(record).tensors[0, "q_proj"][0]
    assert torch.equal(q_a, peft_adapter(seed=0).lora_pair(0, "q_proj")[0])


def test_rename_failure_leaves_no_trace(tmp_path, monkeypatch):
    store, record = seeded(tmp_path)
    before = snapshot(tmp_path)
    new = peft_adapter(seed=1)

    def broken_rename(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(store_module.os, "rename", broken_rename)
    with pytest.raises(OSError, match="disk on fire"):
        store.put("a", new.config_bytes, new.safetensors_bytes)
    monkeypatch.undo()
    assert snapshot(tmp_path) == before
    assert_only_v1(tmp_path, record)


def test_manifest_write_failure_removes_the_version_dir(tmp_path, monkeypatch):
    store, record = seeded(tmp_path)
    new = peft_adapter(seed=1)
    real_write = records_module.write_file_durable

    def failing_manifest_write(path, data, **kwargs):
        if path.name.startswith("manifest"):
            raise OSError("no space left")
        real_write(path, data, **kwargs)

    monkeypatch.setattr(records_module, "write_file_durable", failing_manifest_write)
    with pytest.raises(OSError, match="no space left"):
        store.put("a", new.config_bytes, new.safetensors_bytes)
    monkeypatch.undo()
    assert store.get("a") == record
    assert_only_v1(tmp_path, record)
    assert store.put("a", new.config_bytes, new.safetensors_bytes).version == 2


def test_leftovers_of_a_crash_are_invisible_and_swept_at_start(tmp_path):
    store, record = seeded(tmp_path)
    new = peft_adapter(seed=1)
    # What a crash can leave: a half-written staging dir, a renamed version without manifest, a version
    # whose manifest is still a temp file, a half-deleted adapter in .trash, and a corrupt manifest.
    staging = tmp_path / ".staging" / "deadbeef"
    staging.mkdir()
    (staging / "adapter_config.json").write_bytes(new.config_bytes)
    (staging / "adapter_model.safetensors").write_bytes(new.safetensors_bytes[:100])
    for version, manifest in ((2, None), (3, "manifest.json.tmp"), (4, "manifest.json")):
        version_dir = tmp_path / "a" / f"v{version}"
        version_dir.mkdir()
        (version_dir / "adapter_config.json").write_bytes(new.config_bytes)
        (version_dir / "adapter_model.safetensors").write_bytes(new.safetensors_bytes)
        if manifest:
            (version_dir / manifest).write_text('{"name": "a", "version": ')
    (tmp_path / "ghost" / "v1").mkdir(parents=True)
    (tmp_path / ".trash" / "cafe" / "v1").mkdir(parents=True)
    (tmp_path / ".versions" / ".a.cafe").write_text("9")  # a tombstone that was never renamed
    assert store.get("a") == record
    assert [r.name for r in store.list()] == ["a"]
    assert_only_v1(tmp_path, record)
    assert not (tmp_path / "ghost").exists()
    assert os.listdir(tmp_path / ".trash") == []
    assert os.listdir(tmp_path / ".versions") == []
    assert make_store(tmp_path).put("a", new.config_bytes, new.safetensors_bytes).version == 2


def test_manifest_for_another_name_or_version_is_invalid(tmp_path):
    store, record = seeded(tmp_path)
    manifest = json.loads((record.path / "manifest.json").read_text())
    copy = tmp_path / "a" / "v2"
    copy.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (copy / name).write_bytes((record.path / name).read_bytes())
    (copy / "manifest.json").write_text(json.dumps(manifest))  # still says version 1
    assert store.get("a") == record
    with pytest.raises(AdapterNotFoundError, match="no version 2"):
        store.get("a", 2)


def test_load_weights_detects_tampering(tmp_path):
    store, record = seeded(tmp_path)
    tensors = peft_adapter(seed=0).tensors()
    tensors[next(iter(tensors))] = tensors[next(iter(tensors))] + 1
    (record.path / "adapter_model.safetensors").write_bytes(save_tensors(tensors))
    with pytest.raises(AdapterIntegrityError, match="changed on disk") as caught:
        store.load_weights(record)
    assert caught.value.status_code == 500
    store2, record2 = seeded(tmp_path / "other")
    config = json.loads((record2.path / "adapter_config.json").read_text())
    config["lora_alpha"] = 999
    (record2.path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterIntegrityError, match="adapter_config.json changed on disk"):
        store2.load_weights(record2)


def test_delete_is_atomic_rename_then_removal(tmp_path, monkeypatch):
    store, record = seeded(tmp_path)
    monkeypatch.setattr(store_module.shutil, "rmtree", lambda *args, **kwargs: None)
    store.delete("a")  # crash stand-in: the rmtree after the rename never happens
    monkeypatch.undo()
    assert store.list() == []
    assert not (tmp_path / "a").exists()
    assert len(os.listdir(tmp_path / ".trash")) == 1
    make_store(tmp_path)
    assert os.listdir(tmp_path / ".trash") == []


# One child imports adapters_store once, then forks a worker per kill point. Each worker puts v2 of a
# ~17 MB adapter; a hook on os.fsync / os.rename stops it right after the N-th call, and the test
# SIGKILLs it there. The "none" worker is killed after a random delay instead.
CHILD = """
import json, os, sys, time
from pathlib import Path
import torch
from adapters_store import AdapterStore, BaseModelSpec
torch.set_num_threads(1)  # the workers share a small CI machine; intra-op threads only contend there
spec_json, config_path, weights_path, *jobs = sys.argv[1:]
spec = BaseModelSpec(**json.loads(spec_json))
config, weights = Path(config_path).read_bytes(), Path(weights_path).read_bytes()
workers = {}
for job in jobs:
    root, point, count = job.split(",")
    pid = os.fork()
    if pid:
        workers[pid] = root
        continue
    store = AdapterStore(Path(root), spec, 64, 1 << 30)
    if point != "none":
        real, calls = getattr(os, point), [0]
        def hooked(*args):
            result = real(*args)
            calls[0] += 1
            if calls[0] == int(count):
                os.write(1, f"PAUSED {root} {os.getpid()}\\n".encode())
                time.sleep(60)
            return result
        setattr(os, point, hooked)
    os.write(1, f"START {root} {os.getpid()}\\n".encode())
    store.put("big", config, weights)
    os.write(1, f"DONE {root} {os.getpid()}\\n".encode())
    time.sleep(60)
    os._exit(0)
for _ in jobs:
    pid, status = os.wait()
    signum = os.WTERMSIG(status) if os.WIFSIGNALED(status) else -1
    os.write(1, f"REAPED {workers[pid]} {signum}\\n".encode())
"""

BIG_SPEC = BaseModelSpec(
    architecture="LlamaForCausalLM",
    model_type="llama",
    num_layers=4,
    module_shapes={
        "q_proj": (1024, 1024),
        "k_proj": (1024, 256),
        "v_proj": (1024, 256),
        "o_proj": (1024, 1024),
        "gate_proj": (1024, 2048),
        "up_proj": (1024, 2048),
        "down_proj": (2048, 1024),
    },
)


def make_big_store(root):
    return AdapterStore(root, BIG_SPEC, max_rank=64, max_bytes=1 << 30)


def big_adapter(rank: int, seed: int) -> tuple[bytes, bytes]:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(BIG_SPEC.num_layers):
        for module, (in_features, out_features) in BIG_SPEC.module_shapes.items():
            parent = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            key = f"base_model.model.model.layers.{layer}.{parent}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator)
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator)
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": sorted(BIG_SPEC.module_shapes),
    }
    return json.dumps(config).encode(), save_tensors(tensors)


# (hook, call number) -> (what the kill leaves on disk, version visible after reopening).
# fsync calls in a put: 1 config, 2 weights, 3 staging dir, 4 root, 5 adapter dir, 6 manifest tmp,
# 7 version dir; rename calls: 1 staging -> v2, 2 manifest tmp -> manifest.json.
KILL_POINTS = {
    ("fsync", "1"): (".staging/*/adapter_config.json", 1),
    ("fsync", "2"): (".staging/*/adapter_model.safetensors", 1),
    ("rename", "1"): ("big/v2/adapter_model.safetensors", 1),
    ("fsync", "6"): ("big/v2/manifest.json.tmp", 1),
    ("rename", "2"): ("big/v2/manifest.json", 2),
    ("none", "0"): ("", None),  # killed after a random delay: either version is fine
}


def _kill_if_alive(pid: int) -> None:
    """SIGKILL `pid` unless it is gone already (a worker that reached DONE first was killed and reaped there)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def test_sigkill_mid_put_leaves_old_or_new_version(tmp_path):
    small, big = big_adapter(rank=4, seed=0), big_adapter(rank=64, seed=1)
    assert len(big[1]) > 16_000_000
    (tmp_path / "config.json").write_bytes(big[0])
    (tmp_path / "weights.safetensors").write_bytes(big[1])
    roots = {str(tmp_path / f"root{index}"): point for index, point in enumerate(KILL_POINTS)}
    records = {root: make_big_store(Path(root)).put("big", *small) for root in roots}
    jobs = [f"{root},{point},{count}" for root, (point, count) in roots.items()]
    spec_json = json.dumps(BIG_SPEC.__dict__)
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            CHILD,
            spec_json,
            str(tmp_path / "config.json"),
            str(tmp_path / "weights.safetensors"),
        ]
        + jobs,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    watchdog = threading.Timer(120, child.kill)  # a hung worker fails the test instead of blocking it
    watchdog.daemon = True
    watchdog.start()
    reaped, finished = {}, set()
    try:
        for line in child.stdout:
            event, root, value = line.split()
            if event == "PAUSED":
                os.kill(int(value), signal.SIGKILL)
            elif event == "START" and roots[root][0] == "none":
                killer = threading.Timer(random.uniform(0.0, 0.5), _kill_if_alive, (int(value),))
                killer.daemon = True
                killer.start()
            elif event == "DONE":
                finished.add(roots[root])
                os.kill(int(value), signal.SIGKILL)
            elif event == "REAPED":
                reaped[root] = int(value)
    finally:
        watchdog.cancel()
        child.stdout.close()
    assert child.wait() == 0
    assert reaped == {root: signal.SIGKILL for root in roots}
    assert finished <= {("none", "0")}, "a worker finished its put without reaching its kill point"
    for root, point in roots.items():
        leftover, expected_version = KILL_POINTS[point]
        if leftover:
            assert list(Path(root).glob(leftover)), (point, leftover)
        store = make_big_store(Path(root))
        latest = store.get("big")
        assert os.listdir(Path(root) / ".staging") == [], point
        assert sorted(os.listdir(Path(root) / "big")) == [f"v{v}" for v in range(1, latest.version + 1)], point
        if expected_version is not None:
            assert latest.version == expected_version, point
        weights = store.load_weights(latest)
        if latest.version == 1:
            assert latest == records[root]
            assert weights.rank == 4
        else:
            assert weights.rank == 64
            assert len(weights.tensors) == 28
            assert latest.size_bytes == len(big[0]) + len(big[1])


@pytest.mark.parametrize("manifest_has_chunks", [True, False])
def test_one_flipped_byte_in_any_chunk_is_caught(tmp_path, monkeypatch, manifest_has_chunks):
    """The read-back checks the weights chunk by chunk (adapters_store.digests) when the manifest lists
    the chunks' sha256, and the whole file's when it predates them: a byte flipped anywhere fails both."""
    import adapters_store.digests as digests

    monkeypatch.setattr(digests, "CHUNK_BYTES", 4096)  # several chunks even for a small test adapter
    store, record = seeded(tmp_path)
    assert len(record.chunk_sha256) > 3 and store.get("a") == record
    if not manifest_has_chunks:
        manifest = json.loads((record.path / "manifest.json").read_text())
        manifest["chunk_sha256"] = []
        (record.path / "manifest.json").write_text(json.dumps(manifest))
        record = store.get("a")
        assert record.chunk_sha256 == []
    weights = record.path / "adapter_model.safetensors"
    pristine = weights.read_bytes()
    store.load_weights(record)  # intact: loads
    for offset in (len(pristine) - 1, len(pristine) // 2, 4096 * 2 + 7, 20):  # 20: in the JSON header
        flipped = bytearray(pristine)
        flipped[offset] ^= 0x01
        weights.write_bytes(bytes(flipped))
        with pytest.raises(AdapterIntegrityError, match="changed on disk"):
            store.load_weights(record)
    weights.write_bytes(pristine)
    store.load_weights(record)


@pytest.mark.parametrize("page_bytes", [4096, 64 << 10, 8 << 20])
@pytest.mark.parametrize("manifest_has_chunks", [True, False])
def test_read_into_pages_gives_the_same_tensors_and_catches_a_flipped_byte(tmp_path, monkeypatch, page_bytes,
                                                                           manifest_has_chunks):
    """`load_weights` with an allocator (the CPU tier's pinned pages) reads the file straight into pages of
    `page_bytes`, a tensor larger than a page into a block of its own; the tensors equal the plain read's,
    every tensor is a view of an allocated block, and the digests still catch any changed byte."""
    import adapters_store.digests as digests

    monkeypatch.setattr(digests, "CHUNK_BYTES", 4096)
    store, record = seeded(tmp_path)
    if not manifest_has_chunks:
        manifest = json.loads((record.path / "manifest.json").read_text())
        manifest["chunk_sha256"] = []
        (record.path / "manifest.json").write_text(json.dumps(manifest))
        record = store.get("a")
    blocks = []

    def allocate(n):
        blocks.append(torch.zeros(n, dtype=torch.uint8))
        return blocks[-1]

    plain = store.load_weights(record)
    paged = store.load_weights(record, allocate, page_bytes)
    storages = {b.untyped_storage().data_ptr() for b in blocks}
    assert all(n == page_bytes or n > page_bytes for n in (b.numel() for b in blocks))
    for key, (a, b) in plain.tensors.items():
        for mine, theirs in zip(paged.tensors[key], (a, b), strict=True):
            assert torch.equal(mine, theirs) and mine.untyped_storage().data_ptr() in storages
    weights = record.path / "adapter_model.safetensors"
    pristine = weights.read_bytes()
    for offset in (len(pristine) - 1, len(pristine) // 3, 20):
        flipped = bytearray(pristine)
        flipped[offset] ^= 0x01
        weights.write_bytes(bytes(flipped))
        with pytest.raises(AdapterIntegrityError, match="changed|adapter_model"):
            store.load_weights(record, allocate, page_bytes)
    weights.write_bytes(pristine)


def test_read_into_pages_handles_gaps_misaligned_tensors_and_tensors_larger_than_a_page(tmp_path):
    """A file laid out unusually but validly (bytes no tensor claims between tensors, a gap that leaves
    bf16 tensors at odd offsets, bytes after the last tensor, a tensor larger than a page) reads back into
    pages with the same tensors as the plain read and passes its digests: the gaps are hashed too."""
    from tests.unit.store_helpers import raw_safetensors

    adapter = peft_adapter(seed=3)
    tensors = {k: v.to(torch.bfloat16) for k, v in adapter.tensors().items()}
    entries, data = {}, bytearray()
    for i, (name, tensor) in enumerate(sorted(tensors.items())):
        data += b"\x07" * (3 if i % 2 else 0)  # a 3-byte gap before every other tensor: odd offsets
        raw = tensor.contiguous().view(torch.uint8).numpy().tobytes()
        offsets = [len(data), len(data) + len(raw)]
        entries[name] = {"dtype": "BF16", "shape": list(tensor.shape), "data_offsets": offsets}
        data += raw
    data += b"\x01" * 5  # trailing bytes after the last tensor
    store = make_store(tmp_path)
    record = store.put("odd", adapter.config_bytes, raw_safetensors(entries, bytes(data)))
    plain = store.load_weights(record)
    largest = max(t.numel() * 2 for t in tensors.values())
    for page_bytes in (largest // 2, 4096, 1 << 20):  # the largest tensor spans two pages' worth: own block
        paged = store.load_weights(record, lambda n: torch.zeros(n, dtype=torch.uint8), page_bytes)
        for key, pair in plain.tensors.items():
            for mine, theirs in zip(paged.tensors[key], pair, strict=True):
                assert torch.equal(mine, theirs)


def test_read_into_pages_reads_and_hashes_by_chunk_on_worker_threads_and_catches_a_short_read(tmp_path,
                                                                                            monkeypatch):
    """The paged read-back runs one task per digest chunk on worker threads of its own: each reads its chunk's
    bytes into the pages and hashes them, and the digests equal those of the whole file hashed at once.
    A file that ends early while it is read (it shrank after the header was read) is an integrity error,
    and no read is left running into the pages when load_weights raises."""
    import adapters_store.digests as digests
    import adapters_store.paged_read as paged_read

    monkeypatch.setattr(digests, "CHUNK_BYTES", 4096)
    store, record = seeded(tmp_path)
    path = record.path / "adapter_model.safetensors"
    pristine = path.read_bytes()
    reading_threads = set()
    real_preadv = os.preadv

    def recording_preadv(fd, buffers, offset):
        reading_threads.add(threading.current_thread().name)
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(paged_read.os, "preadv", recording_preadv)
    blocks = []

    def allocate(n):
        blocks.append(torch.zeros(n, dtype=torch.uint8))
        return blocks[-1]

    paged = paged_read.read_paged(path, 1 << 30, 4096, allocate)
    chunk_digests = [read.result() for read in paged.reads]
    assert len(chunk_digests) == -(-len(pristine) // 4096) > 2
    assert chunk_digests == digests.results(digests.submit_chunks(pristine)) == list(record.chunk_sha256)
    assert b"".join(bytes(segment) for segment in paged.segments) == pristine
    assert any(name.startswith("loraplex-read") for name in reading_threads)

    in_flight = []

    def short_preadv(fd, buffers, offset):
        if offset + len(buffers[0]) > len(pristine) // 2:
            return 0  # the file ended here
        return real_preadv(fd, buffers, offset)

    real_read_chunk = paged_read._read_chunk

    def tracked_read_chunk(*args):
        in_flight.append(1)
        try:
            return real_read_chunk(*args)
        finally:
            in_flight.pop()

    monkeypatch.setattr(paged_read.os, "preadv", short_preadv)
    monkeypatch.setattr(paged_read, "_read_chunk", tracked_read_chunk)
    with pytest.raises(AdapterIntegrityError, match="early"):
        store.load_weights(record, allocate, 4096)
    assert in_flight == []


def test_read_into_pages_completes_reads_that_return_short(tmp_path, monkeypatch):
    """`preadv` may fill less than asked (a signal, a network filesystem): the chunk's scattering read goes
    on from where it stopped, across the page boundaries, and the tensors and digests come out whole."""
    import adapters_store.digests as digests
    import adapters_store.paged_read as paged_read

    monkeypatch.setattr(digests, "CHUNK_BYTES", 64 << 10)
    store, record = seeded(tmp_path)
    plain = store.load_weights(record)
    real_preadv = os.preadv

    def stingy_preadv(fd, buffers, offset):  # 1,000 bytes a call at most
        first = memoryview(buffers[0])
        return real_preadv(fd, [first[: min(len(first), 1000)]], offset)

    monkeypatch.setattr(paged_read.os, "preadv", stingy_preadv)
    paged = store.load_weights(record, lambda n: torch.zeros(n, dtype=torch.uint8), 4096)
    for key, pair in plain.tensors.items():
        for mine, theirs in zip(paged.tensors[key], pair, strict=True):
            assert torch.equal(mine, theirs)
