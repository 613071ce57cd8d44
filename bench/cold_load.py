"""Time the CPU side of a cold adapter: the store reading one version back from disk (sha256 check,
decode), as the adapter tier does before a GPU copy. Runs anywhere; no GPU needed.

    python -m bench.cold_load [--model 8b] [--rank 16] [--repeats 6]

Prints the size and each load's milliseconds (the file stays in the page cache after the first, as for
an adapter uploaded earlier in the server's life).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from adapters_store import AdapterStore, BaseModelSpec
from bench.serve.adapters import AdapterFactory, AdapterSpec
from bench.shapes import SHAPES, llama_config, shape_facts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cold_load", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="8b", choices=sorted(SHAPES))
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=6)
    args = p.parse_args(argv)
    config, weights = AdapterFactory(shape_facts(llama_config(args.model)), args.rank).files(
        AdapterSpec("cold", args.rank), 0)
    spec = BaseModelSpec.from_hf_config(dict(SHAPES[args.model], model_type="llama"))
    with tempfile.TemporaryDirectory() as root:
        store = AdapterStore(Path(root), spec, max_rank=max(64, args.rank), max_bytes=1 << 32)
        record = store.put("cold", config, weights)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            loaded = store.load_weights(record)
            times.append((time.perf_counter() - start) * 1e3)
    dtype = next(iter(loaded.tensors.values()))[0].dtype
    print(f"{args.model} rank {args.rank}: {len(weights) / 1e6:.1f} MB, tensors {dtype}; load_weights ms: "
          + ", ".join(f"{t:.0f}" for t in times))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
