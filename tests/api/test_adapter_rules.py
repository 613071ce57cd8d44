"""Adapter routes: exact names, the base model's id is reserved, owners, a full disk (issue 9, 5 and 8)."""

from __future__ import annotations

import errno
import hashlib
import os

import pytest

import adapters_store.store as store_module
from tests.api.helpers import BASE_ID, api_settings, assert_error, live_server, upload, upload_files

KEYS = {"alice": "key-alice-admin", "bob": "key-bob-admin"}


def _sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


KEYS_TOML = "".join(f"""
[[keys]]
key_sha256 = "{_sha(key)}"
tenant = "{tenant}"
scopes = ["generate", "admin"]
adapters = ["{tenant}-*", "shared-*", "{BASE_ID}"]
""" for tenant, key in KEYS.items())


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    keys_file = tmp_path_factory.mktemp("auth") / "keys.toml"
    keys_file.write_text(KEYS_TOML)
    settings = api_settings(tiny_llama_dir, tmp_path_factory.mktemp("store"), auth_file=keys_file)
    with live_server(settings) as live:
        yield live


@pytest.mark.parametrize("suffix", ["%0A", "%0D%0A"])
def test_a_name_with_a_trailing_newline_is_refused_on_every_route(server, tiny_adapters, suffix):
    with server.client(KEYS["alice"]) as client:
        version = upload(client, "alice-good", tiny_adapters["attn-r4"])["version"]
        response = upload_files(client, f"alice-good{suffix}", tiny_adapters["attn-r4"])
        assert_error(response, 400, "invalid adapter name", "alice-good\\")
        assert_error(client.get(f"/v1/adapters/alice-good{suffix}"), 400, "invalid adapter name")
        assert_error(client.delete(f"/v1/adapters/alice-good{suffix}"), 400, "invalid adapter name")
        assert client.get("/v1/adapters/alice-good").json()["version"] == version  # untouched
        assert client.delete("/v1/adapters/alice-good").status_code == 200


def test_the_base_model_id_cannot_name_an_adapter(server, tiny_adapters):
    with server.client(KEYS["alice"]) as client:
        assert_error(upload_files(client, BASE_ID, tiny_adapters["attn-r4"]), 409, BASE_ID, "base model")
        ids = [card["id"] for card in client.get("/v1/models").json()["data"]]
    assert ids.count(BASE_ID) == 1


def test_owned_by_is_the_uploading_tenant(server, tiny_adapters):
    with server.client(KEYS["alice"]) as alice, server.client(KEYS["bob"]) as bob:
        upload(alice, "shared-a", tiny_adapters["attn-r4"])
        upload(bob, "shared-b", tiny_adapters["attn-r4"])
        for client in (alice, bob):
            cards = {card["id"]: card for card in client.get("/v1/models").json()["data"]}
            assert cards["shared-a"]["owned_by"] == "alice"
            assert cards["shared-b"]["owned_by"] == "bob"
            assert cards[BASE_ID]["owned_by"] == "loraplex"
        assert alice.delete("/v1/adapters/shared-a").status_code == 200
        assert bob.delete("/v1/adapters/shared-b").status_code == 200


class FullDisk:
    """fsync fails with ENOSPC (every store write fsyncs) until the store removes files."""

    def __init__(self, monkeypatch):
        self.is_full = True
        real_fsync, real_rmtree = os.fsync, store_module.shutil.rmtree

        def fsync(fd):
            if self.is_full:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_fsync(fd)

        def rmtree(*args, **kwargs):
            real_rmtree(*args, **kwargs)
            self.is_full = False

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(store_module.shutil, "rmtree", rmtree)


def test_upload_on_a_full_disk_is_507_and_delete_still_works(server, tiny_adapters, monkeypatch):
    root = server.state.store.root
    with server.client(KEYS["alice"]) as client:
        upload(client, "alice-full", tiny_adapters["attn-r4"])
        before = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
        disk = FullDisk(monkeypatch)
        assert_error(upload_files(client, "alice-new", tiny_adapters["attn-r4"]), 507, "no space left", "alice-new")
        disk.is_full = True  # the failed put cleaned up its staging dir: still full
        response = upload_files(client, "alice-full", tiny_adapters["attn-r4"])
        assert_error(response, 507, "no space left", "alice-full")
        disk.is_full = True
        assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == before
        assert client.get("/v1/adapters/alice-full").json()["version"] == 1
        assert client.delete("/v1/adapters/alice-full").status_code == 200
        monkeypatch.undo()
        assert_error(client.get("/v1/adapters/alice-full"), 404)
        assert not (root / "alice-full").exists() and os.listdir(root / ".trash") == []
        assert (root / ".versions" / "alice-full").read_text() == "1"


def test_the_server_keeps_adapter_versions_kept_versions(server, tiny_adapters):
    kept = server.state.settings.adapter_versions_kept
    with server.client(KEYS["alice"]) as client:
        versions = [upload(client, "alice-many", tiny_adapters["attn-r4"])["version"] for _ in range(kept + 3)]
        assert client.post("/v1/completions", json={"model": "alice-many", "prompt": "Hi",
                                                     "max_tokens": 2}).status_code == 200
    on_disk = sorted(p.name for p in (server.state.store.root / "alice-many").iterdir())
    assert on_disk == sorted(f"v{v}" for v in versions[-kept:])
