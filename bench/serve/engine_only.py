"""The engine alone, in this process, on the same model dir, adapters and batch as a server load:
the reference `serve_over_engine_*` divides by. Run after the server has stopped (it frees the GPU).

Like `python -m bench`, the engine gets a tokenizer that decodes nothing (no text is wanted). Three
references, after warm-up runs:

- one batch (`tokens_per_s`, the median of TIMED_RUNS): the load's `concurrency` requests added at once,
  from adding them to the last token, prefill included: one prefill step of every prompt, then decode
  steps of the whole batch;
- the closed loop (`closed_loop`, the median of CLOSED_LOOP_RUNS): the load itself, `num_requests`
  requests with `concurrency` in flight, the next added as soon as a step finishes one (the server's
  clients, with no network and no client time);
- the closed loop with arrivals (`closed_loop_arrivals`, one run): the same, but each replacement reaches
  the engine ARRIVAL_DELAY_MS after the step that finished the request it replaces (drawn per request,
  seeded), as a client's answer and its hops to the engine would.

`serve_over_engine_*` divides by the closed loop (since 2026-12-04's twenty-third session): it is the
same work as the server's load. The one batch differs in kind (one 4,096-token prefill step whose time
swung between 24 and 46 ms from process to process on the H200, then pure decode steps) and stays in the
JSON beside it. With no client time, equal-length requests all end in the same step, so the closed loop
stays in lockstep (H200: 15,034 tok/s against the one batch's 15,075); the server's streams drift apart
and carry new prompts in about every second step, which costs the engine more (issue 14's 128-256-row
matmuls). `serve_over_engine_arrivals_*` (server over the closed loop with arrivals) says how much of
the gap that drift alone explains: what is left is the HTTP path's own cost.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import TYPE_CHECKING

from bench.serve.adapters import AdapterFactory, AdapterSpec
from bench.serve.load import Traffic
from bench.serve.process import ServerConfig

if TYPE_CHECKING:
    from server.engine.request import Request

# One timed batch lasts ~150 ms on the H200 (1B, 32 x 64 tokens), and one such run measured 12,400 and
# 14,600 tok/s on two calls of the same session: the median of five is the reference.
TIMED_RUNS = 5
# A closed loop of 1,024 requests lasts ~5 s on the H200 (1B, 32 streams): three timed runs.
CLOSED_LOOP_RUNS = 3
# Client answer + hops to the engine process, per request: the nineteenth session's hop trace (H200, c32) put a
# request's path from the client's send to the engine at ~8 ms p50 (4.4 to the app, 1.9 through it, 1.7 to the
# engine's poll), and the finish's own way back under 1 ms; drawn uniformly around that.
ARRIVAL_DELAY_MS = (4.0, 14.0)


class EngineBench:
    """One NF4 model loaded from the model dir, shared by the engines of each lora mode."""

    def __init__(self, model_dir: Path, device: str):
        import torch

        from bench.build import NullTokenizer
        from server.model.loader import LoadedModel, load_hf_dir, resolve_device, resolve_dtype

        self.device = resolve_device(device)
        self.model_dir = model_dir
        with torch.no_grad():  # never torch.set_grad_enabled(False): it would leak into the caller's process
            loaded = load_hf_dir(model_dir, device=self.device, dtype=resolve_dtype("auto", self.device),
                                 quantize=True)
        self.loaded = LoadedModel(loaded.model, NullTokenizer(), loaded.config, loaded.model_id, loaded.hf_dir)
        self.refs: dict[str, object] = {}

    def adapter_refs(self, factory: AdapterFactory, specs: list[AdapterSpec], names: set[str], max_rank: int):
        """AdapterRefs of the named adapters, parsed from the same bytes the server was given."""
        from adapters_store import BaseModelSpec, parse_adapter
        from server.engine.request import AdapterRef

        spec = BaseModelSpec.from_hf_config(json.loads((self.model_dir / "config.json").read_text()))
        for index, adapter in enumerate(specs):
            if adapter.name in names and adapter.name not in self.refs:
                config, weights = factory.files(adapter, index)
                _, parsed = parse_adapter(config, weights, spec, max_rank)
                self.refs[adapter.name] = AdapterRef(adapter.name, 1, parsed)
        return self.refs

    def measure(self, server: ServerConfig, traffic: Traffic, token_range: tuple[int, int]) -> dict:
        """Tokens/s and decode step time of one batch of `traffic.concurrency` requests, adapters
        chosen as the load chose them, in an engine built with the server phase's settings."""
        import torch

        from bench.build import kv_blocks_for, release_engine
        from bench.closed_loop import closed_loop
        from bench.ours import measure_generation
        from server.config import LoraMode, Settings
        from server.engine.engine import LLMEngine
        from server.engine.request import Request, SamplingParams

        batch = traffic.concurrency
        settings = Settings(
            model=str(self.model_dir), device=self.device.type, lora_mode=LoraMode(server.lora_mode),
            max_slots=server.max_slots, max_rank=server.max_rank, max_batch_size=max(batch, server.max_batch_size),
            max_model_len=server.max_model_len, max_num_batched_tokens=server.max_num_batched_tokens,
            kv_cache_blocks=kv_blocks_for(batch, traffic.prompt_len + traffic.output_len),
            cuda_graphs=self.device.type == "cuda",
            # The warm-up run sends the same prompts: with prefix caching the measured run would prefill
            # from cached blocks (and compile that path then: a 580 ms first step seen on the H200),
            # while the server's load sends fresh prompts.
            enable_prefix_caching=False,
        )
        engine = LLMEngine(self.loaded, settings)
        names = traffic.choices(batch)
        prompts = traffic.prompts(batch, token_range)

        def request(name: str, prompt: list[int], rng: random.Random) -> Request:
            return Request(prompt_token_ids=list(prompt), adapter=self.refs.get(name) if name else None,
                           params=SamplingParams(max_tokens=traffic.output_len, temperature=traffic.temperature,
                                                 top_p=traffic.top_p, ignore_eos=True,
                                                 seed=rng.randrange(1 << 31) if traffic.temperature > 0 else None))

        def make() -> list[Request]:
            rng = random.Random(traffic.seed)
            return [request(name, prompt, rng) for name, prompt in zip(names, prompts, strict=True)]

        loop_names = traffic.choices(traffic.num_requests)

        def make_loop(count: int) -> list[Request]:
            rng = random.Random(traffic.seed)
            return [request(loop_names[i % len(loop_names)], traffic.prompt(i, token_range), rng)
                    for i in range(count)]

        try:
            with torch.inference_mode():
                result = measure_generation(engine, make, self.device, repeats=TIMED_RUNS)
                closed_loop_cold = closed_loop(engine, make_loop(2 * batch), batch, self.device)
                loops = [closed_loop(engine, make_loop(traffic.num_requests), batch, self.device)
                         for _ in range(CLOSED_LOOP_RUNS)]
                delays = random.Random(traffic.seed)
                arrivals = closed_loop(engine, make_loop(traffic.num_requests), batch, self.device,
                                       arrival_delay=lambda: delays.uniform(*ARRIVAL_DELAY_MS) / 1e3)
        finally:
            release_engine(engine, self.device)
        result["closed_loop"] = sorted(loops, key=lambda run: run["tokens_per_s"])[len(loops) // 2]
        result["closed_loop"]["tokens_per_s_runs"] = [run["tokens_per_s"] for run in loops]
        result["closed_loop"]["warmup_wall_s"] = closed_loop_cold["wall_s"]
        result["closed_loop_arrivals"] = {**arrivals, "arrival_delay_ms": list(ARRIVAL_DELAY_MS)}
        result["lora_mode"] = server.lora_mode
        result["distinct_adapters"] = len(set(names))
        return result

