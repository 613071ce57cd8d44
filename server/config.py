"""One source of truth for configuration: env vars (LORAPLEX_*) and mirrored CLI flags."""

from __future__ import annotations

import argparse
import os
from enum import Enum
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from server import env_switches, settings_help

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "loraplex"
# Default max_prompt_chars per token of max_model_len: English averages about 4.5 characters per token
# (SmolLM2), so a longer prompt cannot fit the context and is refused before tokenizing it.
PROMPT_CHARS_PER_TOKEN = 16


class LoraMode(str, Enum):
    """How adapters are applied: mixed batches, merged hot-swaps, or chosen by traffic."""

    UNMERGED = "unmerged"
    MERGED = "merged"
    AUTO = "auto"


class Settings(BaseSettings):
    """Server settings. Every field is LORAPLEX_<NAME> in the environment and --<name> on the CLI."""

    model_config = SettingsConfigDict(env_prefix="LORAPLEX_", extra="forbid", validate_default=True)

    model: str = Field("embedded", description="HF model dir (safetensors), a .gguf file, or 'embedded'")
    served_model_name: str | None = Field(None, description="the base model's id in /v1/models; unset = from model")
    generation_config: Literal["auto", "none"] = Field(
        "auto", description="auto (vLLM's default): the model's generation_config.json gives the OpenAI routes' "
        "temperature, top_p, top_k, min_p and repetition_penalty where a request leaves them unset; none: 1.0, "
        "1.0, off, off, 1.0"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="compute dtype; auto = bfloat16 on CUDA, float32 on the CPU"
    )
    quantization: Literal["nf4", "none"] = Field("nf4", description="nf4: 4-bit linears at load; none: 16-bit")
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="auto = cuda when a GPU is visible, else cpu")
    host: str = Field("127.0.0.1", description="address to bind; anything but loopback needs auth_file")
    port: int = Field(8000, ge=1, le=65535, description="TCP port")
    adapters_dir: Path = Field(DEFAULT_CACHE_DIR / "adapters", description="adapter store root")
    allowed_adapter_dirs: list[Path] = Field(
        default_factory=list, description="dirs /v1/load_lora_adapter may read from"
    )
    cache_dir: Path = Field(DEFAULT_CACHE_DIR, description="converted models (GGUF to safetensors) and other caches")
    auth_file: Path | None = Field(
        None, description="TOML or YAML keys file (`loraplex keys add`); unset = open mode, loopback only"
    )
    max_slots: int = Field(
        8, ge=1, le=4096, description="GPU adapter memory when adapter_gpu_memory_bytes is unset: room for this many "
        "adapters of max_rank (smaller ranks fit more: the pool is sized in rank units)"
    )
    adapter_gpu_memory_bytes: int | None = Field(
        None, ge=1, description="GPU memory for the adapter rank pool; unset = the larger of max_slots x max_rank and "
        "adapter_gpu_memory_fraction of free GPU memory"
    )
    adapter_gpu_memory_fraction: float = Field(
        0.05, ge=0.0, le=0.5, description="unset adapter_gpu_memory_bytes on CUDA: this share of the free GPU memory "
        "at start-up, taken before the KV cache"
    )
    max_cpu_adapters: int | None = Field(
        None, ge=1, description="optional count cap on the CPU adapter tier, besides cpu_adapter_cache_bytes"
    )
    cpu_adapter_cache_bytes: int = Field(
        4 * 1024**3, ge=0,
        description="bytes of adapter weights kept in CPU memory (LRU; 4 GiB); on CUDA pinned 4 MiB pages, "
                    "reserved at start-up (about 1 s per GiB)",
    )
    max_rank: int = Field(
        64, ge=1, le=512, description="largest accepted LoRA rank (sizes the kernels' tiles and scratch)"
    )
    lora_mode: LoraMode = Field(
        LoraMode.UNMERGED, description="unmerged: mixed batches; merged: one adapter merged and hot-swapped; auto"
    )
    max_batch_size: int = Field(32, ge=1, le=1024, description="running sequences per step")
    max_model_len: int = Field(2048, ge=16, description="prompt + generated tokens per sequence")
    max_num_batched_tokens: int = Field(2048, ge=16, description="prefill tokens per step (chunking)")
    kv_cache_blocks: int | None = Field(
        None, ge=1, description="KV cache size in 16-token blocks; unset = memory fraction on CUDA, a full batch on CPU"
    )
    enable_prefix_caching: bool = Field(
        True, description="reuse the KV blocks of prompt prefixes already computed (same adapter version)"
    )
    prefix_cache_scope: Literal["tenant", "global"] = Field(
        "tenant", description="tenant: cached prefixes are shared only within one API-key tenant (a shared "
        "cache lets one tenant time another's prompts); global: across tenants, as vLLM"
    )
    kv_cache_memory_fraction: float = Field(
        0.5, gt=0, le=0.95, description="share of free GPU memory for the KV cache when kv_cache_blocks is unset"
    )
    max_upload_bytes: int = Field(512 * 1024 * 1024, ge=1024, description="largest adapter upload (512 MiB)")
    max_queue_size: int = Field(256, ge=1, description="requests in flight before new ones get 503")
    request_timeout_s: float = Field(600.0, gt=0, description="per-request limit (504 after it); also the drain limit")
    cuda_graphs: bool = Field(True, description="capture decode steps as CUDA graphs on CUDA")
    async_scheduling: bool | None = Field(
        None, description="launch the next decode step before reading this one's tokens, so that the host's "
        "work of a step runs beside the GPU's (server.engine.overlap; H200 8B batch 1: 3.96 -> 3.40 ms a token). "
        "Unset: on when the engine runs in its own process (engine_process), off when it runs in a thread of "
        "the HTTP process, whose GIL a faster step loop starves (H200 fairness run: HTTP admission 24 ms "
        "against 3, see bench/NOTES.md)"
    )
    # 1024 (H200, 1B c32 --engine-process, 1,024-request loads, A/B in one call of the seventeenth session): greedy
    # 10,150 tokens/s against 9,441 at 256, ITL p50 1.82 against 2.04 ms, queue mean 5 against 16 ms
    # (2026-12-03-nvidia-h200-serve-c32-1b-s17-r1024*.json; the sixteenth session's 1,024 run: 10,087). The twelfth
    # session had found 512 and 1,024 no better than 256 on 256-request loads, before the fused glue and sampler.
    cuda_graph_max_rows: int = Field(
        1024, ge=0, le=4096, description="largest step (decode rows plus the tokens of short prefill chunks) "
        "replayed as a CUDA graph; steps with more prefill tokens run eagerly (0: decode rows only)"
    )
    # TGI's max_waiting_tokens in spirit: a prompt that arrives beside a running decode batch costs that batch a
    # step that reads every weight at prefill size (dequant + cuBLAS on an NF4 base), whatever the prompt's length;
    # held a few steps, several prompts share that step.
    prefill_hold_steps: int = Field(
        0, ge=0, le=64, description="while a decode batch runs, waiting prompts are held back up to this many "
        "steps so that several share one prefill step, unless they already fill the step's prefill room or the "
        "batch's free rows (0: admitted at the first step)"
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="debug also logs each request")
    adapter_versions_kept: int = Field(
        3, ge=1, description="versions kept on disk per adapter; older ones are pruned after an upload"
    )
    metrics_max_adapters: int = Field(
        100, ge=0, description="distinct adapter names in per-adapter metrics; the rest count as 'other'"
    )
    metrics_require_key: bool = Field(
        False, description="/metrics needs an admin-scope API key (or the metrics key)"
    )
    metrics_key_sha256: str | None = Field(
        None, pattern=r"^[0-9a-fA-F]{64}$",
        description="sha256 of a key that may read /metrics and nothing else; setting it protects /metrics",
    )
    max_request_body_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="largest request body, adapter uploads aside (max_upload_bytes)"
    )
    max_prompt_chars: int | None = Field(
        None, ge=1, description=f"prompt characters, checked before tokenizing; default "
        f"{PROMPT_CHARS_PER_TOKEN} x max_model_len"
    )
    freeze_heap: bool = Field(
        True, description="once started, move every object alive out of Python's cyclic garbage collector "
        "(gc.freeze, in the HTTP process and the engine process): a full collection of the start-up heap "
        "(~450,000 objects) stopped the process for 216-255 ms on the dev CPU, every stream with it "
        "(server/heap.py)"
    )
    engine_process: bool = Field(
        False, description="run the engine core (scheduler, model, sampler) in its own process, talking to "
        "the HTTP process over ZeroMQ; off: the engine runs in a thread of the HTTP process (H200, 1B, 32 "
        "streams: 0.87-0.96 of the engine's tok/s in its own process, 2026-12-04, against 0.45 in a thread; "
        "off by default because a light tenant's p99 TTFT beside a heavy one was 3.45x alone in this mode "
        "against 1.24-1.96x in a thread, bench/NOTES.md)"
    )
    api_server_count: int = Field(
        1, ge=1, le=64, description="HTTP processes sharing the listening socket and one engine process (vLLM's "
        "--api-server-count; implies engine_process): each tokenizes, detokenizes and streams its share of the "
        "connections. One process's event loop and GIL streamed ~12,000 tokens a second at 0.78-0.96 of a core "
        "on H200 hosts (1B, 32 streams), near its ceiling on the slower ones; on a faster one two processes "
        "served the same tok/s as one (bench/NOTES.md). Each process enforces 1/N of every tenant's rate limits "
        "and of max_queue_size, and every /metrics shows the whole server"
    )
    gil_switch_interval_ms: float | None = Field(
        0.5, gt=0, description="sys.setswitchinterval of the server process in ms (5 is Python's own default); "
        "the HTTP loop, the engine thread, the adapter reads and the tokenizer threads share one GIL, and a "
        "thread waiting for it waits up to this long. 0.5: with the engine thread busy, a read into the CPU "
        "tier (about 80 GIL handovers) took 2-10 s at 5 ms on the dev CPU against 0.15-0.35 s at 0.5 ms "
        "(H200 1,000-adapter run: 60-90 ms a read under load, 30-39 ms idle), and the c32 load gave 3,901 "
        "tok/s at 0.5 ms against 3,485 at 5 ms"
    )
    scheduling_policy: Literal["fair", "fcfs"] = Field(
        "fair", description="fair: virtual token counters across tenants; fcfs: arrival order"
    )
    fair_prompt_token_weight: float = Field(1.0, ge=0, description="fair scheduling: cost of one prompt token")
    fair_output_token_weight: float = Field(2.0, ge=0, description="fair scheduling: cost of one generated token")
    tenant_max_running_requests: int | None = Field(
        None, ge=1, description="default per-tenant cap on running requests (auth file may override); unset = none"
    )
    tenant_max_queued_requests: int | None = Field(
        None, ge=1, description="default per-tenant cap on requests in flight, more get 429 (auth file may "
        "override); unset = none"
    )
    tokenizer_threads: int = Field(2, ge=1, le=64, description="threads tokenizing prompts (at most this many at once)")

    @field_validator("model")
    @classmethod
    def _model_exists(cls, value: str) -> str:
        if value != "embedded" and not Path(value).exists():
            raise ValueError(f"model path {value!r} does not exist (use 'embedded' or a dir/.gguf)")
        return value

    @field_validator("auth_file")
    @classmethod
    def _auth_file_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"auth file {str(value)!r} does not exist")
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> Settings:
        if self.max_num_batched_tokens < 16:
            raise ValueError("max_num_batched_tokens must be at least 16")
        if self.api_server_count > 1:
            self.engine_process = True
        if self.max_prompt_chars is None:
            self.max_prompt_chars = PROMPT_CHARS_PER_TOKEN * self.max_model_len
        if self.auth_file is None and self.host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(
                f"host {self.host!r} needs an auth_file: open mode (no auth file) binds 127.0.0.1 only"
            )
        if self.metrics_require_key and self.auth_file is None and self.metrics_key_sha256 is None:
            raise ValueError(
                "metrics_require_key needs an auth_file (admin-scope keys) or a metrics_key_sha256"
            )
        return self

    @property
    def is_metrics_protected(self) -> bool:
        """Whether /metrics asks for a key (an admin-scope API key or the metrics key)."""
        return self.metrics_require_key or self.metrics_key_sha256 is not None


