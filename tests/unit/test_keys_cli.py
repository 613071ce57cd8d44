"""`loraplex keys add|list|revoke`: keys the server accepts, only hashes on disk, comments kept."""

from __future__ import annotations

import logging
import stat

import pytest

from server import __main__ as server_main
from server import keys_cli, serving
from server.api.auth import KeyRing, hash_key
from server.config import Settings


def _add(path, *args, capsys) -> str:
    assert server_main.main(["keys", "add", "--file", str(path), *args]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith(keys_cli.KEY_PREFIX) and "\n" not in out  # stdout holds the key and nothing else
    return out


@pytest.mark.parametrize("suffix", [".toml", ".yaml"])
def test_added_key_authenticates_with_its_scopes_and_globs(tmp_path, capsys, suffix):
    path = tmp_path / f"keys{suffix}"
    key = _add(path, "--tenant", "acme", "--scopes", "generate,admin", "--adapters", "acme-*,shared-?", capsys=capsys)
    other = _add(path, "--tenant", "bob", capsys=capsys)
    text = path.read_text()
    assert key not in text and hash_key(key).hex() in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    ring = KeyRing.from_file(path)
    principal = ring.authenticate(key)
    assert principal.tenant == "acme" and principal.scopes == {"generate", "admin"}
    assert principal.may_use("acme-sql") and principal.may_use("shared-1") and not principal.may_use("bob-x")
    bob = ring.authenticate(other)
    assert bob.scopes == {"generate"} and not bob.may_use("acme-sql")
    assert ring.authenticate("lpx_wrong") is None


def test_keys_are_random_and_long():
    keys = {keys_cli.new_key() for _ in range(100)}
    assert len(keys) == 100 and min(len(k) for k in keys) >= 40


def test_file_flag_before_the_subcommand_and_from_env(tmp_path, capsys, monkeypatch):
    path = tmp_path / "keys.toml"
    assert server_main.main(["keys", "--file", str(path), "add", "--tenant", "a"]) == 0
    monkeypatch.setenv("LORAPLEX_AUTH_FILE", str(path))
    assert keys_cli.main(["add", "--tenant", "b"]) == 0
    assert keys_cli.summarize(path) == (2, 2)


def test_list_shows_short_hashes_never_keys(tmp_path, capsys):
    path = tmp_path / "keys.toml"
    key = _add(path, "--tenant", "acme", "--adapters", "acme-*", capsys=capsys)
    assert keys_cli.main(["list", "--file", str(path)]) == 0
    captured = capsys.readouterr()
    assert hash_key(key).hex()[:12] in captured.out and key not in captured.out
    assert "tenant=acme" in captured.out and "adapters=acme-*" in captured.out
    assert "1 keys, 1 tenants" in captured.err


def test_revoke_by_prefix_key_or_tenant_keeps_comments(tmp_path, capsys):
    path = tmp_path / "keys.toml"
    path.write_text("# ops: rotate quarterly\n")
    keep = _add(path, "--tenant", "keep", capsys=capsys)
    by_prefix = _add(path, "--tenant", "acme", capsys=capsys)
    by_key = _add(path, "--tenant", "acme", capsys=capsys)
    by_tenant = [_add(path, "--tenant", "bob", capsys=capsys) for _ in range(2)]
    assert keys_cli.main(["revoke", "--file", str(path), hash_key(by_prefix).hex()[:8]]) == 0
    assert keys_cli.main(["revoke", "--file", str(path), "--key", by_key]) == 0
    assert keys_cli.main(["revoke", "--file", str(path), "--tenant", "bob"]) == 0
    ring = KeyRing.from_file(path)
    assert len(ring) == 1 and ring.authenticate(keep) is not None
    assert all(ring.authenticate(k) is None for k in [by_prefix, by_key, *by_tenant])
    assert path.read_text().startswith("# ops: rotate quarterly\n")


def test_revoke_refuses_ambiguous_unknown_or_last(tmp_path, capsys):
    path = tmp_path / "keys.toml"
    only = _add(path, "--tenant", "acme", capsys=capsys)
    assert keys_cli.main(["revoke", "--file", str(path), "--key", only]) == 1
    assert "every key" in capsys.readouterr().err
    assert keys_cli.main(["revoke", "--file", str(path), "--tenant", "nobody"]) == 1
    assert keys_cli.main(["revoke", "--file", str(path), "abc"]) == 1  # too short a prefix
    assert KeyRing.from_file(path).authenticate(only) is not None


def test_tenant_rate_limit_is_shared_and_inherited(tmp_path, capsys):
    path = tmp_path / "keys.toml"
    _add(path, "--tenant", "acme", "--requests-per-second", "5", "--tokens-per-minute", "20000", capsys=capsys)
    second = _add(path, "--tenant", "acme", capsys=capsys)  # inherits the tenant's limit
    limit = KeyRing.from_file(path).authenticate(second).rate_limit
    assert (limit.requests_per_second, limit.tokens_per_minute) == (5, 20000)
    before = path.read_text()
    assert keys_cli.main(["add", "--file", str(path), "--tenant", "acme", "--requests-per-second", "9"]) == 1
    assert "rate_limit" in capsys.readouterr().err
    assert path.read_text() == before  # a refused change leaves the file untouched


@pytest.mark.parametrize("args,message", [
    (["--tenant", "a", "--scopes", "generate,root"], "scopes"),
    (["--tenant", ""], "tenant"),
])
def test_bad_input_exits_1_naming_the_field(tmp_path, capsys, args, message):
    path = tmp_path / "keys.toml"
    assert keys_cli.main(["add", "--file", str(path), *args]) == 1
    assert message in capsys.readouterr().err and not path.exists()


def test_wrong_suffix_and_missing_file_flag(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LORAPLEX_AUTH_FILE", raising=False)
    assert keys_cli.main(["add", "--file", str(tmp_path / "keys.json"), "--tenant", "a"]) == 1
    assert keys_cli.main(["list"]) == 2
    assert "--file" in capsys.readouterr().err


def test_startup_logs_number_of_keys_and_tenants(tmp_path, capsys, caplog, monkeypatch):
    path = tmp_path / "keys.toml"
    for tenant in ("acme", "acme", "bob"):
        _add(path, "--tenant", tenant, capsys=capsys)
    monkeypatch.setattr(serving.DrainingServer, "run", lambda self, sockets=None: None)  # no model load
    with caplog.at_level(logging.INFO, logger="loraplex"):
        assert serving.serve(Settings(auth_file=path, adapters_dir=tmp_path / "adapters")) == 0
    assert f"auth: 3 keys for 2 tenants loaded from {path}" in caplog.text
