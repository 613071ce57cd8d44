"""adapters_store archive uploads: unsafe layouts, links and bombs are refused, store unchanged."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import tarfile
import tracemalloc
import zipfile

import pytest

from adapters_store import AdapterTooLargeError, AdapterValidationError
from adapters_store.archive import EXPANSION_FLOOR, MAX_EXPANSION, extract_adapter_files, uncompressed_limit
from tests.unit.store_helpers import (
    adapter_members,
    make_store,
    make_tar_gz,
    make_zip,
    peft_adapter,
    snapshot,
)

LIMIT = 1024 * 1024


def members(prefix=""):
    return adapter_members(peft_adapter(targets=("q_proj", "v_proj")), prefix)


BAD_LAYOUTS = {
    "dot-dot component": (members() | {"../evil.txt": b"x"}, "'..' path component"),
    "dot-dot inside path": (members() | {"a/../../evil": b"x"}, "'..' path component"),
    "absolute path": (members() | {"/etc/evil": b"x"}, "absolute path"),
    "nested deeper than one folder": (members("a/b/"), "is nested"),
    "root files mixed with a folder": (members() | {"extra/README.md": b"x"}, "is nested"),
    "two top-level folders": (members("a/") | {"b/README.md": b"x"}, "is nested"),
    "missing safetensors": (
        {"adapter_config.json": members()["adapter_config.json"]},
        "no adapter_model.safetensors",
    ),
    "pickle checkpoint instead": (
        {"adapter_config.json": members()["adapter_config.json"], "adapter_model.bin": pickle.dumps({})},
        "pickle checkpoint (.bin/.pt), which is not accepted",
    ),
    "empty archive": ({}, "archive contains no files"),
}


@pytest.fixture
def seeded_store(tmp_path):
    store = make_store(tmp_path, max_bytes=LIMIT)
    adapter = peft_adapter(targets=("q_proj", "v_proj"))
    record = store.put("prod", adapter.config_bytes, adapter.safetensors_bytes)
    return store, record, tmp_path


def assert_rejected(store, record, root, archive, error, message):
    before = snapshot(root)
    with pytest.raises(error) as caught:
        store.put_archive("prod", archive)
    assert message in str(caught.value)
    assert snapshot(root) == before
    assert store.list() == [record]


@pytest.mark.parametrize("case", list(BAD_LAYOUTS), ids=list(BAD_LAYOUTS))
@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_bad_layout_rejected(seeded_store, case, kind):
    layout, message = BAD_LAYOUTS[case]
    archive = make_zip(layout) if kind == "zip" else make_tar_gz(layout)
    assert_rejected(*seeded_store, archive, AdapterValidationError, message)


@pytest.mark.parametrize("link_type", [tarfile.SYMTYPE, tarfile.LNKTYPE], ids=["symlink", "hardlink"])
def test_tar_links_rejected(seeded_store, link_type):
    files = members()
    weights = files.pop("adapter_model.safetensors")
    archive = make_tar_gz(
        files | {"real.bin": weights}, links={"adapter_model.safetensors": (link_type, "real.bin")}
    )
    assert_rejected(*seeded_store, archive, AdapterValidationError, "is a link; links are not accepted")


def test_tar_symlink_to_outside_rejected_even_if_unused(seeded_store):
    archive = make_tar_gz(members(), links={"notes": (tarfile.SYMTYPE, "/etc/passwd")})
    assert_rejected(*seeded_store, archive, AdapterValidationError, "'notes' is a link")


def test_tar_device_rejected(seeded_store):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in members().items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        device = tarfile.TarInfo("null")
        device.type = tarfile.CHRTYPE
        archive.addfile(device)
    assert_rejected(*seeded_store, buffer.getvalue(), AdapterValidationError, "'null' is not a regular file")


def test_zip_symlink_rejected(seeded_store):
    files = members()
    archive = make_zip(files, symlinks=("adapter_model.safetensors",))
    assert_rejected(*seeded_store, archive, AdapterValidationError, "is a link; links are not accepted")


def test_zip_duplicate_member_rejected(seeded_store):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members().items():
            archive.writestr(name, data)
        archive.writestr("./adapter_config.json", b"{}")
    assert_rejected(*seeded_store, buffer.getvalue(), AdapterValidationError, "appears twice")


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_compression_bomb_is_413(seeded_store, kind):
    bomb = members() | {"README.md": b"\0" * (16 * LIMIT)}  # 16 MiB of zeros, ~16 KiB compressed
    archive = make_zip(bomb) if kind == "zip" else make_tar_gz(bomb)
    assert len(archive) < LIMIT
    assert_rejected(*seeded_store, archive, AdapterTooLargeError, f"exceeds the {LIMIT}-byte limit")


def test_tar_pax_header_bomb_is_stopped_while_decompressing(seeded_store):
    """Declared member sizes are small; only counting decompressed bytes catches a huge pax header."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.PAX_FORMAT) as archive:
        for name, data in members().items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.pax_headers = {"comment": "z" * (8 * LIMIT)}
            archive.addfile(info, io.BytesIO(data))
    assert len(buffer.getvalue()) < LIMIT
    assert_rejected(*seeded_store, buffer.getvalue(), AdapterTooLargeError, "when uncompressed")


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_oversize_safetensors_is_413(seeded_store, kind):
    files = members()
    files["adapter_model.safetensors"] += b"\0" * LIMIT
    archive = make_zip(files) if kind == "zip" else make_tar_gz(files)
    assert_rejected(*seeded_store, archive, AdapterTooLargeError, "when uncompressed")


