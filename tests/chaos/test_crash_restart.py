"""kill -9 during uploads and during generation, then a restart on the same store: every acknowledged
upload is there, no half-written version is visible, and each adapter still gives its own output."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import httpx

from tests.api.helpers import upload_files
from tests.chaos.harness import (
    HANG_BOUND_S,
    HealthProbe,
    ServerProcess,
    assert_server_sound,
    completion_body,
    expected_outputs,
    generate_alone,
    reference_outputs,
)

NUM_NAMES = 5  # uploads cycle over crash-0 .. crash-4
MIN_ACKNOWLEDGED = 8  # uploads answered 201 before the kill
NUM_STREAMS = 6
NUM_DELETED = 3  # gone-0 .. gone-2 are uploaded and deleted in turn


class Load:
    """Upload loops, a never-finishing upload and long streams against one server, until it dies."""

    def __init__(self, server: ServerProcess, adapters: dict[str, Path], models: list[str], uploads: bool):
        self.server, self.adapters, self.models = server, adapters, models
        self.acknowledged: dict[str, int] = {}  # name -> highest version answered 201
        self.num_chunks = 0  # stream chunks received, over all streams
        self.last_done: dict[str, tuple[str, int]] = {}  # gone-i -> last acknowledged op: (put|delete, version)
        self.in_flight: dict[str, str] = {}  # gone-i -> the op under way when the server died
        self.lock = threading.Lock()
        self.stop = threading.Event()
        targets = [self._stream] * NUM_STREAMS
        if uploads:
            targets += [self._upload_loop, self._upload_loop, self._trickle, self._put_delete_loop]
        self.threads = [threading.Thread(target=target, args=(i,), daemon=True) for i, target in enumerate(targets)]

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(HANG_BOUND_S)
        assert not any(thread.is_alive() for thread in self.threads), "a client hung after the kill"

    def wait_for(self, condition, timeout_s: float = 20) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.005)
        assert condition(), "the load did not get going before the kill"

    def _upload_loop(self, index: int) -> None:
        sources = list(self.adapters.values())
        with httpx.Client(base_url=self.server.url, timeout=HANG_BOUND_S) as client:
            for i in range(index, 100_000):
                if self.stop.is_set():
                    return
                try:
                    response = upload_files(client, f"crash-{i % NUM_NAMES}", sources[i % len(sources)])
                except httpx.HTTPError:
                    return
                if response.status_code == 201:
                    record = response.json()
                    with self.lock:
                        self.acknowledged[record["name"]] = max(self.acknowledged.get(record["name"], 0),
                                                                record["version"])

    def _put_delete_loop(self, index: int) -> None:
        """Upload then delete gone-0 .. gone-2 in turn, keeping the last acknowledged op of each."""
        source = next(iter(self.adapters.values()))
        with httpx.Client(base_url=self.server.url, timeout=HANG_BOUND_S) as client:
            for i in range(100_000):
                name = f"gone-{(i // 2) % NUM_DELETED}"
                kind = "put" if i % 2 == 0 else "delete"
                if self.stop.is_set():
                    return
                self.in_flight[name] = kind
                try:
                    response = upload_files(client, name, source) if kind == "put" else \
                        client.delete(f"/v1/adapters/{name}")
                except httpx.HTTPError:
                    return
                assert response.status_code in (200, 201), response.text
                version = response.json()["version"] if kind == "put" else self.last_done[name][1]
                self.last_done[name] = (kind, version)
                del self.in_flight[name]

    def _trickle(self, index: int) -> None:
        """A chunked upload that is still arriving when the process dies."""
        def body():
            yield b"--b\r\nContent-Disposition: form-data; name=\"archive\"; filename=\"a.zip\"\r\n\r\n"
            while not self.stop.is_set():
                time.sleep(0.02)
                yield b"\0" * 1024

        try:
            with httpx.Client(base_url=self.server.url, timeout=HANG_BOUND_S) as client:
                client.put("/v1/adapters/partial", content=body(),
                           headers={"content-type": "multipart/form-data; boundary=b"})
        except httpx.HTTPError:
            pass

    def _stream(self, index: int) -> None:
        body = completion_body(self.models[index % len(self.models)], max_tokens=480, stream=True)
        with httpx.Client(base_url=self.server.url, timeout=HANG_BOUND_S) as client:
            while not self.stop.is_set():
                try:
                    with client.stream("POST", "/v1/completions", json=body) as response:
                        for _ in response.iter_lines():
                            with self.lock:
                                self.num_chunks += 1
                except httpx.HTTPError:
                    return


def test_kill_9_during_uploads_and_generation_then_restart(chaos_server, tiny_adapters, tmp_path, record_figures):
    store = tmp_path / "store"
    server = chaos_server(store)
    with server.client() as client:
        references = reference_outputs(client, tiny_adapters)
    by_sha256 = {hashlib.sha256((path / "adapter_model.safetensors").read_bytes()).hexdigest(): key
                 for key, path in tiny_adapters.items()}
    models = list(expected_outputs(references))

    with HealthProbe(server) as under_load, Load(server, tiny_adapters, models, uploads=True) as load:
        load.wait_for(lambda: sum(load.acknowledged.values()) >= MIN_ACKNOWLEDGED and load.num_chunks >= 50
                      and len(load.last_done) == NUM_DELETED)
        under_load.expect_exit()
        server.kill9()
    assert not under_load.failures, under_load.failures[:5]
    acknowledged = dict(load.acknowledged)
    restarts_s = []

    started = time.monotonic()
    server = chaos_server(store)
    restarts_s.append(time.monotonic() - started)
    _assert_store_intact(server, store, acknowledged, by_sha256, references)
    _assert_deletes_durable(server, dict(load.last_done), dict(load.in_flight), by_sha256,
                            next(iter(tiny_adapters.values())))

    with Load(server, tiny_adapters, models, uploads=False) as load:  # kill -9 mid-generation only
        load.wait_for(lambda: load.num_chunks >= 200)
        server.kill9()

    started = time.monotonic()
    server = chaos_server(store)
    restarts_s.append(time.monotonic() - started)
    _assert_store_intact(server, store, acknowledged, by_sha256, references)
    rss_before = server.rss_mib()
    with HealthProbe(server) as probe:
        figures = assert_server_sound(server, probe, rss_before, expected_outputs(references))
    figures["max_health_ms"] = max(figures["max_health_ms"], round(under_load.max_latency_s * 1000))
    figures["health_probes"] += len(under_load.latencies_s)
    record_figures({**figures, "acknowledged_uploads": sum(acknowledged.values()),
                    "restart_s": [round(s, 1) for s in restarts_s]})


def _assert_store_intact(server: ServerProcess, store: Path, acknowledged: dict[str, int],
                         by_sha256: dict[str, str], references: dict[str, str]) -> None:
    """Acknowledged uploads survived; only whole versions are visible and each gives its source's output."""
    with server.client() as client:
        listed = {a["name"]: a for a in client.get("/v1/adapters").json()["data"]}
        crashed = {name: a for name, a in listed.items() if name.startswith("crash-")}
        assert set(crashed) >= set(acknowledged), "an acknowledged upload is missing after the restart"
        others = {name for name in set(listed) - set(crashed) if not name.startswith("gone-")}
        assert others == {f"ref-{key}" for key in by_sha256.values()}
        for name, adapter in crashed.items():
            assert adapter["version"] >= acknowledged.get(name, 0), f"{name}: acknowledged version lost"
            assert adapter["sha256"] in by_sha256, f"{name} v{adapter['version']} is not a whole upload"
            assert generate_alone(client, name) == references[by_sha256[adapter["sha256"]]], name
        assert client.get("/v1/adapters/partial").status_code == 404
    assert not list((store / ".staging").iterdir())
    for adapter_dir in store.glob("crash-*"):
        for version_dir in adapter_dir.iterdir():
            assert (version_dir / "manifest.json").is_file(), f"{version_dir} has no manifest"


def _assert_deletes_durable(server: ServerProcess, last_done: dict[str, tuple[str, int]], in_flight: dict[str, str],
                            by_sha256: dict[str, str], source: Path) -> None:
    """An acknowledged delete stays deleted, an acknowledged upload stays (unless the op under way at the
    kill changed it), and a new upload never reuses a version number that was acknowledged before."""
    with server.client() as client:
        for name, (kind, version) in last_done.items():
            response = client.get(f"/v1/adapters/{name}")
            pending = in_flight.get(name)
            if response.status_code == 404:
                assert kind == "delete" or pending == "delete", f"{name}: acknowledged v{version} lost"
            else:
                record = response.json()
                assert kind == "put" or pending == "put", f"{name}: deleted, yet back after the restart"
                assert record["version"] >= version and record["sha256"] in by_sha256, record
            new = upload_files(client, name, source)
            assert new.status_code == 201 and new.json()["version"] > version, (name, version, new.text)

