"""Keys, scopes, tenant isolation and rate limits."""

from __future__ import annotations

import hashlib
import time

import pytest

from server.api.auth import KeyFileError, KeyRing
from server.api.ratelimit import RateLimiter
from tests.api.helpers import BASE_ID, api_settings, assert_error, live_server, upload_files

KEYS = {"alice": "key-alice", "alice-admin": "key-alice-admin", "bob-admin": "key-bob-admin",
        "slow": "key-slow", "thrifty": "key-thrifty"}


def _sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


KEYS_TOML = f"""
[[keys]]
key_sha256 = "{_sha(KEYS['alice'])}"
tenant = "alice"
scopes = ["generate"]
adapters = ["alice-*"]

[[keys]]
key_sha256 = "{_sha(KEYS['alice-admin'])}"
tenant = "alice"
scopes = ["generate", "admin"]
adapters = ["alice-*"]

[[keys]]
key_sha256 = "{_sha(KEYS['bob-admin'])}"
tenant = "bob"
scopes = ["generate", "admin"]
adapters = ["bob-*", "shared-?"]

[[keys]]
key_sha256 = "{_sha(KEYS['slow'])}"
tenant = "slow"
scopes = ["generate"]
rate_limit = {{ requests_per_second = 1 }}

[[keys]]
key_sha256 = "{_sha(KEYS['thrifty'])}"
tenant = "thrifty"
scopes = ["generate"]
rate_limit = {{ tokens_per_minute = 30 }}
"""


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tiny_adapters, tmp_path_factory):
    keys_file = tmp_path_factory.mktemp("auth") / "keys.toml"
    keys_file.write_text(KEYS_TOML)
    settings = api_settings(tiny_llama_dir, tmp_path_factory.mktemp("store"), auth_file=keys_file)
    with live_server(settings) as live:
        with live.client(KEYS["alice-admin"]) as alice:
            assert upload_files(alice, "alice-a", tiny_adapters["attn-r4"]).status_code == 201
        with live.client(KEYS["bob-admin"]) as bob:
            assert upload_files(bob, "bob-b", tiny_adapters["ko-r16"]).status_code == 201
        yield live


