"""`python -m bench.serve --model 1b|8b|tiny --preset c32|lora-modes|zipf1000|cold-warm|custom`:
the real server (`python -m server` in a subprocess) on a random-weight model, driven over HTTP, and
the engine alone on the same batch, in one run. See bench/README-serve.md.

Order: model dir (cached), adapters (uploaded over HTTP, or written into the store first for the
thousand-adapter preset), then per phase: start the server, upload, each load (warm-up, then
measured), probes, stop; then the engine alone for the loads that compare with it. The JSON is
rewritten after every measurement; a failed measurement records its error and the run goes on.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.results import Recorder, slug
from bench.serve import load as http
from bench.serve.adapters import AdapterFactory, adapter_nbytes, adapter_specs, seed_store
from bench.serve.modeldir import build_model_dir, special_token_ids
from bench.serve.phases import PhaseRunner, run_engine, write_auth_file
from bench.serve.process import ServerConfig
from bench.serve.scenarios import PRESETS, Knobs, Scenario, build, derive_ratios, tenant_key
from bench.shapes import LINEAR_MODULES, SHAPES, llama_config, shape_facts

MAX_UPLOAD_BYTES = 4 << 30
# Budget kept for the engine-only part: on the H200 the 1B part took 15-35 s (model load 5-6 s, two loads);
# at 60 s, a c32 run whose server took 69 s to start skipped every load of its budget of 140 s.
ENGINE_RESERVE_S = {"tiny": 10.0, "1b": 40.0, "8b": 120.0}


class ServeRecorder(Recorder):
    """bench.results.Recorder with this benchmark's sections and ratios."""

    def __init__(self, path: Path, data: dict, budget_s: float, preset: str, shape: str):
        self.preset, self.shape = preset, shape
        for section in ("build", "server", "engine"):
            data.setdefault(section, {})
        super().__init__(path, data, budget_s)
        for section in ("ours", "baseline"):
            data.pop(section, None)

    def save(self) -> None:
        import json
        import os

        self.data["elapsed_s"] = round(self.elapsed, 1)
        self.data["ratios"] = derive_ratios(self.preset, self.shape, self.data)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        os.replace(tmp, self.path)


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="1b", choices=sorted(SHAPES), help="model shape (tiny = CPU smoke run)")
    p.add_argument("--preset", default="c32", choices=PRESETS)
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--tag", default="", help="suffix of the result file name")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--budget-s", type=float, default=540.0, help="start nothing past this; loads stop sending too")
    p.add_argument("--cache-dir", type=Path, default=Path(".cache/bench-serve"), help="model dirs are kept here")
    p.add_argument("--work-dir", type=Path, default=None, help="adapter store and server logs (default: temp)")
    p.add_argument("--concurrency", type=int)
    p.add_argument("--requests", type=int, dest="num_requests")
    p.add_argument("--prompt-len", type=int)
    p.add_argument("--output-len", type=int)
    p.add_argument("--num-adapters", type=int)
    p.add_argument("--ranks", type=_ints, help="comma-separated; adapters cycle through them")
    p.add_argument("--adapter-dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--adapter-modules", type=lambda text: tuple(text.split(",")), default=LINEAR_MODULES,
                   help="comma-separated target modules (default all seven linears)")
    p.add_argument("--max-load-s", type=float, default=300.0, help="a load stops sending new requests after this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lora-mode", default="unmerged", choices=("unmerged", "merged", "auto"),
                   help="custom, zipf1000 and cold-warm presets")
    p.add_argument("--distribution", default="cycle", choices=("cycle", "uniform", "zipf"), help="custom preset")
    p.add_argument("--zipf-s", type=float, default=1.0, help="custom preset")
    p.add_argument("--temperature", type=float, default=0.0, help="custom preset")
    p.add_argument("--top-p", type=float, default=1.0, help="custom preset")
    p.add_argument("--quantization", default="nf4", choices=("nf4", "none"))
    p.add_argument("--max-slots", type=int, default=32)
    p.add_argument("--max-cpu-adapters", type=int, default=None,
                   help="count cap on the server's CPU adapter tier (default: none, its byte budget decides)")
    p.add_argument("--max-batch-size", type=int, default=None, help="default: max(64, concurrency)")
    p.add_argument("--server-arg", action="append", default=[], help="extra `python -m server` flag, e.g. "
                   "--server-arg=--kv-cache-memory-fraction=0.3 (repeatable)")
    p.add_argument("--key-line", action="append", default=[], help="fairness preset: a TOML line added to "
                   "each tenant's key in the auth file, e.g. --key-line='max_concurrent_requests = 16' (repeatable)")
    p.add_argument("--skip-engine", action="store_true", help="no engine-only reference")
    p.add_argument("--client-procs", type=int, default=None, help="client processes a load's streams are split "
                   "over (default: one per 8 streams, at most a quarter of the cores; a two-tenant load uses one)")
    return p.parse_args(argv)


