"""How fast the server streams when the model costs a fixed time a step and nothing else (CPU only).

    python -m bench.http_capacity [--step-ms 3] [--concurrency 32] [--requests 256] [--output-len 64]
        [--prompt-len 128] [--prefill-us-per-token 6] [--server-arg=--engine-process] [--out DIR]
        [--heavy-concurrency 20]

`serve_over_engine_1b_c32` (issue 13) needs a GPU to measure, and the session's GPU time is short. This
runs the real server (HTTP, auth, scheduler, sampler, detokenizer, streaming; the engine in a thread or,
with --server-arg=--engine-process, in its own process) on the tiny random model, with the model's
forward replaced by a fake device: `step-ms` for a decode step (the H200's 1B batch-32 step is ~3 ms) plus
`prefill-us-per-token` per prompt token, with the CUDA engine's step shapes (short prefills ride the
decode step, as in its graph replay; longer ones take an eager step of their own). A forward returns
at once and the step's one host sync sleeps until the fake device is done, releasing the GIL as the
real wait on a CUDA event does. The client runs in this process, the server in
its own, as in bench.serve.

Reports output tok/s, TTFT and ITL, the server's own view (HTTP admission, engine queue and TTFT means from
its /metrics), `serve_over_ideal` (tok/s over what the fake model's own time
allows: every stream a token a step, plus each prompt's prefill time) and `itl_p50_over_step`. What
separates the first from 1.0 is the host side of serving, measurable here without a GPU.

`--heavy-concurrency H`: the fairness preset's two tenants instead (bench.serve --preset fairness): the load above is
a light tenant's, run alone and then beside a heavy tenant that keeps H streams busy all along, each with its own key;
reports `fair_light_p99_ratio` (light TTFT p99 beside the heavy tenant over alone), the host side of fairness (the
API's event loop, the engine's admission), with every step costing the same whatever its rows.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from unittest import mock

FAKE_GRAPH_ROWS = 1024  # the default cuda_graph_max_rows
FAKE_TOKEN = 300  # an ordinary merged token of the tiny byte-level BPE vocabulary
ENV_STEP_MS = "LORAPLEX_BENCH_FAKE_STEP_MS"
ENV_PREFILL_US = "LORAPLEX_BENCH_FAKE_PREFILL_US"
SITECUSTOMIZE = f"""import os
if os.environ.get({ENV_STEP_MS!r}):
    from bench.http_capacity import install_fake_model
    install_fake_model(float(os.environ[{ENV_STEP_MS!r}]), float(os.environ.get({ENV_PREFILL_US!r}, "0")))
"""


def install_fake_model(step_ms: float, prefill_us_per_token: float) -> None:
    """Replace ModelRunner's forwards (in this process) by sleeps that return logits favouring FAKE_TOKEN."""
    import torch

    from server.engine import sampler as sampler_module
    from server.engine.runner import ModelRunner

    def logits(runner: ModelRunner, rows: int) -> torch.Tensor:
        out = torch.zeros(rows, runner.model.config.vocab_size, device=runner.device)
        out[:, FAKE_TOKEN] = 1.0
        return out

    def finishing(chunks) -> int:
        return sum(1 for request, n in chunks if request.num_computed_tokens + n == request.prefill_target)

    # The fake's logits and the sampler run on CPU tensors here, where a GPU would run them: one intra-op thread,
    # or torch's OpenMP workers spin after each [rows, vocab] op and take a core of the host (on 2 cores, 4.5 CPU s
    # of a 16 s run in the engine process: serve_over_ideal 0.85 against 0.95 with one thread; the GPU engine's
    # process shows no such thread, bench/results/*-serve-c32-1b-s27-api1.json's server_cpu).
    torch.set_num_threads(1)
    # Like a GPU, the fake runs beside the host: a forward returns at once and the step's one host
    # sync (the sampler's HostCopy.wait) waits until the "device" is done, so host work done between
    # launch and sync overlaps device time, as it does on CUDA.
    device_free_at = 0.0

    def launch(seconds: float) -> None:
        nonlocal device_free_at
        device_free_at = max(device_free_at, time.perf_counter()) + seconds

    class HostCopy:  # the device finishes the work queued before the copy (the step that sampled it)
        def __init__(self, tensor):
            self.tensor, self.due = tensor, device_free_at

        def wait(self):
            time.sleep(max(0.0, self.due - time.perf_counter()))
            return self.tensor.tolist()

    def prefill(self, chunks):
        launch(step_ms / 1e3 + prefill_us_per_token * sum(n for _, n in chunks) / 1e6)
        rows = finishing(chunks)
        return logits(self, rows) if rows else None

    def decode(self, requests, chunks=(), input_ids=None):  # chunks: short prefills riding the "graph" replay
        launch(step_ms / 1e3 + prefill_us_per_token * sum(n for _, n in chunks) / 1e6)
        return logits(self, len(requests) + finishing(chunks))

    sampler_module.HostCopy = HostCopy

    init = ModelRunner.__init__

    def init_with_graphs(self, *args, **kwargs):
        init(self, *args, **kwargs)
        # the CUDA engine's step shapes
        self.graphs = _FakeGraphs(max(self.max_batch_size, FAKE_GRAPH_ROWS), self.max_batch_size)

    ModelRunner.__init__, ModelRunner.prefill, ModelRunner.decode = init_with_graphs, prefill, decode


