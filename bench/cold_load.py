"""Time the stages of a cold adapter, one by one: the upload's store write, the store reading one version
back (sha256 check, decode), pinning it, and its host-to-device copies. Runs anywhere; the pinning and
copy stages need a CUDA GPU.

    python -m bench.cold_load [--model 8b] [--rank 16] [--repeats 6] [--out DIR]

`cold_ttft_extra_ms_8b_r16` (issue 15: disk to first token within 60 ms more than a warm adapter, 84 MB)
and `upload_to_usable_ms_8b_r16` (300 ms) are the sum of these stages and a prefill; on the H200 they
measured 318 and 983 ms (bench/NOTES.md) without saying which stage costs what. This says it. Each stage
is timed `--repeats` times; the first figure of a pinning stage is a cold process's (the pinned allocator
empty: what the first request for an adapter meets after a restart).

Stages:
- `put`: `AdapterStore.put` of the files an upload sends (validation, hash, durable write);
- `load_pages`: the read-back straight into pinned 4 MiB pages from PyTorch's pinned cache, as the CPU
  tier did until the seventh session (the first figure is a fresh process's);
- `alloc_pages_after_warm_up`: an adapter's worth of such pages after the cache was warmed as the tier
  warmed it (does the cache hand back its blocks, or does the driver lock fresh pages?);
- `alloc_pages_pool` / `load_pages_pool`: the same from the tier's own reserved pages (`PagePool`), as the
  server does now;
- `load_pages_gil_busy`: `load_pages` beside a thread running Python, at the server's switch interval;
- `sha256_one_chunk` / `sha256_chunks_parallel`: the digests alone;
- `load_weights`: the read-back into a buffer of its own (the file stays in the page cache after the
  first, as for an adapter uploaded earlier in the server's life);
- `pin_pages`: every tensor copied into pinned 4 MiB pages, as the CPU tier does now (CUDA; the first
  figure is a fresh process's);
- `pin_per_tensor`: `pin_memory()` of every tensor, as the CPU tier did before (CUDA);
- `pin_one_buffer`: one pinned buffer for all of them and one copy into it (CUDA);
- `h2d_pinned` / `h2d_pages` / `h2d_pageable`: every tensor copied to the device, asynchronously, then
  one sync (CUDA).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from adapters_store import AdapterStore, BaseModelSpec, digests
from bench.serve.adapters import AdapterFactory, AdapterSpec
from bench.shapes import SHAPES, llama_config, shape_facts
from server.config import Settings
from server.pinned_pages import PAGE_BYTES, PageAllocator, PagePool, pin_packed, warm_up


def _timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(round((time.perf_counter() - start) * 1e3, 2))
    return times


@contextlib.contextmanager
def _switch_interval(seconds: float):
    """The server's GIL switch interval meanwhile (at Python's 5 ms, a read beside a busy thread takes
    seconds: this stage then outlived the call's time limit on the H200)."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(seconds)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


@contextlib.contextmanager
def _busy_gil():
    """A thread running pure Python meanwhile (it takes the GIL whenever it can)."""
    stop = threading.Event()

    def spin():
        n = 0
        while not stop.is_set():
            n += 1

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _pin_one_buffer(tensors: list[torch.Tensor]) -> None:
    buffer = torch.empty(sum(t.numel() * t.element_size() for t in tensors), dtype=torch.uint8, pin_memory=True)
    offset = 0
    for t in tensors:
        n = t.numel() * t.element_size()
        buffer[offset : offset + n].copy_(t.reshape(-1).view(torch.uint8))
        offset += n


def _h2d(tensors: list[torch.Tensor]) -> None:
    for t in tensors:
        t.to("cuda", non_blocking=True)
    torch.cuda.synchronize()


