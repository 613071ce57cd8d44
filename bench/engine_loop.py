"""The engine under the arrivals a server sees, without HTTP: where serving loses against lockstep.

    python -m bench.engine_loop [--model 1b] [--mode unmerged] [--adapters 32] [--concurrency 32]
        [--requests 256] [--prompt-len 128] [--output-len 64] [--temperature 0] [--prefix 0]
        [--max-batched-tokens 4096] [--profile-steps 24] [--arrival-delay-ms LO-HI] [--out bench/results]

Lockstep is one batch admitted at once: one prefill step, then decode steps of the full batch. A server
under `concurrency` streams sees a closed loop instead: every finished request is replaced by the next
one. Replaced at once, equal-length requests stay in lockstep; with `--arrival-delay-ms` each replacement
arrives a uniform draw of LO-HI ms later (a client's answer and the hops to the engine), so the streams
drift apart and prefills arrive a few at a time between decode steps, as in a server. This runs both
on the same engine and records every closed-loop step's wall time with its work (prefill tokens and
sequences, decode rows), summarised by kind (decode-only, prefill-only, mixed), then profiles a window
of closed-loop steps (host time by op, device time by kernel kind) to tell a host-bound step from a
device-bound one.

`--carry K` measures what prompts cost when they arrive beside a decode batch (the server's case): with
`--concurrency` requests decoding, k prompts of `--prompt-len` tokens that want one output token
(k = 0..K) are added and the engine stepped a fixed number of times; each k's median wall time over that
window, less k = 0's, is what carrying k prompts cost, and the step log says over how many steps the
scheduler spread them. `--graph-rows` sets cuda_graph_max_rows (how many prompt tokens a decode replay
may carry).

`--prefix N` adds the prefix-cache probe of issue 10 at the engine level: time to first token of a
prompt of N + 16 tokens whose first N are cached (hit) against a fresh one (miss), and a profile of the
hit's step.

Writes ``<date>-<device>-<model>-<mode>-loop.json`` with ``ratios``: ``closed_over_lockstep_<model>_c<n>``
and, with --prefix, ``engine_prefix_hit_over_miss_<model>``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections import deque

import torch

from bench.closed_loop import StepLog, closed_loop, summarize_steps, sync
from bench.profile_step import kind_of
from bench.results import write_named_result

KERNEL_NAME_CHARS = 120  # kernel names (templated ones run to kilobytes) are cut to this many characters
TOP_KERNELS = 40  # kernels of a profile kept by name, the longest first


def profile_window(step_fn, num_steps: int) -> dict:
    """Host op time (self CPU) and device time by kernel kind over `num_steps` calls of step_fn."""
    from torch.profiler import ProfilerActivity, profile

    sync(None)
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(num_steps):
            step_fn()
        sync(None)
    wall_ms = (time.perf_counter() - start) * 1e3
    device_by_kind: dict[str, float] = {}
    device_by_kernel: dict[str, float] = {}
    for event in prof.events():
        if str(getattr(event, "device_type", "")).endswith("CUDA") and event.device_time > 0:
            kind = kind_of(event.name)
            device_by_kind[kind] = device_by_kind.get(kind, 0.0) + event.device_time / 1e3
            name = event.name[:KERNEL_NAME_CHARS]
            device_by_kernel[name] = device_by_kernel.get(name, 0.0) + event.device_time / 1e3
    top_kernels = sorted(device_by_kernel.items(), key=lambda kv: -kv[1])[:TOP_KERNELS]
    host = sorted(
        ((e.key, e.self_cpu_time_total / 1e3, e.count) for e in prof.key_averages()), key=lambda row: -row[1]
    )[:30]
    return {
        "steps": num_steps,
        "wall_ms_per_step": wall_ms / num_steps,
        "device_ms_per_step": {k: v / num_steps for k, v in sorted(device_by_kind.items(), key=lambda kv: -kv[1])},
        "device_total_ms_per_step": sum(device_by_kind.values()) / num_steps,
        "device_ms_per_step_by_kernel": {name: ms / num_steps for name, ms in top_kernels},
        "host_self_ms_per_step_top": {name: [ms / num_steps, count / num_steps] for name, ms, count in host},
    }


def first_token_ms(engine, request) -> float:
    """Wall time from add to the first sampled token of `request`, stepping the engine alone."""
    sync(None)
    start = time.perf_counter()
    engine.add_request(request)
    while not request.output_token_ids:
        engine.step()
    elapsed = (time.perf_counter() - start) * 1e3
    while engine.has_unfinished():
        engine.step()
    return elapsed


def prefix_probe(engine, vocab: int, prefix_len: int, probes: int) -> dict:
    """Median time to first token, prefix cached (hit) and not (miss), and a profile of a hit's step."""
    from server.engine.request import Request, SamplingParams

    rng = random.Random(7)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(vocab) for _ in range(n)]

    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    shared = tokens(prefix_len)
    first_token_ms(engine, Request(prompt_token_ids=shared + tokens(16), params=params))  # warm both paths
    first_token_ms(engine, Request(prompt_token_ids=shared + tokens(16), params=params))
    miss = [
        first_token_ms(engine, Request(prompt_token_ids=tokens(prefix_len + 16), params=params)) for _ in range(probes)
    ]
    hit = [first_token_ms(engine, Request(prompt_token_ids=shared + tokens(16), params=params)) for _ in range(probes)]

    def one_hit() -> None:
        engine.add_request(Request(prompt_token_ids=shared + tokens(16), params=params))
        engine.step()  # the prefill step
        while engine.has_unfinished():
            engine.step()

    return {
        "prefix_len": prefix_len,
        "miss_ms": miss,
        "hit_ms": hit,
        "miss_ms_median": statistics.median(miss),
        "hit_ms_median": statistics.median(hit),
        "hit_profile": profile_window(one_hit, 3),
    }


