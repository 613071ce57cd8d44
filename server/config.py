"""One source of truth for configuration: env vars (LORAPLEX_*) and mirrored CLI flags."""

from __future__ import annotations

import argparse
from enum import Enum
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

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

    model: str = Field("embedded", description="HF model dir, a .gguf file, or 'embedded'")
    served_model_name: str | None = Field(None, description="id shown in /v1/models; default from model")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    quantization: Literal["nf4", "none"] = "nf4"
    device: Literal["auto", "cuda", "cpu"] = "auto"
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    adapters_dir: Path = Field(DEFAULT_CACHE_DIR / "adapters", description="adapter store root")
    allowed_adapter_dirs: list[Path] = Field(
        default_factory=list, description="dirs /v1/load_lora_adapter may read from"
    )
    cache_dir: Path = Field(DEFAULT_CACHE_DIR, description="converted models and other caches")
    auth_file: Path | None = Field(None, description="TOML or YAML keys file; none = open mode")
    max_slots: int = Field(8, ge=1, le=256, description="distinct adapters in one batch (GPU slots)")
    max_cpu_adapters: int = Field(64, ge=1, description="adapters kept in CPU memory (LRU)")
    max_rank: int = Field(64, ge=1, le=512)
    lora_mode: LoraMode = LoraMode.UNMERGED
    max_batch_size: int = Field(32, ge=1, le=1024, description="running sequences per step")
    max_model_len: int = Field(2048, ge=16, description="prompt + generated tokens per sequence")
    max_num_batched_tokens: int = Field(2048, ge=16, description="prefill tokens per step (chunking)")
    kv_cache_blocks: int | None = Field(None, ge=1, description="KV blocks; default from memory")
    kv_cache_memory_fraction: float = Field(0.5, gt=0, le=0.95)
    max_upload_bytes: int = Field(512 * 1024 * 1024, ge=1024)
    max_queue_size: int = Field(256, ge=1, description="waiting requests before 503")
    request_timeout_s: float = Field(600.0, gt=0)
    cuda_graphs: bool = Field(True, description="capture decode steps as CUDA graphs on CUDA")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
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
    engine_process: bool = Field(
        False, description="run the engine core (scheduler, model, sampler) in its own process, talking to "
        "the HTTP process over ZeroMQ; off: the engine runs in a thread of the HTTP process"
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
        flag = "--" + name.replace("_", "-")
        if field.annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None)
        elif name == "allowed_adapter_dirs":
            parser.add_argument(flag, dest=name, action="append", default=None, help=field.description)
        else:
            parser.add_argument(flag, dest=name, default=None, help=field.description)


def parse_settings(argv: list[str] | None = None) -> Settings:
    """Build Settings from env vars, overridden by CLI flags; exit with a message naming the field."""
    parser = argparse.ArgumentParser(prog="loraplex", description="LoRA adapter inference server")
    _add_flags(parser)
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    try:
        return Settings(**overrides)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}" for e in err.errors()
        )
        parser.exit(2, f"loraplex: invalid settings: {problems}\n")
