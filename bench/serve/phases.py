"""Run one server phase (start, upload, loads, probes, stop) and the engine-alone references."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench.results import Recorder
from bench.serve import load as http
from bench.serve import proc_cpu, scrape
from bench.serve.adapters import AdapterFactory, AdapterSpec, adapter_specs
from bench.serve.client_procs import default_procs, run_split
from bench.serve.load import Traffic
from bench.serve.process import ServerConfig, ServerProcess
from bench.serve.scenarios import PREFIX_SUFFIX_TOKENS, Load, Phase, tenant_key

SERVER_START_TIMEOUT_S = 300.0
PROBE_OFFSET, COLD_OFFSET = 100_000, 200_000  # factory indices of probe and cold adapters: distinct bytes


def write_auth_file(path: Path, tenants: tuple[str, ...], extra_lines: list[str] = ()) -> Path:
    """A TOML keys file with one generate+admin key per tenant, allowed every adapter; `extra_lines`
    (TOML, e.g. a per-tenant cap the server reads from the keys file) go into every key's table."""
    extra = "".join(f"{line}\n" for line in extra_lines)
    blocks = [f'[[keys]]\nkey_sha256 = "{hashlib.sha256(tenant_key(t).encode()).hexdigest()}"\n'
              f'tenant = "{t}"\nscopes = ["generate", "admin"]\nadapters = ["*"]\n{extra}' for t in tenants]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(blocks))
    return path


@dataclass
class PhaseRunner:
    """What every phase of a run shares: the recorder, adapters, prompt token range and work dir."""

    rec: Recorder
    factory: AdapterFactory
    specs: list[AdapterSpec]  # the run's adapter set; a load uses its first N
    ranks: list[int]
    tokens: tuple[int, int]  # ids prompts are drawn from
    work: Path
    admin_key: str | None = None
    reserve_s: float = 0.0  # budget kept for what follows the server phases
    client_procs: int | None = None  # processes a load's streams are split over (None: client_procs.default_procs)

    def left_s(self) -> float:
        return self.rec.budget_s - self.rec.elapsed

    def run(self, phase: Phase, config: ServerConfig, upload: list[AdapterSpec]) -> None:
        """Start the server, upload, run the loads and probes, stop it."""
        server = self._start(phase, config, "start")
        if server is None:
            return
        try:
            if upload:
                self.rec.measure("server", f"{phase.name}/upload", lambda: http.run_async(
                    http.upload_all(server.url, self.factory.iter_files(upload), self.admin_key)))
            for load in phase.loads:
                self.rec.measure("server", f"{phase.name}/{load.name}",
                                 lambda load=load: self._load(server, config, load), needs_s=self.reserve_s + 10)
            if phase.upload_probes:
                self._upload_probes(server, phase)
            if phase.prefix_len:
                self._prefix_hit_and_miss(server, phase, config)
            if phase.cold_adapters:
                server = self._cold_and_warm(server, phase, config)
        finally:
            if server is not None:
                self._stop(server)

    def _start(self, phase: Phase, config: ServerConfig, label: str) -> ServerProcess | None:
        server = ServerProcess(config, self.work / f"server-{phase.name}-{label}.log", f"{phase.name}/{label}")
        started = self.rec.measure("server", f"{phase.name}/{label}",
                                   lambda: {"ready_s": server.start(SERVER_START_TIMEOUT_S)})
        return None if "error" in started else server

    def _stop(self, server: ServerProcess) -> None:
        began = time.perf_counter()
        code = server.stop()
        record = self.rec.data["server"].setdefault(server.name, {})
        record["exit_code"], record["stop_s"] = code, round(time.perf_counter() - began, 2)
        if code not in (0, None):
            record["log_tail"] = server.log_tail()
        self.rec.save()

    def _load(self, server: ServerProcess, config: ServerConfig, load: Load) -> dict:
        """A short warm-up of the same traffic, then the measured load (capped by the budget)."""
        names = tuple(spec.name for spec in self.specs[: load.num_adapters])
        traffic = replace(load.traffic, adapters=names)
        warmup = replace(traffic, num_requests=traffic.concurrency, output_len=min(16, traffic.output_len),
                         seed=traffic.seed + 999)
        base = config.served_model_name
        procs = self.client_procs or default_procs(traffic.concurrency)
        run_split(server.url, warmup, self.tokens, base, procs)
        capped = replace(traffic, max_seconds=min(traffic.max_seconds, max(5.0, self.left_s() - self.reserve_s)))
        before, cpu_before = scrape.snapshot(server.url), proc_cpu.snapshot(server.process.pid)
        if load.background is None:
            result = run_split(server.url, capped, self.tokens, base, procs)
        else:
            background = replace(load.background, adapters=names, max_seconds=capped.max_seconds + 60)
            result = http.run_async(http.run_with_background(server.url, capped, background, self.tokens, base))
        result["server_cpu"] = proc_cpu.deltas(cpu_before, proc_cpu.snapshot(server.process.pid), result["wall_s"])
        result["server_metrics"] = scrape.deltas(before, scrape.snapshot(server.url))
        return result

    def _prompt_len(self, phase: Phase) -> int:
        return phase.loads[0].traffic.prompt_len if phase.loads else 128

    def _upload_probes(self, server: ServerProcess, phase: Phase) -> None:
        probes = adapter_specs(phase.upload_probes, self.ranks[:1], "probe")
        files = [(spec, *self.factory.files(spec, PROBE_OFFSET + i)) for i, spec in enumerate(probes)]
        self.rec.measure("server", f"{phase.name}/upload_to_usable", lambda: _with_server_metrics(
            server.url, lambda: http.run_async(http.upload_to_usable(
                server.url, files, self.tokens, self._prompt_len(phase), self.admin_key))))

    def _prefix_hit_and_miss(self, server: ServerProcess, phase: Phase, config: ServerConfig) -> None:
        """TTFT of prompts of phase.prefix_len + PREFIX_SUFFIX_TOKENS tokens, one at a time: each with a new
        prefix (miss), then each with one shared prefix sent once before (hit: the prefix's full blocks
        come from the cache; only the suffix is computed). Two short requests first take the first-request
        costs."""
        model = config.served_model_name
        base = Traffic(adapters=(), prompt_len=phase.prefix_len + PREFIX_SUFFIX_TOKENS, seed=30_000)
        suffix = Traffic(adapters=(), prompt_len=PREFIX_SUFFIX_TOKENS, seed=40_000)
        shared = base.prompt(0, self.tokens)[: phase.prefix_len]
        misses = [(model, base.prompt(1 + i, self.tokens)) for i in range(phase.prefix_probes)]
        hits = [(model, shared + suffix.prompt(i, self.tokens)) for i in range(phase.prefix_probes)]
        warm = [(model, suffix.prompt(1000 + i, self.tokens)) for i in range(2)]
        warm.append((model, base.prompt(0, self.tokens)))  # caches the shared prefix
        for label, requests in (("prefix_warmup", warm), ("prefix_miss", misses), ("prefix_hit", hits)):
            self.rec.measure("server", f"{phase.name}/{label}", lambda requests=requests: _with_server_metrics(
                server.url, lambda: http.run_async(
                    http.sequential_ttft_prompts(server.url, requests, api_key=self.admin_key))))

    def _cold_and_warm(self, server: ServerProcess, phase: Phase, config: ServerConfig) -> ServerProcess | None:
        """Upload fresh adapters, restart the server so they are on disk only, send two base-model
        requests (so no first-request cost lands on an adapter), then TTFT of one request naming each
        adapter in turn (cold), then of the same requests again (warm)."""
        cold = adapter_specs(phase.cold_adapters, self.ranks[:1], "cold")
        files = [(spec, *self.factory.files(spec, COLD_OFFSET + i)) for i, spec in enumerate(cold)]
        self.rec.measure("server", f"{phase.name}/cold_upload", lambda: http.run_async(
            http.upload_all(server.url, iter(files), self.admin_key)))
        self._stop(server)
        server = self._start(phase, config, "restart")
        if server is None:
            return None
        names, prompt_len = [spec.name for spec in cold], self._prompt_len(phase)
        # Each probe its own prompts: the warm requests must compute the same prefill as the cold ones, not
        # find the cold requests' prompts in the prefix cache (until the seventh session they did: at 8B a
        # 16-token step instead of 128 tokens, ~15 ms of the measured cold extra that was not the adapter).
        probes = (("base", [config.served_model_name] * 2, 10_000), ("cold", names, 20_000), ("warm", names, 30_000))
        for label, models, seed in probes:
            self.rec.measure("server", f"{phase.name}/{label}", lambda models=models, seed=seed: _with_server_metrics(
                server.url, lambda: http.run_async(http.sequential_ttft(
                    server.url, models, self.tokens, prompt_len, api_key=self.admin_key, seed=seed))))
        return server