def carry_costs(engine, make, max_prompts: int, repeats: int, log: StepLog, device: torch.device) -> dict:
    """Per k = 0..max_prompts: the median wall ms of `max_prompts + 3` step calls after adding k prompts of
    one output token beside the running decode batch, that less k = 0's, and the steps that carried them.
    The decode batch must be running (every request past its prefill) and last through the probe."""
    calls = max_prompts + 3  # enough for one prompt a step, and the step that reads the last one
    result = {}
    for k in range(max_prompts + 1):
        times, carriers = [], []
        for rep in range(repeats + 1):  # the first is a warm-up (its graph bucket, its prefill shapes)
            prompts = make(k, 1000 + 31 * k + rep)
            for prompt in prompts:
                prompt.params.max_tokens = 1
            sync(device)
            start = time.perf_counter()
            first = len(log.steps)
            for prompt in prompts:
                engine.add_request(prompt)
            for _ in range(calls):
                log.step()
            sync(device)
            if rep:
                times.append((time.perf_counter() - start) * 1e3)
                carriers.append(sum(1 for s in log.steps[first:] if s["prefill_seqs"]))
            assert all(p.is_finished for p in prompts), "a probe prompt did not finish in the window"
        result[k] = {"ms": statistics.median(times), "carrying_steps": statistics.median(carriers)}
    for k in result:
        result[k]["extra_ms"] = result[k]["ms"] - result[0]["ms"]
        result[k]["extra_ms_per_prompt"] = result[k]["extra_ms"] / k if k else 0.0
    profiles = {}
    for k in (0, max_prompts):  # device time by kernel kind of the same window, without and with the prompts
        prompts = make(k, 5000 + k)
        for prompt in prompts:
            prompt.params.max_tokens = 1

        def window(prompts=prompts) -> None:
            for prompt in prompts:
                engine.add_request(prompt)
            for _ in range(calls):
                log.step()

        profiles[k] = profile_window(window, 1)
    by_kind = {k: p["device_ms_per_step"] for k, p in profiles.items()}
    by_kernel = {k: p["device_ms_per_step_by_kernel"] for k, p in profiles.items()}
    extra = {kind: ms - by_kind[0].get(kind, 0.0) for kind, ms in by_kind[max_prompts].items()}
    extra_by_kernel = sorted(((name, ms - by_kernel[0].get(name, 0.0)) for name, ms in by_kernel[max_prompts].items()),
                             key=lambda kv: -kv[1])
    return {"calls": calls, "by_prompts": result, "device_ms_by_kind": {str(k): v for k, v in by_kind.items()},
            "extra_device_ms_by_kind": extra, "extra_device_ms_by_kernel": dict(extra_by_kernel)}


