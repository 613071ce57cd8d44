"""One closed-loop load driven from several client processes, so that the client is not what is measured.

One Python process running httpx on uvloop spends about 0.12 ms of CPU per streamed chunk (the H200 c32
runs: `client_cpu_s` 2.0 for 16,384 chunks in a 2.6 s load). At 32 streams and a 3 ms decode step that is
~4 ms of client work for every step's 32 chunks: the client falls behind in bursts, and its delay shows up
as TTFT and ITL (client TTFT p50 95 ms against the server's own 29 ms mean). vLLM's and SGLang's serving
benchmarks have the same single-process client; splitting the streams over processes is how a 16-core
bench host keeps up with the server.

Each process takes every `procs`-th request index and an equal share of the streams, imports and
connects first, then starts at one common moment (CLOCK_MONOTONIC, which `time.perf_counter` reads, is
system-wide on Linux, so the processes' timestamps compare). The parent merges the requests and computes
the summary over the whole load: wall = last process's end - the common start.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from dataclasses import replace

from bench.serve.load import RequestResult, Traffic, drive, run_async, summarize

START_MARGIN_S = 0.05  # the common start is this far after every process said it was ready


def default_procs(concurrency: int) -> int:
    """Client processes for a load of `concurrency` streams: one per 8 streams, at most a quarter of the
    cores (the server and its engine process need the rest); 1 on a small machine."""
    return max(1, min(concurrency // 8, (os.cpu_count() or 1) // 4))


def shares(traffic: Traffic, procs: int) -> list[tuple[int, list[int]]]:
    """(streams, request indices) of each process: indices p, p + procs, ...; streams split evenly."""
    procs = max(1, min(procs, traffic.concurrency, traffic.num_requests))
    indices = list(range(traffic.num_requests))
    base, extra = divmod(traffic.concurrency, procs)
    return [(base + (p < extra), indices[p::procs]) for p in range(procs)]


def _child(conn, url: str, traffic: Traffic, indices: list[int], token_range, model_for_base: str) -> None:
    conn.send("ready")
    start_at = conn.recv()
    time.sleep(max(0.0, start_at - time.perf_counter()))
    results, cpu_s = run_async(drive(url, traffic, indices, token_range, model_for_base))
    conn.send((results, cpu_s, time.perf_counter()))
    conn.close()


def run_split(url: str, traffic: Traffic, token_range: tuple[int, int], model_for_base: str, procs: int) -> dict:
    """`run_load`'s summary for `traffic`, the requests sent from `procs` processes (1: this one)."""
    parts = shares(traffic, procs)
    if len(parts) == 1:
        start = time.perf_counter()
        results, cpu_s = run_async(drive(url, traffic, parts[0][1], token_range, model_for_base))
        return summarize(results, time.perf_counter() - start, traffic, cpu_s)
    context = multiprocessing.get_context("spawn")  # never fork a parent that may hold a CUDA context
    children = []
    for streams, indices in parts:
        parent_end, child_end = context.Pipe()
        process = context.Process(target=_child, daemon=True, args=(
            child_end, url, replace(traffic, concurrency=streams), indices, token_range, model_for_base))
        process.start()
        children.append((process, parent_end))
    try:
        for _, conn in children:
            if conn.recv() != "ready":
                raise RuntimeError("a client process did not start")
        start_at = time.perf_counter() + START_MARGIN_S
        for _, conn in children:
            conn.send(start_at)
        results: list[RequestResult] = []
        cpu_s, end = 0.0, start_at
        for _, conn in children:
            part, part_cpu, part_end = conn.recv()
            results += part
            cpu_s += part_cpu
            end = max(end, part_end)
    finally:
        for process, conn in children:
            conn.close()
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
    return summarize(results, end - start_at, traffic, cpu_s, len(parts))
