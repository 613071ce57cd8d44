"""`python -m bench.sampler_profile`: where a sampled step's extra time goes (issue 13's sampled / greedy).

The engine's sampled decode step (temperature 1.0, top-p 0.9) of the 1B c32 reference takes ~0.4 ms more than a
greedy one. This times the sampler alone on logits [rows, vocab] as the model gives them, for greedy, temperature
only, and temperature + top-p rows, on flat logits (a random-weight model's: top-p 0.9 keeps most of the
vocabulary) and on peaked ones (randn x 4: a trained model's few likely tokens). For each: the host time of
`sample_async` (the launches, not waited for), the synchronized time of a call, and the device time of its kernels
by name (torch.profiler). A timing tool, not a test; writes ``<date>-<device>-sampler-profile.json``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.build import device_name, sync
from bench.results import write_named_result
from server.engine.request import Request, SamplingParams
from server.engine.sampler import Sampler

CONFIGS = {
    "greedy": dict(temperature=0.0),
    "temperature": dict(temperature=1.0, seed=1),
    "top_p": dict(temperature=1.0, top_p=0.9, seed=1),
}
SCALES = {"flat": 0.05, "peaked": 4.0}  # logits = randn * scale


def kernel_times(fn, calls: int, device: torch.device) -> dict[str, float]:
    """Device µs per call by kernel name over `calls` calls of fn (none off CUDA)."""
    from torch.profiler import ProfilerActivity, profile

    if device.type != "cuda":
        return {}
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        sync(device)
    by_name: dict[str, float] = {}
    for event in prof.events():
        if str(getattr(event, "device_type", "")).endswith("CUDA") and event.device_time > 0:
            by_name[event.name[:90]] = by_name.get(event.name[:90], 0.0) + event.device_time / calls
    return dict(sorted(by_name.items(), key=lambda kv: -kv[1]))


def measure(sampler: Sampler, logits: torch.Tensor, params: dict, repeats: int) -> dict:
    device = logits.device
    requests = [Request([1, 2, 3], SamplingParams(max_tokens=64, **params)) for _ in range(logits.shape[0])]
    for _ in range(3):  # warm-up: kernels built, seeds drawn
        sampler.sample(logits, requests)
    host, synced = [], []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        pending = sampler.sample_async(logits, requests)
        host.append(time.perf_counter() - start)
        pending.resolve()
        synced.append(time.perf_counter() - start)
    kernels = kernel_times(lambda: sampler.sample_async(logits, requests).resolve(), 10, device)
    return {
        "host_launch_us": round(statistics.median(host) * 1e6, 1),
        "synced_us": round(statistics.median(synced) * 1e6, 1),
        "device_us": round(sum(kernels.values()), 1),
        "kernels_us": {name: round(us, 1) for name, us in kernels.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    sampler = Sampler(args.vocab, device)
    if device.type == "cuda":
        sampler.warm_up()
    gen = torch.Generator().manual_seed(0)
    results = {}
    for shape, scale in SCALES.items():
        logits = (torch.randn(args.rows, args.vocab, generator=gen) * scale).to(device)
        for name, params in CONFIGS.items():
            results[f"{shape}/{name}"] = row = measure(sampler, logits, params, args.repeats)
            print(f"{shape:7s} {name:12s} host {row['host_launch_us']:8.1f} us  synced {row['synced_us']:8.1f} us  "
                  f"device {row['device_us']:8.1f} us", flush=True)
    record = {"benchmark": "sampler_profile", "date": time.strftime("%Y-%m-%d"), "device": device_name(device),
              "torch": torch.__version__, "rows": args.rows,
              "vocab": args.vocab, "command": "python -m bench.sampler_profile", "results": results}
    path = write_named_result(args.out, record, "sampler-profile")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