def main() -> None:
    from bench.build import build_engine, kv_blocks_for, loaded_model, our_model, random_adapters, random_hf_model
    from bench.ours import make_requests, measure_generation
    from bench.shapes import llama_config, shape_facts
    from server.engine.request import SamplingParams

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="1b")
    parser.add_argument("--mode", default="unmerged", choices=["merged", "unmerged", "auto"])
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--max-batched-tokens", type=int, default=4096)
    parser.add_argument("--prefix", type=int, default=0, help="also probe a cached prefix of this many tokens")
    parser.add_argument("--profile-steps", type=int, default=24)
    parser.add_argument("--carry", type=int, default=0, help="also probe the cost of 0..N prompts beside decode")
    parser.add_argument("--graph-rows", type=int, default=None, help="cuda_graph_max_rows (default: Settings')")
    parser.add_argument("--arrival-delay-ms", default=None, help="LO-HI: the closed loop's replacements arrive a "
                        "uniform draw of that many ms after the step that finished the request (default: at once)")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = llama_config(args.model)
    hf = random_hf_model(config, device, dtype)
    ours = our_model(hf, device, dtype)
    del hf
    torch.cuda.empty_cache()
    seq_tokens = max(args.prompt_len + args.output_len, args.prefix + 32, args.prompt_len + 64 * (args.carry + 3))
    engine = build_engine(loaded_model(ours, config), args.mode, device,
                          kv_blocks_for(args.concurrency + args.carry + 4, seq_tokens), args.graph_rows)
    engine.scheduler.max_num_batched_tokens = args.max_batched_tokens
    adapters = random_adapters(shape_facts(config), args.adapters, device) if args.adapters else [None]

    def make(count: int, seed: int) -> list:
        requests = make_requests(config.vocab_size, count, args.prompt_len, args.output_len, adapters, seed)
        if args.temperature > 0:
            for index, request in enumerate(requests):
                request.params = SamplingParams(
                    max_tokens=args.output_len, temperature=args.temperature, top_p=0.9, ignore_eos=True, seed=index
                )
        return requests

    result: dict = {
        "benchmark": "engine_loop",
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "model": args.model,
        "mode": args.mode,
        "torch": torch.__version__,
        "command": "python -m bench.engine_loop "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
        "args": vars(args),
    }
    with torch.inference_mode():
        # Fresh prompts for the measured run: with the warm-up's prompts it would take the cached-prefix
        # path (and compile it then: the 1-1.8 s first steps of the first H200 runs).
        seeds = iter(range(100, 102))
        result["lockstep"] = measure_generation(engine, lambda: make(args.concurrency, next(seeds)), device)
        log = StepLog(engine)
        closed_loop(engine, make(args.concurrency * 2, 1), args.concurrency, device, log)  # warm-up
        delay = None
        if args.arrival_delay_ms:
            low, high = (float(v) for v in args.arrival_delay_ms.split("-"))
            draws = random.Random(0)
            delay = lambda: draws.uniform(low, high) / 1e3  # noqa: E731
        result["closed_loop"] = closed_loop(engine, make(args.requests, 2), args.concurrency, device, log, delay)
        window = deque(make(args.requests, 3))
        for _ in range(args.concurrency):
            engine.add_request(window.popleft())
        for _ in range(3 * args.output_len // 2):  # into the steady state: arrivals spread over steps
            for output in log.step():
                if output.finished and window:
                    engine.add_request(window.popleft())
        kinds_before = len(log.steps)

        def loop_step() -> None:
            for output in log.step():
                if output.finished and window:
                    engine.add_request(window.popleft())

        result["closed_loop_profile"] = profile_window(loop_step, args.profile_steps)
        result["closed_loop_profile"]["kinds"] = summarize_steps(log.steps[kinds_before:])
        while engine.has_unfinished():
            engine.step()
        if args.prefix:
            result["prefix"] = prefix_probe(engine, config.vocab_size, args.prefix, 5)
        if args.carry:
            background = make(args.concurrency, 4)
            for request in background:
                request.params.max_tokens = seq_tokens - args.prompt_len
                engine.add_request(request)
            while any(r.is_prefilling or not r.output_token_ids for r in background):
                log.step()
            result["carry"] = carry_costs(engine, make, args.carry, 5, log, device)
            for request in background:
                engine.abort(request.request_id)
            while engine.has_unfinished():
                engine.step()
    tag = f"{args.model}_c{args.concurrency}"
    result["ratios"] = {
        f"closed_over_lockstep_{tag}": result["closed_loop"]["tokens_per_s"] / result["lockstep"]["tokens_per_s"]
    }
    if args.prefix:
        result["ratios"][f"engine_prefix_hit_over_miss_{args.model}"] = (
            result["prefix"]["hit_ms_median"] / result["prefix"]["miss_ms_median"]
        )
    print(json.dumps({k: result[k] for k in ("lockstep", "closed_loop", "closed_loop_profile")}, indent=1)[:6000])
    if args.prefix:
        print(json.dumps(result["prefix"], indent=1)[:4000])
    if args.carry:
        print(json.dumps(result["carry"], indent=1))
    write_named_result(args.out, result, f"{args.model}-{args.mode}-loop")


if __name__ == "__main__":
    main()