def _complete(client, model):
    return client.post("/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 2})


def test_missing_or_bad_key_is_401_and_probes_stay_open(server):
    with server.client() as anonymous:
        response = _complete(anonymous, BASE_ID)
        assert_error(response, 401, "missing API key")
        assert response.headers["www-authenticate"] == "Bearer"
        assert_error(anonymous.get("/v1/models"), 401)
        assert anonymous.get("/health").status_code == 200
        assert anonymous.get("/ready").status_code == 200
        assert anonymous.get("/metrics").status_code == 200
    with server.client("not-a-key") as wrong:
        assert_error(_complete(wrong, BASE_ID), 401, "invalid API key")


def test_tenants_see_and_use_only_their_adapters(server):
    with server.client(KEYS["alice"]) as alice, server.client(KEYS["bob-admin"]) as bob:
        assert [m["id"] for m in alice.get("/v1/models").json()["data"]] == [BASE_ID, "alice-a"]
        assert [m["id"] for m in bob.get("/v1/models").json()["data"]] == [BASE_ID, "bob-b"]
        assert [a["name"] for a in alice.get("/v1/adapters").json()["data"]] == ["alice-a"]
        assert _complete(alice, "alice-a").status_code == 200
        assert _complete(alice, BASE_ID).status_code == 200
        # Another tenant's adapter is indistinguishable from a missing one.
        foreign, missing = _complete(alice, "bob-b"), _complete(alice, "bob-zzzzz")
        assert_error(foreign, 404)
        assert foreign.json()["error"]["message"].replace("bob-b", "X") == \
            missing.json()["error"]["message"].replace("bob-zzzzz", "X")
        assert_error(alice.get("/v1/adapters/bob-b"), 404)
        assert_error(alice.post("/generate", json={"inputs": "Hi", "parameters": {"adapter_id": "bob-b"}}), 404)
        assert _complete(bob, "alice-a").status_code == 404


def test_admin_scope_guards_adapter_management(server, tiny_adapters):
    with server.client(KEYS["alice"]) as alice:
        assert_error(upload_files(alice, "alice-new", tiny_adapters["attn-r4"]), 403, "admin")
        assert_error(alice.delete("/v1/adapters/alice-a"), 403, "admin")
        assert_error(alice.post("/v1/unload_lora_adapter", json={"lora_name": "alice-a"}), 403, "admin")
    with server.client(KEYS["alice-admin"]) as admin:
        assert_error(upload_files(admin, "bob-takeover", tiny_adapters["attn-r4"]), 403, "bob-takeover")
        assert_error(admin.delete("/v1/adapters/bob-b"), 404)
        assert upload_files(admin, "alice-tmp", tiny_adapters["attn-r4"]).status_code == 201
        assert admin.delete("/v1/adapters/alice-tmp").status_code == 200
    with server.client(KEYS["bob-admin"]) as bob:
        assert bob.get("/v1/adapters/bob-b").json()["version"] == 1


def test_request_rate_limit_gives_429_with_retry_after(server):
    with server.client(KEYS["slow"]) as slow:
        assert _complete(slow, BASE_ID).status_code == 200
        limited = _complete(slow, BASE_ID)
        assert_error(limited, 429, "rate limit", "slow")
        assert int(limited.headers["retry-after"]) >= 1
        time.sleep(1.05)
        assert _complete(slow, BASE_ID).status_code == 200
    with server.client(KEYS["alice"]) as alice:  # other tenants are unaffected
        assert _complete(alice, BASE_ID).status_code == 200


def test_token_rate_limit_gives_429_once_spent(server):
    with server.client(KEYS["thrifty"]) as thrifty:
        body = {"model": BASE_ID, "prompt": "Hello world", "max_tokens": 40, "ignore_eos": True}
        assert thrifty.post("/v1/completions", json=body).status_code == 200  # overdraws 30 tokens/min
        limited = thrifty.post("/v1/completions", json=body)
        assert_error(limited, 429, "tokens per minute")
        assert int(limited.headers["retry-after"]) >= 10


def test_keyring_yaml_and_errors(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text(f"keys:\n  - key_sha256: {_sha('k1')}\n    tenant: t\n    scopes: [admin]\n"
                    f"    adapters: ['t-*']\n")
    ring = KeyRing.from_file(path)
    principal = ring.authenticate("k1")
    assert principal.tenant == "t" and principal.has_scope("admin") and not principal.has_scope("generate")
    assert principal.may_use("t-x") and not principal.may_use("u-x")
    assert ring.authenticate("k2") is None
    bad = tmp_path / "bad.toml"
    bad.write_text('[[keys]]\nkey_sha256 = "abc"\ntenant = "t"\nscopes = ["root"]\n')
    with pytest.raises(KeyFileError, match="key_sha256") as info:
        KeyRing.from_file(bad)
    assert "scopes" in str(info.value)
    with pytest.raises(KeyFileError, match="cannot be read"):
        KeyRing.from_file(tmp_path / "keys.json")
    (tmp_path / "keys.json").write_text("{}")
    with pytest.raises(KeyFileError, match=r"\.toml, \.yaml"):
        KeyRing.from_file(tmp_path / "keys.json")


def test_rate_limiter_refills_over_time():
    from server.api.auth import Principal, RateLimit
    from server.api.errors import APIError

    now = [0.0]
    limiter = RateLimiter(clock=lambda: now[0])
    caller = Principal("t", frozenset({"generate"}), ("*",), RateLimit(requests_per_second=2))
    limiter.check_request(caller)
    limiter.check_request(caller)
    with pytest.raises(APIError) as info:
        limiter.check_request(caller)
    assert info.value.status_code == 429 and info.value.headers["Retry-After"] == "1"
    now[0] += 0.5
    limiter.check_request(caller)


def test_each_of_n_api_processes_enforces_its_share_of_the_limits():
    from server.api.auth import Principal, RateLimit, Scheduling
    from server.api.errors import APIError

    now = [0.0]
    limiter = RateLimiter(clock=lambda: now[0], share=0.5)  # one of two API processes
    caller = Principal("t", frozenset({"generate"}), ("*",), RateLimit(requests_per_second=4, tokens_per_minute=600),
                       Scheduling(max_queued_requests=3))
    limiter.check_request(caller)
    limiter.check_request(caller)
    with pytest.raises(APIError, match="4 requests per second"):
        limiter.check_request(caller)  # 2 a second here, 2 in the other process
    now[0] += 0.5  # refills at 2 a second
    limiter.check_request(caller)
    limiter.charge_tokens(caller, 300)  # the bucket holds 300 of the 600 a minute here
    with pytest.raises(APIError, match="600 tokens per minute"):
        limiter.check_tokens(caller)
    limiter.enter(caller)
    limiter.enter(caller)  # 3 in flight: ceil(1.5) = 2 here
    with pytest.raises(APIError, match="2 requests in flight on this API process"):
        limiter.enter(caller)