class _FakeGraphs:
    """What the engine and the scheduler read of DecodeGraphs: the rows one replay takes."""

    def __init__(self, max_rows: int, max_sequences: int):
        self.max_rows = max_rows
        self.max_sequences = max_sequences

    def fits(self, num_sequences: int) -> bool:
        return num_sequences <= self.max_sequences

    def capture_all(self, lora_variants) -> int:
        return 0


@dataclass
class _Config:
    model_dir: Path
    extra_args: list[str] = field(default_factory=list)

    def args(self) -> list[str]:
        return ["--model", str(self.model_dir), "--served-model-name", "bench-base", "--device", "cpu",
                "--quantization", "none", "--max-batch-size", "64", "--max-model-len", "1024",
                "--max-num-batched-tokens", "4096", "--max-queue-size", "4096", "--log-level", "warning",
                *self.extra_args]


def _api_cpu_us_per_token(load: dict) -> float | None:
    """CPU a streamed token of the API process, or of all of them (`--api-server-count`; the launcher too)."""
    apis = [entry for role, entry in load.get("server_cpu", {}).items() if role == "api" or role.startswith("api ")]
    tokens = load.get("output_tokens")
    if not apis or not tokens:
        return None
    return sum(api["main_cpu_s"] + api["other_cpu_s"] for api in apis) / tokens * 1e6