def stages(model: str, rank: int, repeats: int) -> dict:
    config, weights = AdapterFactory(shape_facts(llama_config(model)), rank).files(AdapterSpec("cold", rank), 0)
    spec = BaseModelSpec.from_hf_config(dict(SHAPES[model], model_type="llama"))
    result = {"model": model, "rank": rank, "mb": round(len(weights) / 1e6, 1), "ms": {}}
    with tempfile.TemporaryDirectory() as root:
        store = AdapterStore(Path(root), spec, max_rank=max(64, rank), max_bytes=1 << 32)
        names = iter(range(repeats))
        body = memoryview(bytearray(weights))  # as an upload hands it over: a view of the request body
        result["ms"]["put"] = _timed(lambda: store.put(f"cold{next(names)}", config, body), repeats)
        record = store.get("cold0")
        if torch.cuda.is_available():  # the tier's way: the file read straight into pinned pages
            result["ms"]["load_pages"] = _timed(
                lambda: store.load_weights(record, PageAllocator(), PAGE_BYTES), repeats)
            # The server's conditions: pages taken from PyTorch's pinned cache after the tier's warm-up,
            # and the read beside a thread that holds the GIL (an engine thread busy stepping).
            warm_up(len(weights) * 4)
            num_pages = -(-len(weights) // PAGE_BYTES)
            result["ms"]["alloc_pages_after_warm_up"] = _timed(
                lambda: [PageAllocator()(PAGE_BYTES) for _ in range(num_pages)], repeats)
            pool = PagePool()  # the tier's own pages (what the server does now)
            pool.reserve(len(weights) * 2)

            def pool_alloc():
                pages = PageAllocator(pool=pool)
                for _ in range(num_pages):
                    pages(PAGE_BYTES)
                pages.release()

            def pool_load():
                pages = PageAllocator(pool=pool)
                store.load_weights(record, pages, PAGE_BYTES)  # the weights are dropped at once
                pages.release()

            result["ms"]["alloc_pages_pool"] = _timed(pool_alloc, repeats)
            result["ms"]["load_pages_pool"] = _timed(pool_load, repeats)
            with _busy_gil(), _switch_interval(Settings.model_fields["gil_switch_interval_ms"].default / 1e3):
                result["ms"]["load_pages_gil_busy"] = _timed(
                    lambda: store.load_weights(record, PageAllocator(), PAGE_BYTES), repeats)
                marks = {}
                store.load_weights(record, PageAllocator(), PAGE_BYTES, marks)
                result["load_pages_gil_busy_stages_ms"] = {stage: round(s * 1e3, 2) for stage, s in marks.items()}
        result["ms"]["load_weights"] = _timed(lambda: store.load_weights(record), repeats)
        loaded = store.load_weights(record)
        marks: dict[str, float] = {}  # where a paged read's time goes: its stages' end times
        store.load_weights(record, PageAllocator(lambda n: torch.empty(n, dtype=torch.uint8)), PAGE_BYTES, marks)
        result["load_pages_stages_ms"] = {stage: round(s * 1e3, 2) for stage, s in marks.items()}
    # The digests alone: one 8 MiB chunk on one thread, and the whole file's chunks on the pool.
    chunk = body[: digests.CHUNK_BYTES]
    result["ms"]["sha256_one_chunk"] = _timed(lambda: digests.sha256_of([chunk]), repeats)
    result["ms"]["sha256_chunks_parallel"] = _timed(lambda: digests.results(digests.submit_chunks(body)), repeats)
    tensors = [t for pair in loaded.tensors.values() for t in pair]
    result["tensors"] = len(tensors)
    result["dtype"] = str(tensors[0].dtype).removeprefix("torch.")
    if torch.cuda.is_available():
        # First: the tier's way (server.pinned_pages), its first figure a fresh process's.
        result["ms"]["pin_pages"] = _timed(lambda: pin_packed(loaded.tensors), repeats)
        kept = []  # held, so that each repeat allocates anew, as a CPU tier filling up does
        result["ms"]["pin_per_tensor"] = _timed(lambda: kept.append([t.pin_memory() for t in tensors]), repeats)
        result["ms"]["pin_one_buffer"] = _timed(lambda: _pin_one_buffer(tensors), repeats)
        pinned = kept[0]
        result["ms"]["h2d_pinned"] = _timed(lambda: _h2d(pinned), repeats)
        paged = [t for pair in pin_packed(loaded.tensors)[0].values() for t in pair]
        result["ms"]["h2d_pages"] = _timed(lambda: _h2d(paged), repeats)
        result["ms"]["h2d_pageable"] = _timed(lambda: _h2d(tensors), repeats)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cold_load", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="8b", choices=sorted(SHAPES))
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--out", type=Path, default=None, help="also write <out>/<date>-cold-load-<model>.json")
    args = p.parse_args(argv)
    result = stages(args.model, args.rank, args.repeats)
    print(f"{args.model} rank {args.rank}: {result['mb']} MB in {result['tensors']} tensors of {result['dtype']}")
    for stage, times in result["ms"].items():
        print(f"  {stage} ms: " + ", ".join(f"{t:.1f}" for t in times))
    for key in ("load_pages_stages_ms", "load_pages_gil_busy_stages_ms"):
        if key in result:
            print(f"  {key}: " + ", ".join(f"{k} {v}" for k, v in result[key].items()))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        result.update(benchmark="cold_load", date=time.strftime("%Y-%m-%d"), device=device)
        (args.out / f"{result['date']}-cold-load-{args.model}.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
