"""loraplex on Ray Serve: N replicas of the single server behind one ingress that routes by adapter.

    pip install "ray[serve]==2.60.0"
    python -m deploy.ray.app --replicas 3 -- --model /models/base --adapters-dir /shared/adapters

Each `Engine` replica runs the unchanged loraplex app (create_app) on a loopback port inside its actor and
forwards requests to it, so every route, error shape and limit is the single server's. The `Ingress` reads the
adapter a request names (`model` of the OpenAI routes, `parameters.adapter_id` of the TGI ones) and calls the
engines with it as Serve's multiplexed model id: Serve sends requests for one id to the replicas that report
it loaded (`@serve.multiplexed`, at most `max_slots` ids per replica, as many as it has GPU slots).

Adapters live in one store that every replica opens (`adapters_dir` on a shared volume); uploads and deletes go
through whichever replica Serve picks and are visible to all at once, because each request resolves the
adapter's latest version on disk. See README.md beside this file for what is and is not covered.
"""

import argparse
import asyncio
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import RayError

log = logging.getLogger("loraplex.ray")
ROUTE_PREFIX = "/"
_HOP_BY_HOP = {"content-length", "transfer-encoding", "connection", "keep-alive", "host"}
_STREAM_PATHS = ("/generate_stream",)
_START_TIMEOUT_S = 600.0
# Serve keeps this many adapter ids per replica for routing; it should equal the engines' GPU slots, and the
# decorator needs it when this module is imported, so it comes from the same variable the server reads.
MAX_ADAPTERS_PER_REPLICA = int(os.environ.get("LORAPLEX_MAX_SLOTS", "8"))
REPLICA_HEADER = "x-loraplex-replica"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _forwarded_headers(headers) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in _HOP_BY_HOP}


@serve.deployment(ray_actor_options={"num_cpus": 1})
class Engine:
    """One loraplex server (model, engine, API) in this actor, reached over loopback HTTP."""

    def __init__(self, settings: dict):
        import uvicorn

        from server.app import create_app
        from server.config import Settings

        self.settings = Settings(**settings)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = create_app(self.settings)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        threading.Thread(target=self.server.run, daemon=True).start()
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        else:
            raise TimeoutError(f"loraplex replica not ready after {_START_TIMEOUT_S} s")
        self.client = httpx.AsyncClient(base_url=self.url, timeout=self.settings.request_timeout_s + 30)
        self.replica_id = serve.get_replica_context().replica_tag

    @serve.multiplexed(max_num_models_per_replica=MAX_ADAPTERS_PER_REPLICA)
    async def use_adapter(self, adapter: str) -> str:
        """Serve's record of the adapters this replica serves; the engine itself loads them on first use (into
        a GPU slot, LRU), so "loading" here costs nothing and an evicted id only moves future traffic."""
        return adapter

    async def _note_adapter(self) -> None:
        adapter = serve.get_multiplexed_model_id()
        if adapter:
            await self.use_adapter(adapter)

    async def forward(self, method: str, path: str, headers: dict, body: bytes) -> tuple[int, dict, bytes]:
        """One request to the local server; returns status, headers and body."""
        await self._note_adapter()
        response = await self.client.request(method, path, headers=headers, content=body)
        out_headers = {**_forwarded_headers(response.headers), REPLICA_HEADER: self.replica_id}
        return response.status_code, out_headers, response.content

    async def forward_stream(self, method: str, path: str, headers: dict, body: bytes) -> AsyncIterator[bytes]:
        """A streaming request: the first item is status and headers as JSON, then the body's chunks."""
        await self._note_adapter()
        async with self.client.stream(method, path, headers=headers, content=body) as response:
            out_headers = {**_forwarded_headers(response.headers), REPLICA_HEADER: self.replica_id}
            yield json.dumps([response.status_code, out_headers]).encode()
            async for chunk in response.aiter_raw():
                yield chunk


