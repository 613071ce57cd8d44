"""Drive the server over HTTP: uploads, closed-loop streaming completions, and latency probes.

A load keeps `concurrency` streams busy until `num_requests` have been sent (a closed loop, as
vLLM's and SGLang's serving benchmarks do with a fixed concurrency). Each request sends its prompt
as token ids (so its length is exact) with `ignore_eos`, so every request generates exactly
`output_len` tokens; the usage chunk (`stream_options.include_usage`) gives the count the server
reports, and the result says whether it matched.

Timing: TTFT = request sent -> first chunk with a choice; ITL = gaps between successive chunks with
a choice (one chunk per engine step; tokens per chunk is reported beside it); E2E = request sent ->
`[DONE]`. Output tok/s = completion tokens of successful requests / wall time of the load.
"""

from __future__ import annotations

import asyncio
import json
import random
import resource
import time
from collections import Counter
from dataclasses import dataclass

import aiohttp
import httpx

from server import hop_trace

BASE_MODEL = ""  # an empty adapter name means the base model


@dataclass(frozen=True)
class Traffic:
    """What one load sends."""

    adapters: tuple[str, ...]  # names to choose from; empty = the base model
    distribution: str = "uniform"  # uniform | zipf | cycle (request i uses adapter i mod n)
    zipf_s: float = 1.0
    concurrency: int = 32
    num_requests: int = 256
    prompt_len: int = 128
    output_len: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    max_seconds: float = 300.0  # stop sending new requests after this long
    api_key: str | None = None  # Bearer key (a tenant of the auth file); None in open mode

    def choices(self, count: int, seed: int | None = None) -> list[str]:
        """The adapter of each of `count` requests (Zipf ranks follow the order of `adapters`)."""
        if not self.adapters:
            return [BASE_MODEL] * count
        rng = random.Random(self.seed if seed is None else seed)
        if self.distribution == "cycle":
            return [self.adapters[i % len(self.adapters)] for i in range(count)]
        if self.distribution == "uniform":
            return [rng.choice(self.adapters) for _ in range(count)]
        if self.distribution == "zipf":
            weights = [1.0 / (rank + 1) ** self.zipf_s for rank in range(len(self.adapters))]
            return rng.choices(self.adapters, weights=weights, k=count)
        raise ValueError(f"unknown distribution {self.distribution!r}")

    def prompt(self, index: int, token_range: tuple[int, int], seed: int | None = None) -> list[int]:
        """The prompt of request `index`: `prompt_len` random ordinary token ids (made on demand, so a
        background load of a million requests costs nothing up front)."""
        rng = random.Random(((self.seed if seed is None else seed) + 1) * 1_000_003 + index)
        low, high = token_range
        return [rng.randrange(low, high) for _ in range(self.prompt_len)]

    def prompts(self, count: int, token_range: tuple[int, int], seed: int | None = None) -> list[list[int]]:
        return [self.prompt(index, token_range, seed) for index in range(count)]


@dataclass
class RequestResult:
    """What the client saw of one request."""

    adapter: str
    status: int | str  # HTTP status, or an exception / "stream_error" name
    sent: float  # perf_counter at send
    first: float | None = None
    done: float | None = None
    chunk_times: list[float] | None = None
    completion_tokens: int | None = None
    error: str | None = None  # the head of an error body or event: what a failed load says why


