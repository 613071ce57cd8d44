"""Presets: which server phases a run starts, what traffic each sends, and the ratios they yield.

A run makes one adapter set (`num_adapters`, ranks cycling through `ranks`), then runs each phase:
start the server with the phase's lora mode, optionally upload, send each load, probe, stop. Loads
marked `engine` are then repeated on the engine alone. Names of ratios are those of issues 13 and 15,
with the model shape in place of `1b`/`8b` where the target names carry one.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from bench.serve.load import Traffic


@dataclass
class Load:
    """One measured load of a phase."""

    name: str
    traffic: Traffic
    num_adapters: int  # the first N adapters of the run's set; 0 = the base model; 1 = one adapter
    engine: bool = False  # also measure the engine alone on the same batch
    background: Traffic | None = None  # another tenant's load running all along (fairness)


@dataclass
class Phase:
    """One server start: its lora mode, loads and probes."""

    name: str
    lora_mode: str
    loads: list[Load] = field(default_factory=list)
    upload_probes: int = 0  # extra adapters uploaded one by one, each followed by a request naming it
    cold_adapters: int = 0  # extra adapters uploaded, then the server restarts: TTFT cold, then warm
    prefix_len: int = 0  # > 0: TTFT of prompts of this many tokens whose prefix is cached (hit) or new (miss)
    prefix_probes: int = 8  # requests of each kind


@dataclass
class Scenario:
    """A preset made concrete: the adapter set and the phases."""

    preset: str
    num_adapters: int
    ranks: list[int]
    phases: list[Phase]
    seed_store: bool = False  # write the adapters into the store before the server starts (vs HTTP)
    tenants: tuple[str, ...] = ()  # with tenants, the server gets an auth file with one key each


@dataclass
class Knobs:
    """Flags that shape every preset's traffic (None = the preset's own value)."""

    concurrency: int | None = None
    num_requests: int | None = None
    prompt_len: int | None = None
    output_len: int | None = None
    num_adapters: int | None = None
    ranks: list[int] | None = None
    max_load_s: float = 300.0
    seed: int = 0
    # custom preset only
    lora_mode: str = "unmerged"
    distribution: str = "cycle"
    zipf_s: float = 1.0
    temperature: float = 0.0
    top_p: float = 1.0


PRESETS = ("c32", "lora-modes", "zipf1000", "cold-warm", "fairness", "prefix", "custom")
PREFIX_SUFFIX_TOKENS = 16  # what differs between the requests that share a cached prefix
HEAVY_FACTOR = 10  # the heavy tenant keeps ten times the light tenant's streams busy


def tenant_key(tenant: str) -> str:
    """The API key of a benchmark tenant (the auth file holds its sha256)."""
    return f"bench-key-{tenant}"


def _traffic(knobs: Knobs, **preset) -> Traffic:
    values = dict(concurrency=32, num_requests=256, prompt_len=128, output_len=64)
    values.update(preset)
    for key in ("concurrency", "num_requests", "prompt_len", "output_len"):
        if getattr(knobs, key) is not None:
            values[key] = getattr(knobs, key)
    values.setdefault("max_seconds", knobs.max_load_s)
    values.setdefault("seed", knobs.seed)
    return Traffic(adapters=(), **values)


def build(preset: str, knobs: Knobs) -> Scenario:
    """The Scenario of one preset, with the knobs applied."""
    num = knobs.num_adapters
    if preset == "c32":
        greedy = _traffic(knobs, distribution="cycle")
        n = num or 32
        phase = Phase("unmerged", "unmerged", [
            # One pass over every adapter first: the engine reference warms up too (its slots loaded).
            # Each load has prompts of its own (seed): a prompt sent before would prefill from the prefix
            # cache, which the engine reference runs without.
            Load("warmup", replace(greedy, num_requests=2 * n, output_len=16, seed=greedy.seed + 1), n),
            Load("greedy", greedy, n, engine=True),
            Load("sampled", replace(greedy, temperature=1.0, top_p=0.9, seed=greedy.seed + 2), n, engine=True),
        ], upload_probes=4)
        return Scenario(preset, n, knobs.ranks or [16], [phase])
    if preset == "lora-modes":
        n = num or 32
        base = _traffic(knobs, num_requests=128)
        # The single-adapter load is four times longer: at 128 requests merged mode finished it in 0.95 s
        # on the H200, so one swap (tens of ms) and the first steps before auto merges weighed like a
        # tenth of it; steady single-adapter traffic is what its target is about.
        # Prompts of its own for each load (seed): the uniform load re-sent the Zipf load's prompts, and a
        # re-sent prompt whose adapter matches prefills from the prefix cache.
        loads = [Load("zipf", replace(base, distribution="zipf"), n),
                 Load("uniform", replace(base, distribution="uniform", seed=base.seed + 1), n),
                 Load("single", replace(base, distribution="cycle", seed=base.seed + 2,
                                        num_requests=knobs.num_requests or 4 * base.num_requests), 1)]
        # Every phase starts with each adapter once (short outputs, prompts of its own), so that each mode's
        # measured loads find the same adapters in memory; the per-load warm-up of Zipf traffic alone
        # touches about 20 of the 32.
        warmup = Load("warmup", replace(base, distribution="cycle", num_requests=n, output_len=16,
                                        seed=base.seed + 3), n)
        # With the engine in its own process a 128-request Zipf or uniform load lasted 0.7-0.8 s (H200, 11k tok/s),
        # and one 250 ms stall of auto's first requests weighed a quarter of it (-serve-lora-modes-1b-s20-proc):
        # unmerged and auto run them four times longer too; merged mode keeps 128 (one swap a batch: ~18 s).
        longer = 4 * base.num_requests

        def phase_loads(mode: str) -> list[Load]:
            if mode == "merged":
                return [replace(load) for load in loads]
            return [replace(load, traffic=replace(load.traffic, num_requests=max(load.traffic.num_requests, longer)))
                    for load in loads]

        phases = [Phase(mode, mode, [replace(warmup)] + phase_loads(mode)) for mode in ("unmerged", "merged", "auto")]
        return Scenario(preset, n, knobs.ranks or [16], phases)
    if preset == "zipf1000":
        n = num or 1000
        base = _traffic(knobs, num_requests=512)
        uniform, zipf = replace(base, distribution="uniform"), replace(base, distribution="zipf", zipf_s=1.0)
        # Both loads are measured warm, as a long run sees them: a warm-up of the same distribution with
        # prompts and draws of its own fills the CPU and GPU tiers first (for Zipf, its popular head; the
        # measured load still meets the cold tail, as steady traffic does). Without it the first 256
        # requests of Zipf(1.0) over 1,000 adapters name about 150 adapters never read from disk yet.
        phase = Phase("serve", knobs.lora_mode, [
            Load("warmup32", replace(uniform, output_len=16, seed=base.seed + 1), min(32, n)),
            Load("uniform32", uniform, min(32, n)),
            # Four times longer: Zipf(1.0) over 1,000 has a long tail, and the H200 run with a 512-request
            # warm-up still read 134 of the next 512 requests' adapters from disk (first touches, mostly).
            Load("warmup1000", replace(zipf, output_len=16, seed=base.seed + 2, num_requests=4 * zipf.num_requests), n),
            Load("zipf1000", zipf, n),
        ])
        return Scenario(preset, n, knobs.ranks or [8, 16, 32, 64], [phase], seed_store=True)
    if preset == "cold-warm":
        n = num or 8
        phase = Phase("serve", knobs.lora_mode, [], upload_probes=n, cold_adapters=n)
        return Scenario(preset, 0, knobs.ranks or [16], [phase])
    if preset == "fairness":
        n = num or 8
        light = _traffic(knobs, distribution="cycle", concurrency=2, num_requests=32,
                         api_key=tenant_key("light"))
        heavy = replace(light, concurrency=HEAVY_FACTOR * light.concurrency, num_requests=100_000,
                        api_key=tenant_key("heavy"), seed=light.seed + 1)
        # A warm-up first: on the H200 the light tenant's first requests (adapters loaded into the GPU, the
        # first prefill shapes) put its p99 TTFT alone at 222 ms against a p50 of 14 ms. It runs beside a
        # third tenant at the heavy tenant's concurrency, so that the shapes of a heavy burst (20 prompts
        # prefilled at once) are not first met, and compiled, during the measured load (second session of
        # 2026-12-01: light p99 536 ms beside the heavy tenant against p50 35 ms, warmed alone), while the
        # light and heavy tenants' own counters start the measured loads untouched by it. And each load has
        # prompts of its own: re-sent prompts prefill from the prefix cache (3,584 hit tokens there).
        warm = replace(heavy, api_key=tenant_key("warmup"), seed=light.seed + 4)
        phase = Phase("serve", knobs.lora_mode, [
            Load("warmup", replace(light, num_requests=2 * n, seed=light.seed + 2), n, background=warm),
            Load("light_alone", light, n),
            Load("light_with_heavy", replace(light, seed=light.seed + 3), n, background=heavy),
        ])
        return Scenario(preset, n, knobs.ranks or [16], [phase], tenants=("light", "heavy", "warmup"))
    if preset == "prefix":
        phase = Phase("serve", knobs.lora_mode, [], prefix_len=knobs.prompt_len or 2048,
                      prefix_probes=knobs.num_requests or 8)
        return Scenario(preset, 0, knobs.ranks or [16], [phase])
    if preset == "custom":
        n = 0 if num is None else num
        traffic = _traffic(knobs, distribution=knobs.distribution, zipf_s=knobs.zipf_s,
                           temperature=knobs.temperature, top_p=knobs.top_p)
        phase = Phase("serve", knobs.lora_mode, [Load("custom", traffic, n, engine=True)], upload_probes=2)
        return Scenario(preset, n, knobs.ranks or [16], [phase])
    raise ValueError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")


def _get(data: dict, *path: str):
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _div(num, den) -> float | None:
    if not isinstance(num, int | float) or not isinstance(den, int | float) or den == 0:
        return None
    return num / den


def _sub(a, b) -> float | None:
    if not isinstance(a, int | float) or not isinstance(b, int | float):
        return None
    return a - b


def derive_ratios(preset: str, shape: str, data: dict) -> dict:
    """The target ratios a preset's figures give (null where a figure is missing)."""
    server, engine = data.get("server", {}), data.get("engine", {})
    tps = "tokens_per_s"
    if preset == "c32":
        return {
            f"serve_over_engine_{shape}_c32": _div(_get(server, "unmerged/greedy", tps),
                                                   _get(engine, "unmerged/greedy", "closed_loop", tps)),
            f"serve_over_engine_batch_{shape}_c32": _div(_get(server, "unmerged/greedy", tps),
                                                         _get(engine, "unmerged/greedy", tps)),
            f"serve_over_engine_arrivals_{shape}_c32": _div(
                _get(server, "unmerged/greedy", tps), _get(engine, "unmerged/greedy", "closed_loop_arrivals", tps)),
            f"itl_p50_over_step_{shape}_c32": _div(_get(server, "unmerged/greedy", "itl_ms_p50"),
                                                   _get(engine, "unmerged/greedy", "decode_step_ms_median")),
            f"sampled_over_greedy_{shape}_c32": _div(_get(server, "unmerged/sampled", tps),
                                                     _get(server, "unmerged/greedy", tps)),
            f"sampled_serve_over_engine_{shape}_c32": _div(_get(server, "unmerged/sampled", tps),
                                                           _get(engine, "unmerged/sampled", "closed_loop", tps)),
        }
    if preset == "lora-modes":
        ratios = {}
        for traffic in ("zipf", "uniform", "single"):
            best = [v for v in (_get(server, f"{m}/{traffic}", tps) for m in ("merged", "unmerged")) if v is not None]
            ratios[f"auto_over_best_{traffic}_{shape}"] = _div(_get(server, f"auto/{traffic}", tps),
                                                               max(best) if len(best) == 2 else None)
        return ratios
    if preset == "zipf1000":
        return {"zipf1000_over_uniform32": _div(_get(server, "serve/zipf1000", tps),
                                                _get(server, "serve/uniform32", tps))}
    if preset == "cold-warm":
        rank = (data.get("config", {}).get("ranks") or [16])[0]
        return {
            f"cold_ttft_extra_ms_{shape}_r{rank}": _sub(_get(server, "serve/cold", "ttft_ms_p50"),
                                                        _get(server, "serve/warm", "ttft_ms_p50")),
            f"upload_to_usable_ms_{shape}_r{rank}": _get(server, "serve/upload_to_usable",
                                                         "upload_to_first_token_ms_p50"),
        }
    if preset == "fairness":
        return {"fair_light_p99_ratio": _div(_get(server, "serve/light_with_heavy", "ttft_ms_p99"),
                                             _get(server, "serve/light_alone", "ttft_ms_p99"))}
    if preset == "prefix":
        return {f"prefix_hit_ttft_over_miss_{shape}": _div(_get(server, "serve/prefix_hit", "ttft_ms_p50"),
                                                          _get(server, "serve/prefix_miss", "ttft_ms_p50"))}
    if preset == "custom":
        return {f"serve_over_engine_{shape}_custom": _div(_get(server, "serve/custom", tps),
                                                          _get(engine, "serve/custom", "closed_loop", tps))}
    return {}
