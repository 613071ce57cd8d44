"""Plain CUDA shared libraries built by nvcc at first use (no torch headers: seconds, not torch's ~90 s extension
build), cached beside torch's extensions (TORCH_EXTENSIONS_DIR) under a digest of the sources and the GPU
architecture, loaded by the caller through ctypes. The CPU never calls this."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path


def nvcc() -> str:
    found = shutil.which("nvcc")
    if found:
        return found
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME and (Path(CUDA_HOME) / "bin" / "nvcc").exists():
        return str(Path(CUDA_HOME) / "bin" / "nvcc")
    raise RuntimeError("nvcc not found (PATH, CUDA_HOME)")


def build(source: Path, name: str, major: int, minor: int, include_dirs: tuple[Path, ...] = (),
          feature: str = "", flags: tuple[str, ...] = ()) -> Path:
    """lib<name>.so for sm_{major}{minor}{feature} (feature "a": Hopper's sm_90a, whose warpgroup MMA the NF4 wgmma
    kernels need), compiled once with nvcc's `flags` (atomic rename, so that processes building at once each find a
    whole file); the digest covers the source, the flags and every file of the include directories."""
    digest = hashlib.sha256(source.read_bytes())
    digest.update(" ".join(flags).encode())
    for directory in include_dirs:
        for path in sorted(p for p in directory.iterdir() if p.is_file()):
            digest.update(path.read_bytes())
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    arch = f"{major}{minor}{feature}"
    target = root / f"{name}_{digest.hexdigest()[:10]}_sm{arch}" / f"lib{name}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        command = [nvcc(), "-O3", "-shared", "-Xcompiler", "-fPIC", f"-gencode=arch=compute_{arch},code=sm_{arch}",
                   *flags, *(f"-I{d}" for d in include_dirs), "-o", str(built), str(source)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"nvcc failed ({' '.join(command)}):\n{result.stderr[-4000:]}")
        os.replace(built, target)
    return target
