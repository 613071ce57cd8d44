"""Builders shared by the adapters_store tests: real PEFT adapters on a tiny random Llama, raw bytes."""

from __future__ import annotations

import atexit
import functools
import hashlib
import io
import json
import shutil
import struct
import tarfile
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from transformers import LlamaConfig, LlamaForCausalLM

from adapters_store import AdapterStore, BaseModelSpec

ALL_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MAX_RANK = 16
MAX_BYTES = 4 * 1024 * 1024


def llama_config(num_layers: int = 2) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )


SPEC = BaseModelSpec.from_hf_config(llama_config())
_TMP_ROOT = Path(tempfile.mkdtemp(prefix="store-test-adapters-"))
atexit.register(shutil.rmtree, _TMP_ROOT, True)


@dataclass
class PeftAdapter:
    """A PEFT adapter saved with save_pretrained, its bytes, and the live model as the oracle."""

    model: PeftModel
    path: Path
    config_bytes: bytes
    safetensors_bytes: bytes

    def linear(self, layer: int, module: str) -> torch.nn.Module:
        block = self.model.base_model.model.model.layers[layer]
        parent = block.self_attn if module in ALL_MODULES[:4] else block.mlp
        return getattr(parent, module)

    def lora_pair(self, layer: int, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        lin = self.linear(layer, module)
        return lin.lora_A["default"].weight.detach(), lin.lora_B["default"].weight.detach()

    def tensors(self) -> dict[str, torch.Tensor]:
        return st_load(self.safetensors_bytes)

    def config(self) -> dict:
        return json.loads(self.config_bytes)


@functools.cache
def peft_adapter(
    r: int = 4,
    alpha: float = 8,
    targets: tuple[str, ...] = ALL_MODULES,
    use_rslora: bool = False,
    num_layers: int = 2,
    seed: int = 0,
    use_dora: bool = False,
) -> PeftAdapter:
    """Build (once per argument set) a real PEFT LoRA adapter with random, non-zero A and B."""
    torch.manual_seed(seed)
    base = LlamaForCausalLM(llama_config(num_layers))
    lora = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=list(targets),
        init_lora_weights=False,
        use_rslora=use_rslora,
        use_dora=use_dora,
    )
    path = _TMP_ROOT / f"r{r}-a{alpha}-{'-'.join(targets)}-rs{use_rslora}-l{num_layers}-s{seed}-d{use_dora}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = get_peft_model(base, lora).eval()
        model.save_pretrained(path)
    config_bytes = (path / "adapter_config.json").read_bytes()
    return PeftAdapter(model, path, config_bytes, (path / "adapter_model.safetensors").read_bytes())


def edit_config(adapter: PeftAdapter, **changes) -> bytes:
    config = adapter.config()
    config.update(changes)
    return json.dumps(config).encode()


def save_tensors(tensors: dict[str, torch.Tensor]) -> bytes:
    return st_save({key: value.contiguous() for key, value in tensors.items()})


def raw_safetensors(header: dict, data: bytes = b"") -> bytes:
    """A safetensors blob with an arbitrary (possibly hostile) header."""
    header_bytes = json.dumps(header).encode()
    return struct.pack("<Q", len(header_bytes)) + header_bytes + data


def make_store(root: Path, max_rank: int = MAX_RANK, max_bytes: int = MAX_BYTES) -> AdapterStore:
    return AdapterStore(root, SPEC, max_rank=max_rank, max_bytes=max_bytes)


def snapshot(root: Path) -> dict[str, str]:
    """Every file and directory under root with a digest of its content; equal snapshots = unchanged store."""
    result = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        result[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return result


def make_zip(members: dict[str, bytes], symlinks: tuple[str, ...] = ()) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            if name in symlinks:
                info.external_attr = (0o120777 << 16) | 0
            archive.writestr(info, data)
    return buffer.getvalue()


def make_tar_gz(members: dict[str, bytes], links: dict[str, tuple[bytes, str]] | None = None) -> bytes:
    """members: name -> content; links: name -> (tarfile.SYMTYPE or LNKTYPE, target)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for name, (link_type, target) in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = link_type, target
            archive.addfile(info)
    return buffer.getvalue()


def adapter_members(adapter: PeftAdapter, prefix: str = "") -> dict[str, bytes]:
    return {
        prefix + "adapter_config.json": adapter.config_bytes,
        prefix + "adapter_model.safetensors": adapter.safetensors_bytes,
    }