def event_loop_name() -> str:
    """The event loop the client runs on: uvloop when installed, else asyncio."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def run_async(coro):
    """Run `coro` on uvloop when it is installed (a lighter client under many streams), else asyncio."""
    if event_loop_name() == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coro)
    return asyncio.run(coro)


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in [0, 100]) of `values`; None when empty."""
    if not values:
        return None
    data = sorted(values)
    pos = (len(data) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (pos - low)


def _ms_stats(prefix: str, seconds: list[float]) -> dict:
    ms = [s * 1e3 for s in seconds]
    return {f"{prefix}_ms_p50": percentile(ms, 50), f"{prefix}_ms_p99": percentile(ms, 99),
            f"{prefix}_ms_mean": sum(ms) / len(ms) if ms else None}


def make_client(url: str, concurrency: int, api_key: str | None = None) -> httpx.AsyncClient:
    """An httpx client (uploads) with a connection per stream and a long read timeout."""
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.AsyncClient(base_url=url, limits=limits, headers=headers,
                             timeout=httpx.Timeout(900.0, connect=30.0))


CLIENT_LIBRARY = f"aiohttp {aiohttp.__version__}"  # the streams' client, in each result's config


def make_session(url: str, concurrency: int, api_key: str | None = None) -> aiohttp.ClientSession:
    """The streams' client: aiohttp (its HTTP parser and line reader are C), a keep-alive connection per
    stream. httpx (pure-Python h11 underneath) spent ~140 us of CPU a streamed token in the H200 runs'
    four client processes, more than the server's API processes, and its latency was the turnaround's."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    # idle connections closed before uvicorn's 5 s keep-alive ends them: a POST on one it just closed would fail
    connector = aiohttp.TCPConnector(limit=concurrency + 8, keepalive_timeout=4.0)
    return aiohttp.ClientSession(base_url=url, headers=headers, connector=connector,
                                 timeout=aiohttp.ClientTimeout(total=None, sock_connect=30.0, sock_read=900.0))


async def stream_completion(session: aiohttp.ClientSession, model: str, prompt: list[int], max_tokens: int,
                            temperature: float, top_p: float, seed: int | None = None) -> RequestResult:
    """One streaming /v1/completions request, timed chunk by chunk. Chunks are classified by cheap
    substring tests; only the usage chunk and errors are parsed, so the client stays light."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature,
            "top_p": top_p, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    if seed is not None:
        body["seed"] = seed
    result = RequestResult(adapter=model, status=0, sent=time.perf_counter(), chunk_times=[])
    try:
        async with session.post("/v1/completions", json=body) as response:
            result.status = response.status
            headers_at = time.perf_counter()
            if response.status != 200:
                result.error = (await response.read())[:300].decode(errors="replace")
                result.done = time.perf_counter()
                return result
            # read to the body's end (the chunked terminator after [DONE]): the connection then goes back to
            # the pool for the stream's next request instead of being closed
            async for raw in response.content:
                if not raw.startswith(b"data: "):
                    continue
                now = time.perf_counter()
                if raw.startswith(b"data: [DONE]"):
                    result.done = now
                    continue
                if b'"choices":[{' in raw:
                    result.chunk_times.append(now)
                    if result.first is None:
                        result.first = now
                        if hop_trace.TRACE.enabled:  # perf_counter and monotonic read one clock on Linux
                            _mark_client_hops(response.headers.get("x-request-id", ""), result.sent, headers_at, now)
                elif b'"error"' in raw:
                    result.status = "stream_error"
                    result.error = raw[6:306].decode(errors="replace")
                if b'"usage":{' in raw:
                    result.completion_tokens = json.loads(raw[6:])["usage"]["completion_tokens"]
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as err:  # ValueError: a bad line or usage JSON
        result.status = type(err).__name__
        result.error = str(err)[:300]
    if result.done is None and result.status == 200:
        result.status = "incomplete_stream"
    return result


def _mark_client_hops(request_id: str, sent: float, headers_at: float, first: float) -> None:
    for hop, at in (("client_sent", sent), ("client_headers", headers_at), ("client_first", first)):
        hop_trace.TRACE.mark(request_id, hop, at)


async def drive(url: str, traffic: Traffic, indices: list[int], token_range: tuple[int, int], model_for_base: str,
                stop: asyncio.Event | None = None) -> tuple[list[RequestResult], float]:
    """Send the requests `indices` of `traffic` over `traffic.concurrency` streams (a closed loop); returns
    their results and the CPU seconds this process spent. A set `stop` ends it early (no new requests;
    those in flight finish)."""
    adapters = traffic.choices(traffic.num_requests)
    results: list[RequestResult] = []
    pending = iter(indices)
    async with make_session(url, traffic.concurrency, traffic.api_key) as session:
        deadline = time.perf_counter() + traffic.max_seconds
        cpu_start = resource.getrusage(resource.RUSAGE_SELF)

        async def worker() -> None:
            while time.perf_counter() < deadline and not (stop is not None and stop.is_set()):
                index = next(pending, None)
                if index is None:
                    return
                seed = traffic.seed * 100_003 + index if traffic.temperature > 0 else None
                results.append(await stream_completion(
                    session, adapters[index] or model_for_base, traffic.prompt(index, token_range), traffic.output_len,
                    traffic.temperature, traffic.top_p, seed))

        await asyncio.gather(*(worker() for _ in range(traffic.concurrency)))
        cpu_end = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = cpu_end.ru_utime + cpu_end.ru_stime - cpu_start.ru_utime - cpu_start.ru_stime
    return results, cpu_s


async def run_load(url: str, traffic: Traffic, token_range: tuple[int, int], model_for_base: str,
                   stop: asyncio.Event | None = None) -> dict:
    """Closed-loop load from this process; returns throughput, latency percentiles and errors by status.
    A set `stop` ends it early. bench.serve.client_procs splits a load over processes."""
    start = time.perf_counter()
    results, cpu_s = await drive(url, traffic, list(range(traffic.num_requests)), token_range, model_for_base, stop)
    return summarize(results, time.perf_counter() - start, traffic, cpu_s)


async def run_with_background(url: str, foreground: Traffic, background: Traffic, token_range: tuple[int, int],
                              model_for_base: str, head_start_s: float = 2.0) -> dict:
    """`background` runs from `head_start_s` before `foreground` until it ends: the two-tenant run."""
    stop = asyncio.Event()
    behind = asyncio.ensure_future(run_load(url, background, token_range, model_for_base, stop))
    await asyncio.sleep(head_start_s)
    front = await run_load(url, foreground, token_range, model_for_base)
    stop.set()
    return {**front, "background": await behind}


def summarize(results: list[RequestResult], wall: float, traffic: Traffic, client_cpu_s: float,
              client_procs: int = 1) -> dict:
    """Throughput, latency percentiles and errors of one load's requests, and what the client spent."""
    ok = [r for r in results if r.status == 200]
    tokens = sum(r.completion_tokens or 0 for r in ok)
    chunks = sum(len(r.chunk_times or []) for r in ok)
    itl = [b - a for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:], strict=False)]
    exact = sum(1 for r in ok if r.completion_tokens == traffic.output_len)
    return {
        "traffic": {k: v for k, v in traffic.__dict__.items() if k not in ("adapters", "api_key")} | {
            "num_adapters": len(traffic.adapters)},
        "requests_sent": len(results), "requests_ok": len(ok), "wall_s": wall,
        "output_tokens": tokens, "tokens_per_s": tokens / wall if wall > 0 else None,
        "requests_per_s": len(ok) / wall if wall > 0 else None,
        "tokens_per_chunk": tokens / chunks if chunks else None,
        "requests_with_exact_output_len": exact,
        **_ms_stats("ttft", [r.first - r.sent for r in ok if r.first is not None]),
        **_ms_stats("itl", itl),
        **_ms_stats("e2e", [r.done - r.sent for r in ok if r.done is not None]),
        "errors_by_status": dict(Counter(str(r.status) for r in results if r.status != 200)),
        "first_error": {str(r.status): r.error for r in reversed(results) if r.status != 200},
        "client_cpu_s": round(client_cpu_s, 2), "client_procs": client_procs,
        "distinct_adapters": len({r.adapter for r in results}),
    }


