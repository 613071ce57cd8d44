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


TILE_ROWS = 16  # weight rows of one MMA tile (server/kernels/nf4/csrc/nf4_tile.cuh, nf4_tile_kernel)


def tile_layout_sizes(shape) -> tuple[int, int]:
    """(code bytes, fp32 scales) of the tile layout of an (out, in) weight: rows padded to TILE_ROWS."""
    out_features, in_features = shape
    tiles = -(-out_features // TILE_ROWS)
    blocks = in_features // NF4_BLOCKSIZE
    return tiles * blocks * 512, tiles * blocks * TILE_ROWS


def tile_pack(codes: torch.Tensor, absmax_f: torch.Tensor, shape,
              out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward-only copy the CUDA tile kernel streams, derived from bnb's codes (which stay the truth).

    For row tile r (rows 16r .. 16r + 15, padded with zero codes and zero scales) and quant block b:
    512 code bytes in MMA-lane order, lane 4g + t holding row 16r + g's bytes [32b + 8t, +8) then row
    16r + g + 8's, and 16 scales as 8 pairs (row g, row g + 8). Returns (codes uint8 [tiles * blocks * 512],
    scales float32 [tiles * blocks * 16]); with `out` the result is written into those tensors in place
    (CUDA graphs captured on them stay valid after a swap)."""
    out_features, in_features = shape
    tiles, blocks = -(-out_features // TILE_ROWS), in_features // NF4_BLOCKSIZE
    pad = tiles * TILE_ROWS - out_features
    rows = codes_as_bytes(codes).view(out_features, in_features // 2)
    scales = absmax_f.view(out_features, blocks)
    if pad:
        rows = torch.cat([rows, rows.new_zeros(pad, rows.shape[1])])
        scales = torch.cat([scales, scales.new_zeros(pad, blocks)])
    # rows: [tile, h (row g or g + 8), g, block, t, 8 bytes] -> [tile, block, g, t, h, 8 bytes]
    packed_codes = rows.view(tiles, 2, 8, blocks, 4, 8).permute(0, 3, 2, 4, 1, 5)
    # scales: [tile, h, g, block] -> [tile, block, g, h]
    packed_scales = scales.view(tiles, 2, 8, blocks).permute(0, 3, 2, 1)
    if out is None:
        return packed_codes.reshape(-1), packed_scales.reshape(-1)
    out[0].view(tiles, blocks, 8, 4, 2, 8).copy_(packed_codes)
    out[1].view(tiles, blocks, 8, 2).copy_(packed_scales)
    return out
