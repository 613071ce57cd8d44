"""nf4_wgmma_kernel's data movement (server/kernels/nf4/csrc/nf4_wgmma.cuh), emulated on the CPU before any GPU runs it:
x's 16-byte chunks stored permuted into a 128-byte-swizzled tile as each thread's store_x does, the tensor cores' reads
of that tile for k-step j (a token's 16 values at bytes 32j-32j+31 of its row, through the swizzle), the weights' A
fragments from the tile layout (a_fragments, emulated as in test_nf4_gemm_mapping), a warpgroup's 64 x 16 A assembled
from its 4 warps as for m16n8k16, and the accumulator registers' (weight row, token) of the epilogue. The result must
be x @ W^T with W dequantized and rounded to bf16."""

from __future__ import annotations

import torch

from server.kernels.nf4.nf4_ops import nf4_dequantize_reference
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


def _store_stage(x: torch.Tensor, blk: int, last: int, tokens: int, stage_blocks: int) -> dict[int, torch.Tensor]:
    """load_x + store_x of a stage (nf4_wgmma_kernel with KB = stage_blocks): chunk q of the stage is token row
    (q >> 3) % BM, chunk q & 7 of quant block min(blk + q / (BM * 8), last - 1), stored into the stage's tile
    q / (BM * 8) (BM * 128 bytes each), as {physical 32-bit word of the buffer: its two values}."""
    words = {}
    for thread in range(THREADS):
        for i in range(stage_blocks * tokens * 8 // THREADS):  # CHUNKS
            q = thread + i * THREADS
            row, c = (q >> 3) % tokens, q & 7
            block = blk if stage_blocks == 1 else min(blk + q // (tokens * 8), last - 1)
            chunk_values = x[row, 64 * block + 8 * c:64 * block + 8 * c + 8]
            tile = 0 if stage_blocks == 1 else q // (tokens * 8) * tokens * 128
            for w in range(4):
                chunk = 4 * (c & 1) + w
                address = tile + row * 128 + ((chunk ^ (row & 7)) << 4) + 4 * (c >> 1)
                assert address // 4 not in words  # no word written twice
                words[address // 4] = chunk_values[2 * w:2 * w + 2]
    return words


def test_a_two_block_stage_stages_each_block_as_its_own_tile():
    """Two quant blocks a stage: the stage's buffer holds block blk's tile and then block blk + 1's, each exactly as a
    one-block stage stores it (so the same descriptors, offset by a tile, read the same B); a split's odd last block
    re-reads itself into the second tile (whose wgmmas the kernel skips)."""
    tokens, in_features = 32, 64 * 5
    x = torch.randn(tokens, in_features).to(torch.bfloat16)
    tile_words = tokens * 32
    for blk, last in ((0, 5), (2, 5), (4, 5)):
        stage = _store_stage(x, blk, last, tokens, 2)
        assert len(stage) == 2 * tile_words
        for kb in range(2):
            one = _store_stage(x, min(blk + kb, last - 1), last, tokens, 1)
            single = _store_x(x, min(blk + kb, last - 1), tokens)  # the one-block staging the first test checks
            assert one.keys() == single.keys() and all(torch.equal(one[w], single[w]) for w in one)
            for word, values in one.items():
                assert torch.equal(stage[kb * tile_words + word], values)

