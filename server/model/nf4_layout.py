"""NF4 constants and views shared by the reference ops and the kernels (imports nothing of ours)."""

from __future__ import annotations

import torch

NF4_BLOCKSIZE = 64  # elements per absmax scale; the only blocksize the kernels support


def codes_as_bytes(codes: torch.Tensor) -> torch.Tensor:
    """Flat uint8 view of the packed codes, whatever bnb's quant_storage dtype was."""
    flat = codes.reshape(-1)
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


def codes_as_words(codes: torch.Tensor) -> torch.Tensor:
    """Flat int32 view of the packed codes (8 nibbles a word; no copy)."""
    return codes_as_bytes(codes).view(torch.int32)


def validate_nf4_layout(codes: torch.Tensor, absmax_f: torch.Tensor, shape, code_table: torch.Tensor) -> None:
    """Raise ValueError unless the packed weight matches ``shape`` (see the module docstring)."""
    out_features, in_features = shape
    if in_features % NF4_BLOCKSIZE != 0:
        raise ValueError(f"in_features must be a multiple of {NF4_BLOCKSIZE}, got {in_features}")
    numel = out_features * in_features
    if codes.numel() * codes.element_size() != numel // 2:
        raise ValueError(f"codes hold {codes.numel() * codes.element_size()} bytes, need {numel // 2}")
    if absmax_f.numel() != numel // NF4_BLOCKSIZE or absmax_f.dtype != torch.float32:
        raise ValueError(f"absmax_f must be float32 [{numel // NF4_BLOCKSIZE}]")
    if code_table.numel() != 16:
        raise ValueError("code_table must have 16 entries")


def validate_matmul_args(x: torch.Tensor, shape, bias: torch.Tensor | None) -> None:
    """Raise ValueError unless x is [T, in] and bias (if any) is [out]."""
    if x.ndim != 2 or x.shape[1] != shape[1]:
        raise ValueError(f"x must be [T, {shape[1]}], got {list(x.shape)}")
    if bias is not None and bias.shape != (shape[0],):
        raise ValueError(f"bias must be [{shape[0]}], got {list(bias.shape)}")
