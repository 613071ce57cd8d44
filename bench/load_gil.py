"""How much a cold adapter read slows a busy Python thread beside it (the engine's, in the server).

    python -m bench.load_gil [--model 1b] [--rank 32] [--seconds 2]

A thread reads stored adapters back (`AdapterStore.load_weights`) in a loop while the main thread spins;
prints the main thread's rate beside the loads as a share of its rate alone, and the mean load time there.
Every call that releases and retakes the GIL hands it between the two threads, so this is what a loader
thread in the engine's process costs the engine. Runs anywhere; no GPU needed.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

from adapters_store import AdapterStore, BaseModelSpec
from bench.serve.adapters import AdapterFactory, AdapterSpec
from bench.shapes import SHAPES, llama_config, shape_facts


def _spin(seconds: float) -> float:
    count, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        count += 1
    return count / seconds


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
        stop, times = threading.Event(), []

        def loader():
            while not stop.is_set():
                for record in records:
                    start = time.perf_counter()
                    store.load_weights(record)
                    times.append(time.perf_counter() - start)

        thread = threading.Thread(target=loader)
        thread.start()
        beside = _spin(args.seconds)
        stop.set()
        thread.join()
    print(f"{args.model} rank {args.rank}: a spinning thread keeps {beside / alone:.2f} of its rate beside the loads; "
          f"{len(times)} loads, mean {1e3 * sum(times) / len(times):.0f} ms each there")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