async def upload(client: httpx.AsyncClient, name: str, config: bytes, weights: bytes) -> tuple[int, float, str]:
    """PUT /v1/adapters/{name} (multipart); returns (status, seconds, body head)."""
    files = {"adapter_config.json": ("adapter_config.json", config),
             "adapter_model.safetensors": ("adapter_model.safetensors", weights)}
    start = time.perf_counter()
    response = await client.put(f"/v1/adapters/{name}", files=files)
    return response.status_code, time.perf_counter() - start, response.text[:300]


async def upload_all(url: str, files, api_key: str | None = None) -> dict:
    """Upload every (spec, config, weights) of `files` one after another; timing and errors."""
    seconds, errors, first_error, total = [], Counter(), {}, 0
    async with make_client(url, 1, api_key) as client:
        start = time.perf_counter()
        for spec, config, weights in files:
            status, took, text = await upload(client, spec.name, config, weights)
            if status == 201:
                seconds.append(took)
                total += len(weights)
            else:
                errors[str(status)] += 1
                first_error.setdefault(str(status), text)
        wall = time.perf_counter() - start
    return {"count": len(seconds), "bytes": total, "wall_s": wall, **_ms_stats("upload", seconds),
            "errors_by_status": dict(errors), "first_error": first_error}


async def upload_to_usable(url: str, files, token_range: tuple[int, int], prompt_len: int,
                           api_key: str | None = None) -> dict:
    """For each adapter: upload it, then send a request naming it; seconds from the upload's start to
    that request's first token (and the upload alone)."""
    usable, uploads, errors = [], [], Counter()
    traffic = Traffic(adapters=(), prompt_len=prompt_len)
    async with make_client(url, 1, api_key) as client, make_session(url, 1, api_key) as session:
        for index, (spec, config, weights) in enumerate(files):
            start = time.perf_counter()
            status, took, _ = await upload(client, spec.name, config, weights)
            if status != 201:
                errors[f"upload_{status}"] += 1
                continue
            prompt = traffic.prompts(1, token_range, seed=10_000 + index)[0]
            result = await stream_completion(session, spec.name, prompt, 4, 0.0, 1.0)
            if result.status != 200 or result.first is None:
                errors[f"request_{result.status}"] += 1
                continue
            uploads.append(took)
            usable.append(result.first - start)
    return {"count": len(usable), "adapter_bytes": [len(w) for _, _, w in files][:1],
            **_ms_stats("upload", uploads), **_ms_stats("upload_to_first_token", usable),
            "errors_by_status": dict(errors)}


