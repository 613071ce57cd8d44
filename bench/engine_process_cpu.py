"""`python -m bench.engine_process_cpu`: the HTTP server with the engine in a thread vs in its own process.

Starts the real app (uvicorn on 127.0.0.1) once per mode on the same model, drives `--concurrency`
streaming completions (greedy, `--max-tokens` new tokens, EOS ignored) `--rounds` times, and prints
output tok/s and the p50 gap between streamed chunks. On the CPU this measures the cost of the
process boundary (IPC, detokenizing in the API process), not the GPU speed-up it is for.

Measured 2026-12-01 on the shared 2-core CPU machine (load average about 2; under a load of 6-10
from other jobs either mode can be 10x slower in one run, so repeat runs):
- `--model <tiny random Llama dir> --quantization none --concurrency 8 --rounds 3 --max-tokens 64`
  (host-bound): thread 2,468 / 2,741 tok/s, process 3,646 / 3,231 tok/s (two runs).
- embedded SmolLM2-135M NF4, 8 streams x 32 tokens, modes interleaved t p t p: thread 101 / 103 tok/s,
  process 118 / 114 tok/s; chunk gap p50 73 / 70 ms vs 62 / 65 ms.
GPU runs: `python -m bench.serve ... --server-arg=--engine-process` against the same without it.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import threading
import time

import httpx
import uvicorn

from server.app import create_app
from server.config import Settings


async def _stream(http: httpx.AsyncClient, model: str, max_tokens: int, gaps: list[float]) -> int:
    body = {"model": model, "prompt": "The capital of France is", "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}
    num_chunks, last = 0, None
    async with http.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                now = time.perf_counter()
                if last is not None:
                    gaps.append(now - last)
                last, num_chunks = now, num_chunks + 1
    return num_chunks


async def _drive(url: str, model: str, concurrency: int, rounds: int, max_tokens: int) -> tuple[float, float]:
    gaps: list[float] = []
    async with httpx.AsyncClient(base_url=url, timeout=600,
                                 limits=httpx.Limits(max_connections=concurrency + 4)) as http:
        await _stream(http, model, 4, [])  # warm-up
        start = time.perf_counter()
        for _ in range(rounds):
            await asyncio.gather(*(_stream(http, model, max_tokens, gaps) for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    return concurrency * rounds * max_tokens / seconds, statistics.median(gaps)


def measure(settings: Settings, concurrency: int, rounds: int, max_tokens: int) -> tuple[float, float]:
    app = create_app(settings)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        while httpx.get(f"{url}/ready", timeout=5).status_code != 200:
            time.sleep(0.1)
        return asyncio.run(_drive(url, app.state.server.model_id, concurrency, rounds, max_tokens))
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded", help="'embedded' or an HF model dir")
    parser.add_argument("--quantization", default="nf4", choices=["nf4", "none"])
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    for engine_process in (False, True):
        settings = Settings(model=args.model, device="cpu", quantization=args.quantization, cuda_graphs=False,
                            max_model_len=512, kv_cache_blocks=1024, engine_process=engine_process,
                            log_level="warning")
        tok_s, gap = measure(settings, args.concurrency, args.rounds, args.max_tokens)
        mode = "process" if engine_process else "thread"
        print(f"engine in a {mode:7s}: {tok_s:7.1f} tok/s out, chunk gap p50 {gap * 1e3:.1f} ms "
              f"({args.concurrency} streams x {args.rounds} rounds x {args.max_tokens} tokens)", flush=True)


if __name__ == "__main__":
    main()
