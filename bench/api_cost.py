"""The API app's own CPU time per request and per streamed token, in-process (CPU only, no network):

    python -m bench.api_cost [--requests 2000] [--tokens 1 64] [--profile]

Drives the real app (middleware, FastAPI routing and validation, the OpenAI handler, Generation, the SSE
response) through direct ASGI calls of streaming /v1/completions with a 128-token prompt, the engine
replaced by one that has every output ready at once: what is left is the Python of our stack. The cost of
a request is the time at one output token; the cost of a token is the slope between the two counts.
What the server spends beyond these (the event loop waking each stream's task per step, uvicorn's parse
and socket writes, the engine client's receiver thread) shows in bench.http_capacity's
`api_cpu_us_per_token`. `--profile` prints cProfile's top functions of the last count.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import tempfile
import time
from pathlib import Path

PROMPT_TOKENS = 128
WARMUP = 200


class _ReadyEngine:
    """The real engine client's attributes, with a generate whose outputs are all ready at once."""

    def __init__(self, real, num_tokens: int):
        self._real, self.num_tokens = real, num_tokens

    def __getattr__(self, name):
        return getattr(self._real, name)

    async def generate(self, request):
        from server.engine.request import FinishReason, RequestOutput

        for count in range(1, self.num_tokens + 1):
            last = count == self.num_tokens
            yield RequestOutput(request.request_id, [300], "x", None, finished=last,
                                finish_reason=FinishReason.LENGTH if last else None,
                                prompt_tokens=len(request.prompt_token_ids), completion_tokens=count)


def _scope(app, body: bytes) -> dict:
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "method": "POST",
            "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"", "root_path": "",
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            "scheme": "http", "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 40000),
            "http_version": "1.1", "app": app, "state": {}}


async def _one(app, body: bytes) -> int:
    """One request; the number of ASGI messages it sent."""
    delivered, messages = False, 0

    async def receive():
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)  # the client never leaves; the response's watch is cancelled at its end

    async def send(message):
        nonlocal messages
        messages += 1

    await app(_scope(app, body), receive, send)
    return messages


async def _measure(app, model: str, counts: list[int], requests: int, profile: bool) -> dict:
    state = app.state.server
    real = state.engine
    per_count = {}
    for num_tokens in counts:
        state.engine = _ReadyEngine(real, num_tokens)
        body = json.dumps({"model": model, "prompt": list(range(5, 5 + PROMPT_TOKENS)), "max_tokens": num_tokens,
                           "stream": True, "ignore_eos": True,
                           "stream_options": {"include_usage": True}}).encode()
        for _ in range(WARMUP):
            await _one(app, body)
        profiler = cProfile.Profile() if profile and num_tokens == counts[-1] else None
        if profiler is not None:
            profiler.enable()
        start = time.perf_counter()
        for _ in range(requests):
            messages = await _one(app, body)
        per_count[num_tokens] = (time.perf_counter() - start) / requests
        if profiler is not None:
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
        expected = num_tokens + 4  # start, a chunk a token, the usage chunk, [DONE], the end
        if messages != expected:
            raise RuntimeError(f"{messages} ASGI messages for {num_tokens} tokens, expected {expected}")
    state.engine = real
    low, high = min(counts), max(counts)
    token_us = (per_count[high] - per_count[low]) / (high - low) * 1e6 if high > low else None
    return {"request_us": {str(n): s * 1e6 for n, s in per_count.items()},
            "per_token_us": token_us,
            "per_request_us": per_count[low] * 1e6 - (token_us or 0.0) * low}


def main(argv: list[str] | None = None) -> int:
    import torch
    import uvloop

    from bench.serve.modeldir import build_model_dir
    from server.app import create_app
    from server.config import Settings
    from server.model.loader import load_hf_dir

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache/bench-serve"))
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)
    model_dir, _ = build_model_dir("tiny", args.cache_dir, "cpu")
    settings = Settings(model=str(model_dir), served_model_name="bench-base", device="cpu", quantization="none",
                        dtype="float32", cuda_graphs=False, adapters_dir=Path(tempfile.mkdtemp()),
                        log_level="warning")
    loaded = load_hf_dir(model_dir, device=torch.device("cpu"), dtype=torch.float32, quantize=False)
    app = create_app(settings, loaded=loaded)

    async def run() -> dict:
        async with app.router.lifespan_context(app):
            while not app.state.server.is_ready:
                await asyncio.sleep(0.05)
            return await _measure(app, "bench-base", sorted(args.tokens), args.requests, args.profile)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:  # uvloop, as the server; no global policy
        result = runner.run(run())
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