async def sequential_ttft(url: str, names: list[str], token_range: tuple[int, int], prompt_len: int,
                          output_len: int = 4, api_key: str | None = None, seed: int = 20_000) -> dict:
    """One request at a time, each naming the next adapter: TTFT of each (cold or warm, by setup). The
    prompts follow `seed`: a probe that must not hit the prefix cache of an earlier one takes its own."""
    traffic = Traffic(adapters=(), prompt_len=prompt_len)
    prompts = [traffic.prompts(1, token_range, seed=seed + index)[0] for index in range(len(names))]
    return await sequential_ttft_prompts(url, list(zip(names, prompts, strict=True)), output_len, api_key)


async def sequential_ttft_prompts(url: str, requests: list[tuple[str, list[int]]], output_len: int = 4,
                                  api_key: str | None = None) -> dict:
    """One (model, prompt token ids) request at a time: the TTFT of each."""
    ttfts, errors = [], Counter()
    async with make_session(url, 1, api_key) as session:
        for name, prompt in requests:
            result = await stream_completion(session, name, prompt, output_len, 0.0, 1.0)
            if result.status != 200 or result.first is None:
                errors[str(result.status)] += 1
                continue
            ttfts.append(result.first - result.sent)
    return {"count": len(ttfts), **_ms_stats("ttft", ttfts), "ttft_ms_all": [t * 1e3 for t in ttfts],
            "errors_by_status": dict(errors)}
