"""nf4_wgmma_kernel's data movement (server/model/csrc/nf4_wgmma.cuh), emulated on the CPU before any GPU runs it: x's
16-byte chunks stored permuted into a 128-byte-swizzled tile as each thread's store_x does, the tensor cores' reads of
that tile for k-step j (a token's 16 values at bytes 32j-32j+31 of its row, through the swizzle), the weights' A
fragments from the tile layout (a_fragments, emulated as in test_nf4_gemm_mapping), a warpgroup's 64 x 16 A assembled
from its 4 warps as for m16n8k16, and the accumulator registers' (weight row, token) of the epilogue. The result must
be x @ W^T with W dequantized and rounded to bf16."""

from __future__ import annotations

import torch

from server.model.nf4_ops import nf4_dequantize_reference
from tests.unit.test_nf4_gemm_mapping import _bf16, _weight_regs, place_a, random_layer

THREADS = 256  # WG_WARPS * 32


def _store_x(x: torch.Tensor, blk: int, tokens: int) -> dict[int, torch.Tensor]:
    """store_x: the tile as {physical 32-bit word: its two values}, from each thread's chunks."""
    words = {}
    for q in range(tokens * 8):  # q = threadIdx.x + i * THREADS covers every chunk once
        row, c = q >> 3, q & 7
        chunk_values = x[row, 64 * blk + 8 * c:64 * blk + 8 * c + 8]
        for w in range(4):
            chunk = 4 * (c & 1) + w
            address = row * 128 + ((chunk ^ (row & 7)) << 4) + 4 * (c >> 1)
            assert address % 4 == 0 and address // 4 not in words
            words[address // 4] = chunk_values[2 * w:2 * w + 2]
    return words


def _b_operand(words: dict[int, torch.Tensor], j: int, tokens: int) -> torch.Tensor:
    """B [16, tokens] of k-step j as the tensor cores read the swizzled K-major tile: value kk of token n is the 16-bit
    value at logical byte 32 j + 2 kk of row n, whose 16-byte chunk sits at chunk ^ (n & 7)."""
    b = torch.zeros(16, tokens)
    for n in range(tokens):
        for kk in range(16):
            logical = 32 * j + 2 * kk
            physical = n * 128 + (((logical >> 4) ^ (n & 7)) << 4) + (logical & 15)
            b[kk, n] = words[physical // 4][(physical % 4) // 2]
    return b


def _a_operand(tile_codes, tile_scales, table, tiles, blk, num_blocks, j) -> torch.Tensor:
    """A [64, 16] of k-step j: warp w's a_fragments (its tile, rows 16 w + g and + 8) placed as m16n8k16's A."""
    a = torch.zeros(64, 16)
    for w, tile in enumerate(tiles):
        for lane in range(32):
            regs = _weight_regs(tile_codes, tile_scales, table, tile, blk, num_blocks, lane, j // 2)[j % 2]
            place_a(a, 16 * w, lane, regs)
    return a


def test_one_warpgroups_tile_is_x_times_the_dequantized_weight():
    out_features, in_features, tokens = 64, 128, 32  # one warpgroup (4 row tiles), two quant blocks, BM = 32
    shape = (out_features, in_features)
    codes, absmax, table, x, tile_codes, tile_scales = random_layer(out_features, in_features, tokens)
    num_blocks = in_features // 64

    d = torch.zeros(64, tokens, dtype=torch.float64)  # the warpgroup's accumulator as a 64 x BM matrix
    for blk in range(num_blocks):
        words = _store_x(x, blk, tokens)
        assert len(words) == tokens * 32  # every word of the tile written once
        for j in range(4):
            a = _a_operand(tile_codes, tile_scales, table, range(4), blk, num_blocks, j)
            d += a.double() @ _b_operand(words, j, tokens).double()

    out = torch.full((tokens, out_features), float("nan"), dtype=torch.float64)
    for warp in range(4):  # the epilogue: accumulator register 4b + e of each lane to its (token, weight row)
        for lane in range(32):
            g, t = lane // 4, lane % 4
            for b in range(tokens // 8):
                for e in range(4):
                    row_in_group = 16 * warp + g + 8 * (e >> 1)
                    tok = 8 * b + 2 * t + (e & 1)
                    out[tok, row_in_group] = d[row_in_group, tok]
    weight = _bf16(nf4_dequantize_reference(codes, absmax, shape, table))
    want = x.double() @ weight.double().t()
    assert not out.isnan().any()
    torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-9)
