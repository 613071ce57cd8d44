"""The tile layout the CUDA tile kernel streams (nf4_layout.tile_pack), decoded on the CPU the way the
kernel reads it (csrc/nf4_tile.cuh, nf4_tile_kernel), must give back exactly the reference weight."""

from __future__ import annotations

import pytest
import torch

from server.kernels.nf4.nf4_layout import tile_layout_sizes, tile_pack
from server.kernels.nf4.nf4_ops import nf4_dequantize_reference

TABLE = torch.linspace(-1, 1, 16)


def _decode_as_kernel(codes: torch.Tensor, scales: torch.Tensor, shape) -> torch.Tensor:
    """Dense [out, in] float32 from the tile layout, lane by lane: lane 4g + t of (tile, block) holds 16
    bytes, 8 of row g then 8 of row g + 8; byte i covers k = 64 * block + 16t + 2i (high nibble) and + 1."""
    out_features, in_features = shape
    tiles, blocks = -(-out_features // 16), in_features // 64
    dense = torch.full((tiles * 16, in_features), float("nan"))
    lanes = codes.view(tiles, blocks, 32, 16)
    pairs = scales.view(tiles, blocks, 8, 2)
    for tile in range(tiles):
        for block in range(blocks):
            for lane in range(32):
                g, t = divmod(lane, 4)
                for h in range(2):
                    row = tile * 16 + g + 8 * h
                    scale = pairs[tile, block, g, h]
                    for i in range(8):
                        byte = int(lanes[tile, block, lane, 8 * h + i])
                        k = 64 * block + 16 * t + 2 * i
                        dense[row, k] = TABLE[byte >> 4] * scale
                        dense[row, k + 1] = TABLE[byte & 0xF] * scale
    assert not dense.isnan().any(), "every element of every padded tile is written exactly once"
    assert (dense[out_features:] == 0).all(), "padding rows carry zero scales"
    return dense[:out_features]


@pytest.mark.parametrize("shape", [(16, 64), (37, 192), (50, 128)], ids=str)
def test_tile_layout_decodes_to_the_reference_weight(shape):
    gen = torch.Generator().manual_seed(shape[0] * 131 + shape[1])
    numel = shape[0] * shape[1]
    codes = torch.randint(0, 256, (numel // 2, 1), dtype=torch.uint8, generator=gen)
    absmax = torch.rand(numel // 64, generator=gen) + 0.5
    tile_codes, tile_scales = tile_pack(codes, absmax, shape)
    assert (tile_codes.numel(), tile_scales.numel()) == tile_layout_sizes(shape)
    expected = nf4_dequantize_reference(codes, absmax, shape, TABLE)
    assert torch.equal(_decode_as_kernel(tile_codes, tile_scales, shape), expected)


def test_tile_pack_in_place_keeps_the_buffers():
    shape = (37, 192)
    codes = torch.randint(0, 256, (shape[0] * shape[1] // 2, 1), dtype=torch.uint8)
    absmax = torch.rand(shape[0] * shape[1] // 64)
    buffers = tuple(torch.full((n,), 7, dtype=d) for n, d in zip(tile_layout_sizes(shape), (torch.uint8, torch.float32),
                                                                   strict=True))
    pointers = [b.data_ptr() for b in buffers]
    result = tile_pack(codes, absmax, shape, out=buffers)
    assert [b.data_ptr() for b in result] == pointers
    fresh = tile_pack(codes, absmax, shape)
    assert torch.equal(result[0], fresh[0]) and torch.equal(result[1], fresh[1])