def test_zip_lying_about_its_size_is_stopped(seeded_store):
    """A zip whose directory declares a tiny size for a big deflated member never yields the big bytes."""
    files = members()
    files["adapter_model.safetensors"] = b"\0" * (32 * LIMIT)
    archive = bytearray(make_zip(files))
    patched = 0
    # uncompressed-size field: offset 22 in a local header, 24 in a central directory entry
    for signature, size_offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        start = 0
        while (start := archive.find(signature, start)) != -1:
            (declared,) = struct.unpack_from("<I", archive, start + size_offset)
            if declared == 32 * LIMIT:
                struct.pack_into("<I", archive, start + size_offset, 1000)
                patched += 1
            start += 4
    assert patched == 2
    store, record, root = seeded_store
    before = snapshot(root)
    with pytest.raises(AdapterValidationError, match="could not be read"):
        store.put_archive("prod", bytes(archive))
    assert snapshot(root) == before


def test_not_an_archive(seeded_store):
    assert_rejected(*seeded_store, b"just some text", AdapterValidationError, "neither a .tar.gz nor a .zip")
    assert_rejected(
        *seeded_store, gzip.compress(b"not a tar" * 100), AdapterValidationError, "not a valid .tar.gz"
    )
    assert_rejected(*seeded_store, b"PK\x03\x04garbage", AdapterValidationError, "not a valid .zip")


SERVER_LIMIT = 512 << 20  # the server's default max_upload_bytes


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
@pytest.mark.parametrize("member", ["adapter_model.safetensors", "README.md"])
def test_small_archive_that_expands_far_is_refused_without_decompressing_it(kind, member):
    """64 MiB of zeros in a ~64 KiB archive is under the size limit, but no adapter compresses 1000x:
    refused by the expansion bound, holding a few MiB at most (it used to read all 64 MiB, twice)."""
    files = members() | {member: bytes(64 << 20)}
    archive = make_zip(files) if kind == "zip" else make_tar_gz(files)
    del files
    assert len(archive) < 256 * 1024
    tracemalloc.start()
    try:
        with pytest.raises(AdapterTooLargeError, match=f"over {MAX_EXPANSION}x its own"):
            extract_adapter_files(archive, SERVER_LIMIT)
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak_bytes < 4 * EXPANSION_FLOOR


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_archives_of_real_weights_pass_the_expansion_bound(kind):
    """Incompressible weights, and an untrained adapter (B all zero, ~2x), well past the floor."""
    random_half = os.urandom(EXPANSION_FLOOR)
    for weights in (random_half * 2, random_half + bytes(EXPANSION_FLOOR)):
        files = {"adapter_config.json": b"{}", "adapter_model.safetensors": weights}
        archive = make_zip(files) if kind == "zip" else make_tar_gz(files)
        assert extract_adapter_files(archive, SERVER_LIMIT) == (b"{}", weights)
    assert uncompressed_limit(1000, SERVER_LIMIT) == EXPANSION_FLOOR
    assert uncompressed_limit(100 << 20, SERVER_LIMIT) == SERVER_LIMIT