def token_range(shape: str) -> tuple[int, int]:
    """Ids of ordinary tokens (prompts never contain special tokens)."""
    specials = special_token_ids(shape)
    if min(specials) == 0:
        return max(specials) + 1, SHAPES[shape]["vocab_size"]
    return 0, min(specials)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.model != "tiny" and device != "cuda":
        print(f"--model {args.model} needs a CUDA GPU (use --model tiny for a CPU smoke run)", file=sys.stderr)
        return 2
    knobs = Knobs(concurrency=args.concurrency, num_requests=args.num_requests, prompt_len=args.prompt_len,
                  output_len=args.output_len, num_adapters=args.num_adapters, ranks=args.ranks,
                  max_load_s=args.max_load_s, seed=args.seed, lora_mode=args.lora_mode,
                  distribution=args.distribution, zipf_s=args.zipf_s, temperature=args.temperature,
                  top_p=args.top_p)
    scenario = build(args.preset, knobs)
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    shape = shape_facts(llama_config(args.model))
    now = dt.datetime.now(dt.timezone.utc)
    from bench.plan import versions

    data: dict[str, Any] = {
        "benchmark": "serve", "preset": args.preset, "shape": args.model,
        "date": now.date().isoformat(), "timestamp": now.isoformat(timespec="seconds"), "device": device_name,
        "command": "python -m bench.serve " + " ".join(sys.argv[1:] if argv is None else argv),
        "versions": versions(),
        "config": {"shape": shape, "knobs": knobs.__dict__, "ranks": scenario.ranks,
                   "num_adapters": scenario.num_adapters, "adapter_dtype": args.adapter_dtype,
                   "adapter_bytes_by_rank": {r: adapter_nbytes(shape, r, getattr(torch, args.adapter_dtype),
                                                                        args.adapter_modules)
                                             for r in scenario.ranks},
                   "adapter_modules": list(args.adapter_modules), "seed_store": scenario.seed_store,
                   "client_event_loop": http.event_loop_name(), "client_library": http.CLIENT_LIBRARY,
                   "phases": {}},
    }
    name = f"{data['date']}-{slug(device_name)}-serve-{args.preset}-{args.model}{'-' + args.tag if args.tag else ''}"
    rec = ServeRecorder(args.out / f"{name}.json", data, args.budget_s, args.preset, args.model)
    rec.log(f"{args.preset} on {args.model} / {device_name}; writing {rec.path}; budget {args.budget_s:.0f} s")
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-serve-"))
    try:
        return run(rec, args, scenario, device, work)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


def run(rec: ServeRecorder, args: argparse.Namespace, scenario: Scenario, device: str, work: Path) -> int:
    import torch

    built = rec.measure("build", "model_dir", lambda: build_model_dir(args.model, args.cache_dir, device)[1])
    if "error" in built:
        return 1
    model_dir = Path(built["path"])
    max_rank = max(scenario.ranks)
    factory = AdapterFactory(rec.data["config"]["shape"], max_rank, getattr(torch, args.adapter_dtype),
                             args.adapter_modules)
    specs = adapter_specs(scenario.num_adapters, scenario.ranks, "bench")
    adapters_dir = work / "adapters"
    if scenario.seed_store and specs:
        rec.measure("build", "seed_store",
                    lambda: seed_store(model_dir, adapters_dir, factory, specs, max_rank, MAX_UPLOAD_BYTES))
    auth_file = write_auth_file(work / "keys.toml", scenario.tenants, args.key_line) if scenario.tenants else None
    engine_loads = [(phase, load) for phase in scenario.phases for load in phase.loads
                    if load.engine and not args.skip_engine]
    runner = PhaseRunner(rec, factory, specs, scenario.ranks, token_range(args.model), work,
                         admin_key=tenant_key(scenario.tenants[0]) if scenario.tenants else None,
                         reserve_s=ENGINE_RESERVE_S[args.model] if engine_loads else 0.0,
                         client_procs=args.client_procs)
    configs = {}
    for index, phase in enumerate(scenario.phases):
        loads = [load.traffic for load in phase.loads] + [load.background for load in phase.loads if load.background]
        configs[phase.name] = config = ServerConfig(
            model_dir=model_dir, adapters_dir=adapters_dir, device=device, lora_mode=phase.lora_mode,
            quantization=args.quantization, max_slots=args.max_slots, max_rank=max_rank,
            max_batch_size=args.max_batch_size or max([64] + [t.concurrency for t in loads]),
            max_model_len=max([256, phase.prefix_len + 64] + [t.prompt_len + t.output_len + 16 for t in loads]),
            max_cpu_adapters=args.max_cpu_adapters, auth_file=auth_file, extra_args=args.server_arg)
        rec.data["config"]["phases"][phase.name] = config.as_dict()
        runner.run(phase, config, specs if index == 0 and not scenario.seed_store else [])
    if engine_loads:
        run_engine(rec, engine_loads, configs, factory, specs, runner.tokens)
    rec.save()
    rec.log(f"done: {rec.path}")
    for key, value in rec.data["ratios"].items():
        rec.log(f"  {key} = {value}")
    if rec.data["errors"]:
        rec.log(f"{len(rec.data['errors'])} measurement(s) failed: {', '.join(rec.data['errors'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