def _add_flags(parser: argparse.ArgumentParser) -> None:
    for name, field in Settings.model_fields.items():
        flag, help_text = settings_help.flag_name(name), settings_help.help_text(name, field)
        metavar = settings_help.metavar(field)
        if field.annotation in (bool, bool | None):
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif name == "allowed_adapter_dirs":
            parser.add_argument(flag, dest=name, action="append", default=None, metavar=metavar,
                                help=help_text + "; repeatable")
        else:
            # No argparse `choices`: the Settings validator rejects bad values with a message naming the setting.
            parser.add_argument(flag, dest=name, default=None, metavar=metavar, help=help_text)


def parse_settings(argv: list[str] | None = None) -> Settings:
    """Build Settings from env vars, overridden by CLI flags; exit with a message naming the field."""
    parser = argparse.ArgumentParser(
        prog="loraplex", description="LoRA adapter inference server. Every setting is a flag and an environment "
        "variable LORAPLEX_<NAME>; a flag wins over the variable.",
        epilog="Manage API keys with `loraplex keys --help`.",
    )
    _add_flags(parser)
    args = parser.parse_args(argv)
    unknown = env_switches.unknown_variables(os.environ, Settings.model_fields)
    if unknown:  # pydantic-settings' extra="forbid" covers keyword arguments, not the environment
        parser.exit(2, f"loraplex: unknown environment variables: {'; '.join(unknown)}: every setting is "
                    "LORAPLEX_<NAME> of a field (see --help)\n")
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    try:
        return Settings(**overrides)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}" for e in err.errors()
        )
        parser.exit(2, f"loraplex: invalid settings: {problems}\n")