def adapter_of(path: str, body: bytes, base_model: str) -> tuple[str, bool]:
    """The adapter a request names ('' for the base model or a request that names none) and whether it streams."""
    if not body or not path.startswith(("/v1/completions", "/v1/chat/completions", "/generate")):
        return "", False
    try:
        payload = json.loads(body)
    except ValueError:
        return "", False  # the replica answers with the single server's 4xx
    if not isinstance(payload, dict):
        return "", False
    if path.startswith("/generate"):
        parameters = payload.get("parameters")
        adapter = parameters.get("adapter_id") if isinstance(parameters, dict) else None
        is_stream = path.startswith(_STREAM_PATHS)
    else:
        adapter, is_stream = payload.get("model"), payload.get("stream") is True
    if not isinstance(adapter, str) or adapter == base_model:
        adapter = ""
    return adapter, is_stream


# No docs routes of its own: /docs and /openapi.json go to a replica, as every other path.
ingress_app = FastAPI(title="loraplex on Ray Serve", docs_url=None, redoc_url=None, openapi_url=None)


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(ingress_app)
class Ingress:
    """Every route of the single server, routed to an Engine replica by the adapter it names."""

    def __init__(self, engines, base_model: str):
        self.engines = engines
        self.base_model = base_model

    @ingress_app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE"])
    async def route(self, path: str, request: Request) -> Response:
        body = await request.body()
        full_path = "/" + path + (f"?{request.url.query}" if request.url.query else "")
        adapter, is_stream = adapter_of("/" + path, body, self.base_model)
        handle = self.engines.options(multiplexed_model_id=adapter) if adapter else self.engines
        headers = _forwarded_headers(request.headers)
        try:
            if not is_stream:
                status, out_headers, content = await handle.forward.remote(request.method, full_path, headers, body)
                return Response(content, status_code=status, headers=out_headers)
            chunks = handle.options(stream=True).forward_stream.remote(request.method, full_path, headers, body)
            status, out_headers = json.loads(await chunks.__anext__())
        except RayError as exc:
            # The replica died with the request on it (node lost, killed, OOM): the single server's error shape.
            log.warning("replica failed a %s %s request: %s", request.method, path, type(exc).__name__)
            return JSONResponse({"error": {"message": "the replica serving this request stopped; retry it",
                                           "type": "ServiceUnavailableError", "code": 503}},
                                status_code=503, headers={"Retry-After": "1"})
        return StreamingResponse(chunks, status_code=status, headers=out_headers)


def build(settings: dict, num_replicas: int):
    """The Serve application: `num_replicas` engines behind the ingress."""
    from server.config import Settings

    base_model = Settings(**settings).served_model_name or os.path.basename(str(settings.get("model", "")))
    engines = Engine.options(num_replicas=num_replicas).bind(settings)
    return Ingress.bind(engines, base_model)


def app_builder(args: dict):
    """Serve config entry point (`import_path: deploy.ray.app:app_builder`, as rayservice.yaml uses it):
    args `replicas` and `settings` (loraplex Settings fields)."""
    return build(dict(args.get("settings", {})), int(args.get("replicas", 2)))


def main(argv: list[str] | None = None) -> None:
    import ray

    from server.config import parse_settings

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args, server_args = parser.parse_known_args(argv)
    parsed = parse_settings([a for a in server_args if a != "--"])
    if parsed.auth_file is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        # The replicas bind loopback, so the single server's own rule (open mode only on loopback) is kept here.
        parser.error(f"--host {args.host} without an auth file would open every adapter to the network: "
                     "set LORAPLEX_AUTH_FILE or --auth-file")
    settings = parsed.model_dump(mode="json", exclude_unset=True)
    python_path = os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH", "")) if p)
    ray.init(runtime_env={"env_vars": {"PYTHONPATH": python_path}})  # the workers import deploy.ray.app
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build(settings, args.replicas), route_prefix=ROUTE_PREFIX)
    print(f"loraplex on Ray Serve: {args.replicas} replicas at http://{args.host}:{args.port}", flush=True)
    try:
        asyncio.run(asyncio.Event().wait())
    except KeyboardInterrupt:
        serve.shutdown()
        sys.exit(0)


if __name__ == "__main__":
    main()
