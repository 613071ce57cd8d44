"""Per-tenant scheduling from the keys file: the tenant reaches the engine, its caps and weight reach the
scheduler, and requests past `max_queued_requests` get 429 with Retry-After."""

from __future__ import annotations

import hashlib

import pytest

from server import metrics
from server.api.auth import KeyFileError, KeyRing, Principal, Scheduling, tenant_policies
from server.api.errors import APIError
from server.api.ratelimit import RateLimiter
from server.engine.fairness import TenantPolicy
from tests.api.helpers import BASE_ID, api_settings, assert_error, live_server, upload


def _sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


KEYS_TOML = f"""
[[keys]]
key_sha256 = "{_sha('key-one')}"
tenant = "one-at-a-time"
scopes = ["generate"]
scheduling = {{ weight = 2.0, max_running_requests = 1, max_queued_requests = 1 }}

[[keys]]
key_sha256 = "{_sha('key-free')}"
tenant = "free"
scopes = ["generate", "admin"]
adapters = ["free-*"]
"""


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    keys_file = tmp_path_factory.mktemp("auth") / "keys.toml"
    keys_file.write_text(KEYS_TOML)
    settings = api_settings(tiny_llama_dir, tmp_path_factory.mktemp("store"), auth_file=keys_file,
                            tenant_max_running_requests=4)
    with live_server(settings) as live:
        yield live


def test_scheduling_from_the_keys_file_reaches_the_engine(server):
    tenants = server.state.engine.engine.scheduler.tenants
    assert tenants.policy("one-at-a-time") == TenantPolicy(2.0, 1, 1)
    assert tenants.policy("free") == TenantPolicy(1.0, 4, None)  # the Settings default
    with server.client("key-free") as client:
        body = {"model": BASE_ID, "prompt": "Hello", "max_tokens": 3, "ignore_eos": True}
        assert client.post("/v1/completions", json=body).status_code == 200
    assert tenants.counters["free"] > 0  # the API set Request.tenant from the key


def test_requests_past_the_tenant_in_flight_cap_get_429(server):
    body = {"model": BASE_ID, "prompt": "Hello", "max_tokens": 200, "ignore_eos": True, "stream": True}
    with server.client("key-one") as one, server.client("key-free") as free:
        with one.stream("POST", "/v1/completions", json=body) as first:
            assert first.status_code == 200
            refused = one.post("/v1/completions", json={**body, "stream": False, "max_tokens": 2})
            assert_error(refused, 429, "one-at-a-time", "1 requests in flight")
            assert refused.headers["retry-after"] == "1"
            other = free.post("/v1/completions", json={**body, "stream": False, "max_tokens": 2})
            assert other.status_code == 200  # other tenants are not affected
        again = one.post("/v1/completions", json={**body, "stream": False, "max_tokens": 2})
        assert again.status_code == 200  # the stream's close gave its place back


def test_in_flight_counter_uses_the_default_and_is_released():
    limiter = RateLimiter()
    caller = Principal("t", frozenset({"generate"}), ("*",))
    limiter.enter(caller, default_limit=2)
    limiter.enter(caller, default_limit=2)
    with pytest.raises(APIError) as info:
        limiter.enter(caller, default_limit=2)
    assert info.value.status_code == 429
    limiter.leave(caller)
    limiter.enter(caller, default_limit=2)
    own = Principal("u", frozenset({"generate"}), ("*",), scheduling=Scheduling(max_queued_requests=1))
    limiter.enter(own, default_limit=5)
    with pytest.raises(APIError):
        limiter.enter(own, default_limit=5)  # the key's own limit wins over the default


def test_keys_of_one_tenant_must_agree_on_scheduling(tmp_path):
    path = tmp_path / "keys.toml"
    path.write_text(f"""
[[keys]]
key_sha256 = "{_sha('a')}"
tenant = "t"
scopes = ["generate"]
scheduling = {{ max_running_requests = 2 }}

[[keys]]
key_sha256 = "{_sha('b')}"
tenant = "t"
scopes = ["generate"]
""")
    with pytest.raises(KeyFileError, match="different scheduling"):
        KeyRing.from_file(path)
    path.write_text(path.read_text().replace('scopes = ["generate"]\n\n', 'scopes = ["generate"]\nweight = 0\n\n'))
    with pytest.raises(KeyFileError):
        KeyRing.from_file(path)


def test_tenant_policies_fill_missing_fields_from_the_default(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text(f"keys:\n  - key_sha256: {_sha('k')}\n    tenant: t\n    scopes: [generate]\n"
                    f"    scheduling: {{weight: 0.5}}\n")
    default = TenantPolicy(max_running_requests=3, max_queued_requests=9)
    assert tenant_policies(path, default) == {"t": TenantPolicy(0.5, 3, 9)}
    assert tenant_policies(None, default) == {}


def test_tier_and_tenant_metrics_move(server, tiny_adapters):
    def sample(name, **labels):
        return metrics.REGISTRY.get_sample_value(name, {"model_name": BASE_ID, **labels}) or 0.0

    before = {tier: sample("loraplex_adapter_loads_total", tier=tier) for tier in ("cpu", "gpu")}
    with server.client("key-free") as client:
        upload(client, "free-a", tiny_adapters["attn-r4"])
        body = {"model": "free-a", "prompt": "Hello", "max_tokens": 2}
        assert client.post("/v1/completions", json=body).status_code == 200
        text = client.get("/metrics").text
    for tier in ("cpu", "gpu"):
        assert sample("loraplex_adapter_loads_total", tier=tier) == before[tier] + 1
        assert sample("loraplex_adapter_bytes_resident", tier=tier) > 0
        assert f'loraplex_adapter_evictions_total{{model_name="{BASE_ID}",tier="{tier}"}}' in text
    assert sample("loraplex_tenant_queue_time_seconds_count", tenant="free") >= 2
    assert 'loraplex_tenant_queue_time_seconds_count{model_name="tiny-llama",tenant="free"}' in text