def _with_server_metrics(url: str, measure: Callable[[], dict]) -> dict:
    """`measure()`'s result with the server's own figures over it (`server_metrics`: the load latency by
    tier, queue and prefill times), which split a cold request's time between its parts."""
    before = scrape.snapshot(url)
    result = measure()
    result["server_metrics"] = scrape.deltas(before, scrape.snapshot(url))
    return result


def run_engine(rec: Recorder, engine_loads: list[tuple[Phase, Load]], configs: dict[str, ServerConfig],
               factory: AdapterFactory, specs: list[AdapterSpec], tokens: tuple[int, int]) -> None:
    """The engine alone for each load marked `engine`, with its phase's server settings."""
    from bench.serve.engine_only import EngineBench

    holder: dict[str, Any] = {}
    first = next(iter(configs.values()))

    def load_model() -> dict:
        start = time.perf_counter()
        holder["bench"] = EngineBench(first.model_dir, first.device)
        return {"seconds": time.perf_counter() - start}

    rec.measure("engine", "load_model", load_model)
    bench = holder.get("bench")
    if bench is None:
        return
    for phase, load in engine_loads:
        traffic = replace(load.traffic, adapters=tuple(spec.name for spec in specs[: load.num_adapters]))
        config = configs[phase.name]

        def measure(traffic=traffic, config=config) -> dict:
            bench.adapter_refs(factory, specs, set(traffic.choices(traffic.concurrency)), config.max_rank)
            return bench.measure(config, traffic, tokens)

        rec.measure("engine", f"{phase.name}/{load.name}", measure)