def main(argv: list[str] | None = None) -> int:
    from bench.serve import proc_cpu, scrape
    from bench.serve.__main__ import token_range
    from bench.serve.load import Traffic, run_async, run_load, run_with_background
    from bench.serve.modeldir import build_model_dir
    from bench.serve.phases import write_auth_file
    from bench.serve.process import ServerProcess
    from bench.serve.scenarios import tenant_key

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--step-ms", type=float, default=3.0)
    parser.add_argument("--prefill-us-per-token", type=float, default=6.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--server-arg", action="append", default=[], help="extra `python -m server` flag")
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache/bench-serve"))
    parser.add_argument("--out", type=Path, default=None, help="write the result JSON here")
    parser.add_argument("--heavy-concurrency", type=int, default=0,
                        help="two tenants: the load is a light tenant's, alone then beside a heavy one of this many "
                             "streams (0: one tenant)")
    args = parser.parse_args(argv)
    model_dir, _ = build_model_dir("tiny", args.cache_dir, "cpu")
    work = Path(tempfile.mkdtemp(prefix="http-capacity-"))
    (work / "sitecustomize.py").write_text(SITECUSTOMIZE)
    repo = Path(__file__).resolve().parent.parent
    server_env = {ENV_STEP_MS: str(args.step_ms), ENV_PREFILL_US: str(args.prefill_us_per_token),
                  "PYTHONPATH": os.pathsep.join([str(work), str(repo), os.environ.get("PYTHONPATH", "")])}
    tenants = args.heavy_concurrency > 0
    server_args = list(args.server_arg)
    if tenants:
        server_args += ["--auth-file", str(write_auth_file(work / "keys.toml", ("light", "heavy")))]
    traffic = Traffic(adapters=(), concurrency=args.concurrency, num_requests=args.requests,
                      prompt_len=args.prompt_len, output_len=args.output_len,
                      api_key=tenant_key("light") if tenants else None)
    try:
        with ServerProcess(_Config(model_dir, server_args), work / "server.log") as server:
            with mock.patch.dict(os.environ, server_env):  # the server's environment only, not this process's
                server.start(timeout_s=120)
            warm = replace(traffic, concurrency=max(args.concurrency, args.heavy_concurrency),
                           num_requests=max(args.concurrency, args.heavy_concurrency), prompt_len=16, output_len=8)
            run_async(run_load(server.url, warm, token_range("tiny"), "bench-base"))
            before, cpu_before = scrape.snapshot(server.url), proc_cpu.snapshot(server.process.pid)
            load = run_async(run_load(server.url, traffic, token_range("tiny"), "bench-base"))
            load["server_cpu"] = proc_cpu.deltas(cpu_before, proc_cpu.snapshot(server.process.pid), load["wall_s"])
            load["server_metrics"] = scrape.deltas(before, scrape.snapshot(server.url))
            if tenants:
                heavy = replace(traffic, concurrency=args.heavy_concurrency, num_requests=100_000,
                                api_key=tenant_key("heavy"), seed=traffic.seed + 1)
                beside = run_async(run_with_background(server.url, replace(traffic, seed=traffic.seed + 2), heavy,
                                                       token_range("tiny"), "bench-base"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if tenants:
        return _report_fairness(args, argv, load, beside)
    # The fake model's own time for this load: every stream a token a step, plus each prompt's tokens.
    waves = -(-args.requests // args.concurrency)
    model_s = (waves * args.output_len * args.step_ms / 1e3
               + args.requests * args.prompt_len * args.prefill_us_per_token / 1e6)
    ideal = args.requests * args.output_len / model_s
    result = _header(args, argv, "http_capacity") | {
        "load": {k: v for k, v in load.items() if k != "traffic"},
        # the API process's CPU (all its threads) per streamed token: what caps a one-process API server
        "api_cpu_us_per_token": _api_cpu_us_per_token(load),
        "ratios": {"serve_over_ideal": load["tokens_per_s"] / ideal,
                   "itl_p50_over_step": (load["itl_ms_p50"] or 0) / args.step_ms},
    }
    server_view = {k: load["server_metrics"].get(k) for k in ("http_admission_ms_mean", "queue_ms_mean",
                                                              "ttft_ms_mean", "http_first_output_ms_mean")}
    print(json.dumps({k: load[k] for k in ("tokens_per_s", "ttft_ms_p50", "itl_ms_p50", "itl_ms_p99",
                                           "errors_by_status", "client_cpu_s")}), json.dumps(result["ratios"]),
          json.dumps(server_view), json.dumps(load["server_cpu"]),
          f"api_cpu_us_per_token={result['api_cpu_us_per_token']:.1f}")
    _write(args, result, f"http-capacity-c{args.concurrency}")
    return 0


def _report_fairness(args, argv, alone: dict, beside: dict) -> int:
    """The two-tenant run's figures: the light tenant's TTFT alone and beside the heavy one, and their p99 ratio."""
    def light(load: dict) -> dict:
        keys = ("requests_ok", "tokens_per_s", "ttft_ms_p50", "ttft_ms_p99", "errors_by_status")
        server = load.get("server_metrics")  # scraped around the light tenant's run alone only
        return {k: load.get(k) for k in keys} | ({"server": {k: server.get(k) for k in (
            "http_admission_ms_mean", "queue_ms_mean")}} if server else {})

    ratio = beside["ttft_ms_p99"] / alone["ttft_ms_p99"] if alone.get("ttft_ms_p99") else None
    result = _header(args, argv, "http_capacity_fairness") | {
        "light_alone": light(alone), "light_with_heavy": light(beside),
        "heavy": {k: beside["background"].get(k) for k in ("tokens_per_s", "ttft_ms_p50", "ttft_ms_p99")},
        "ratios": {"fair_light_p99_ratio": ratio},
    }
    print(json.dumps({k: result[k] for k in ("light_alone", "light_with_heavy", "heavy", "ratios")}))
    _write(args, result, f"http-fairness-h{args.heavy_concurrency}")
    return 0


def _header(args, argv, benchmark: str) -> dict:
    return {"benchmark": benchmark, "date": time.strftime("%Y-%m-%d"), "device": "cpu",
            "command": "python -m bench.http_capacity " + " ".join(argv if argv is not None else os.sys.argv[1:]),
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}


def _write(args, result: dict, name: str) -> None:
    """result as <date>-cpu-<name>-<mode>.json under --out (if given); mode: thread, proc or apiN."""
    if args.out is None:
        return
    apis = [a.split("=", 1)[1] for a in args.server_arg if a.startswith("--api-server-count=")]
    tag = f"api{apis[-1]}" if apis else "proc" if "--engine-process" in args.server_arg else "thread"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{result['date']}-cpu-{name}-{tag}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    raise SystemExit(main())
