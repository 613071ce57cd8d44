"""How cold adapter reads and a busy Python thread beside them slow each other (the engine's, in the server).

    python -m bench.load_gil [--model 1b] [--rank 32] [--seconds 2]

Two probes, each against the same thread alone:
- spin: the main thread spins in pure Python while a thread reads stored adapters back
  (`AdapterStore.load_weights`) in a loop: the spinner's rate, and each load's time there;
- engine: the main thread runs engine-like steps (300 small torch calls, then 3 ms without the GIL, as a
  step waiting for its GPU work) while the loader reads one adapter every ~20 ms plus its own time, in
  three ways: the read alone, plus a copy of every tensor (as pinning does), plus the ~1,400 small ops of
  laying the adapter out as its pool block. Median and mean step time.
Every call that releases and retakes the GIL may hand it between the threads. Runs anywhere; no GPU.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from adapters_store import AdapterStore, BaseModelSpec
from bench.serve.adapters import AdapterFactory, AdapterSpec
from bench.shapes import SHAPES, llama_config, shape_facts


def _spin(seconds: float) -> float:
    count, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        count += 1
    return count / seconds


def _engine_steps(seconds: float, probe: torch.Tensor) -> list[float]:
    steps, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        for _ in range(300):
            probe.add_(1.0)
        time.sleep(0.003)
        steps.append(time.perf_counter() - start)
    return steps


def _copied(weights) -> None:
    weights.tensors = {k: (a.clone(), b.clone()) for k, (a, b) in weights.tensors.items()}


def _laid_out(weights) -> None:
    for a, b in weights.tensors.values():
        block = torch.zeros(3 * a.shape[0], a.shape[1], dtype=a.dtype)
        block[: a.shape[0]].copy_(a)
        torch.zeros(b.shape[1], b.shape[0], dtype=b.dtype).copy_((b.float() * 0.5).t())


def _beside_loads(store, records, busy, then=None, pause_s: float = 0.0):
    """Run `busy()` on this thread while another reads `records` back in a loop (each read followed by
    `then(weights)` and a `pause_s` sleep); returns (what `busy` returned, each read's seconds)."""
    stop, loads = threading.Event(), []

    def loader():
        while not stop.is_set():
            for record in records:
                start = time.perf_counter()
                weights = store.load_weights(record)
                if then is not None:
                    then(weights)
                loads.append(time.perf_counter() - start)
                if pause_s:
                    time.sleep(pause_s)

    thread = threading.Thread(target=loader)
    thread.start()
    try:
        return busy(), loads
    finally:
        stop.set()
        thread.join()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.load_gil", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="1b", choices=sorted(SHAPES))
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--seconds", type=float, default=2.0)
    args = p.parse_args(argv)
    factory = AdapterFactory(shape_facts(llama_config(args.model)), args.rank)
    spec = BaseModelSpec.from_hf_config(dict(SHAPES[args.model], model_type="llama"))
    with tempfile.TemporaryDirectory() as root:
        store = AdapterStore(Path(root), spec, max_rank=max(64, args.rank), max_bytes=1 << 34)
        records = [store.put(f"a{i}", *factory.files(AdapterSpec(f"a{i}", args.rank), i)) for i in range(4)]
        for record in records:  # page cache and allocator warm
            store.load_weights(record)
        alone = _spin(args.seconds / 2)
        beside, times = _beside_loads(store, records, lambda: _spin(args.seconds))
        print(f"{args.model} rank {args.rank}: a spinning thread keeps {beside / alone:.2f} of its rate beside the "
              f"loads; {len(times)} loads, mean {1e3 * statistics.mean(times):.0f} ms each there")
        steps = _engine_steps(args.seconds, torch.zeros(64))
        print(f"  engine-like steps alone: median {1e3 * statistics.median(steps):.2f} ms, "
              f"mean {1e3 * statistics.mean(steps):.2f} ms")
        for label, then in (("reads", None), ("reads + a copy of every tensor", _copied),
                            ("reads + pool layout ops", _laid_out)):
            steps, loads = _beside_loads(store, records, lambda: _engine_steps(args.seconds, torch.zeros(64)), then,
                                         pause_s=0.02)
            print(f"  beside {label}: median {1e3 * statistics.median(steps):.2f} ms, mean "
                  f"{1e3 * statistics.mean(steps):.2f} ms; {len(loads)} loads of {1e3 * statistics.mean(loads):.0f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
