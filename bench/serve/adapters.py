"""Random PEFT-format LoRA adapters made in code: adapter_config.json + adapter_model.safetensors bytes.

Every adapter is distinct (its own sha256) yet cheap to make: its tensors are slices of one shared
random pool at an adapter-specific offset, so a thousand adapters cost a thousand serializations,
not a thousand random draws. B is non-zero (N(0, 0.01)), A is N(0, 1/in) as PEFT draws it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.shapes import ATTENTION_MODULES, LINEAR_MODULES, module_dims

DEFAULT_MODULES = LINEAR_MODULES


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter the benchmark makes: its name and rank."""

    name: str
    rank: int


def adapter_specs(count: int, ranks: list[int], prefix: str = "bench") -> list[AdapterSpec]:
    """`count` adapters whose ranks cycle through `ranks` (so mixed ranks are evenly mixed)."""
    return [AdapterSpec(f"{prefix}-{index:04d}-r{ranks[index % len(ranks)]}", ranks[index % len(ranks)])
            for index in range(count)]


def adapter_nbytes(shape: dict, rank: int, dtype: torch.dtype, modules=DEFAULT_MODULES) -> int:
    """Bytes of the tensors of one adapter of `rank` on every layer's `modules`."""
    dims = module_dims(shape)
    per_layer = sum(rank * (dims[m][0] + dims[m][1]) for m in modules)
    return shape["num_layers"] * per_layer * torch.finfo(dtype).bits // 8


class AdapterFactory:
    """Makes adapter files for one model shape from a shared random pool."""

    def __init__(self, shape: dict, max_rank: int, dtype: torch.dtype = torch.bfloat16,
                 modules: tuple[str, ...] = DEFAULT_MODULES, seed: int = 1):
        self.shape, self.dtype, self.modules = shape, dtype, tuple(modules)
        self.dims = module_dims(shape)
        largest = max(max(fan_in, fan_out) for fan_in, fan_out in self.dims.values())
        generator = torch.Generator().manual_seed(seed)
        # Slices of at most max_rank * largest values, taken at offsets below 1M: pool = both. One
        # pre-scaled pool per A fan-in and one for B, so an adapter's tensors are views, never copies.
        pool = torch.randn(max_rank * largest + (1 << 20), generator=generator)  # [pool] float32
        self.pools_a = {fan_in: (pool / math.sqrt(fan_in)).to(dtype) for fan_in, _ in self.dims.values()}
        self.pool_b = (pool * 0.01).to(dtype)

    def tensors(self, spec: AdapterSpec, index: int) -> dict[str, torch.Tensor]:
        """PEFT-named lora_A/lora_B tensors of one adapter; offset `index` makes it distinct."""
        out = {}
        offset = (index * 7919 + 1) % (1 << 20)
        rank = spec.rank
        for layer in range(self.shape["num_layers"]):
            for module in self.modules:
                fan_in, fan_out = self.dims[module]
                parent = "self_attn" if module in ATTENTION_MODULES else "mlp"
                key = f"base_model.model.model.layers.{layer}.{parent}.{module}"
                out[f"{key}.lora_A.weight"] = self.pools_a[fan_in][offset : offset + rank * fan_in].view(
                    rank, fan_in)  # [r, in]
                out[f"{key}.lora_B.weight"] = self.pool_b[offset + 1 : offset + 1 + fan_out * rank].view(
                    fan_out, rank)  # [out, r]
                offset = (offset + 104729) % (1 << 20)
        return out

    def config(self, spec: AdapterSpec) -> dict:
        """adapter_config.json of a PEFT LoRA with alpha = 2 x rank."""
        return {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": spec.rank, "lora_alpha": 2 * spec.rank,
            "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "fan_in_fan_out": False,
            "target_modules": list(self.modules), "base_model_name_or_path": "bench-random",
            "inference_mode": True,
        }

    def files(self, spec: AdapterSpec, index: int) -> tuple[bytes, bytes]:
        """(adapter_config.json bytes, adapter_model.safetensors bytes)."""
        return json.dumps(self.config(spec)).encode(), safetensors_bytes(self.tensors(spec, index))

    def iter_files(self, specs: list[AdapterSpec]) -> Iterator[tuple[AdapterSpec, bytes, bytes]]:
        """(spec, config bytes, safetensors bytes) of each adapter, made one at a time."""
        for index, spec in enumerate(specs):
            config, weights = self.files(spec, index)
            yield spec, config, weights


_SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    """The safetensors file of `tensors`, written directly: safetensors.torch.save refuses tensors
    that share storage, and these are views into one pool on purpose."""
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    chunks, offset = [], 0
    for key, tensor in tensors.items():
        raw = tensor.contiguous().view(torch.uint8).reshape(-1).numpy()
        header[key] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                       "data_offsets": [offset, offset + raw.nbytes]}
        chunks.append(raw.data)
        offset += raw.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return b"".join([len(text).to_bytes(8, "little"), text, *chunks])


def seed_store(model_dir: Path, adapters_dir: Path, factory: AdapterFactory, specs: list[AdapterSpec],
               max_rank: int, max_bytes: int) -> dict:
    """Write adapters straight into the server's store (before it starts), as uploads would leave them:
    the fast way to have a thousand adapters on disk. Adapters already there of the same rank are kept
    (a reused --work-dir skips the writing). Without fsync (`durable=False`): 42 GB took 96-126 s of each
    H200 call with them, and the measured loads read the files from the page cache either way. Returns
    counts, bytes and seconds."""
    import time

    from adapters_store import AdapterStore, BaseModelSpec

    start = time.perf_counter()
    spec = BaseModelSpec.from_hf_config(json.loads((model_dir / "config.json").read_text()))
    store = AdapterStore(adapters_dir, spec, max_rank=max_rank, max_bytes=max_bytes, durable=False)
    present = {(record.name, record.rank) for record in store.list()}
    missing = [index for index, adapter in enumerate(specs) if (adapter.name, adapter.rank) not in present]

    def put(index: int) -> int:  # validation (torch, outside the store's lock) runs in parallel
        config, weights = factory.files(specs[index], index)
        store.put(specs[index].name, config, weights)
        return len(weights)

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        total = sum(pool.map(put, missing))
    # Without fsync the kernel writes the dirty pages back later, at the H200 host's ~350 MB/s: during the
    # server's start and loads. The seventh session's zipf1000 run, the first seeded this way, ran its
    # uniform load 45% slower than the sixth's (seeded with fsync); likely this, not proven. Written back
    # here, before the server starts, and timed apart.
    written = time.perf_counter()
    os.sync()
    return {"count": len(specs), "written": len(missing), "bytes_written": total,
            "seconds": round(time.perf_counter() - start, 2), "sync_seconds": round(time.perf_counter() - written, 2)}
