"""nf4_gemm_kernel's fragment mapping (server/kernels/nf4/csrc/nf4_gemm.cuh), emulated lane by lane on the CPU before
any GPU runs it: x as the MMA's A operand from each lane's 16-byte loads, the weights as its B operand from the
registers a_fragments fills out of the tile layout (nf4_layout.tile_pack), the m16n8k16 MMA by its PTX fragment
definitions, and the epilogue's (token, weight row) of every C register. The result must be x @ W^T with W dequantized
and rounded to bf16, in fp32."""

from __future__ import annotations

import torch

from server.kernels.nf4.nf4_layout import tile_pack
from server.kernels.nf4.nf4_ops import nf4_dequantize_reference

MT, NT = 4, 2  # GEMM_MT, GEMM_NT of csrc/nf4_gemm.cuh


def _bf16(value: torch.Tensor) -> torch.Tensor:
    return value.to(torch.bfloat16).float()


def _weight_regs(codes, scales, table, tile, blk, num_blocks, lane, half):
    """a_fragments' registers of one lane: [jj][4] pairs (element of the lower half, of the upper half)."""
    g = lane // 4
    base = (tile * num_blocks + blk) * 512 + lane * 16
    row_g, row_g8 = codes[base:base + 8], codes[base + 8:base + 16]  # words x, y of row g; z, w of row g + 8
    s = scales[(tile * num_blocks + blk) * 16 + 2 * g:(tile * num_blocks + blk) * 16 + 2 * g + 2]

    def pair(row_bytes, index, scale):
        byte = int(row_bytes[4 * half + index])
        return _bf16(table[byte >> 4] * scale), _bf16(table[byte & 15] * scale)

    return [[pair(row_g, 2 * jj, s[0]), pair(row_g8, 2 * jj, s[1]), pair(row_g, 2 * jj + 1, s[0]),
             pair(row_g8, 2 * jj + 1, s[1])] for jj in range(2)]


def _x_regs(x, tok, blk, t, half):
    """The lane's uint4 `half` of its 32 bytes of a quant block: 4 words of 2 values, k = 64 blk + 16 t + 8 half + .."""
    k0 = 64 * blk + 16 * t + 8 * half
    return [(x[tok, k0 + 2 * w], x[tok, k0 + 2 * w + 1]) for w in range(4)]


def place_a(a: torch.Tensor, row0: int, lane: int, regs) -> None:
    """One lane's A registers (a0-a3, pairs of values) into rows row0-row0 + 15 of A as PTX defines m16n8k16's A (and
    each warp's 16 rows of a wgmma's register A)."""
    g, t = lane // 4, lane % 4
    a0, a1, a2, a3 = regs
    a[row0 + g, 2 * t:2 * t + 2] = torch.stack(a0)
    a[row0 + g + 8, 2 * t:2 * t + 2] = torch.stack(a1)
    a[row0 + g, 2 * t + 8:2 * t + 10] = torch.stack(a2)
    a[row0 + g + 8, 2 * t + 8:2 * t + 10] = torch.stack(a3)


def _mma(d, a_regs, b_regs):
    """d [16, 8] += A @ B, A and B assembled from every lane's registers as PTX defines m16n8k16 (row.col)."""
    a, b = torch.zeros(16, 16), torch.zeros(16, 8)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        place_a(a, 0, lane, a_regs[lane])
        b0, b1 = b_regs[lane]
        b[2 * t:2 * t + 2, g] = torch.stack(b0)
        b[2 * t + 8:2 * t + 10, g] = torch.stack(b1)
    d += a.double().matmul(b.double()).float()


def random_layer(out_features: int, in_features: int, tokens: int):
    """Random NF4 codes and scales of an [out, in] weight in the tile layout, a table of values bf16 cannot hold (the
    rounding after the scale shows), and bf16 x: (codes, absmax, table, x, tile_codes, tile_scales)."""
    torch.manual_seed(0)
    codes = torch.randint(0, 256, (out_features * in_features // 2, 1), dtype=torch.uint8)
    absmax = torch.rand(out_features * in_features // 64) + 0.5
    table = torch.linspace(-1.0, 1.0, 16) * 1.37
    x = _bf16(torch.randn(tokens, in_features))
    return (codes, absmax, table, x, *tile_pack(codes, absmax, (out_features, in_features)))


def test_one_warps_gemm_tile_is_x_times_the_dequantized_weight():
    out_features, in_features, tokens = 16 * NT, 128, 16 * MT
    shape = (out_features, in_features)
    codes, absmax, table, x, tile_codes, tile_scales = random_layer(out_features, in_features, tokens)
    num_blocks = in_features // 64

    acc = torch.zeros(MT, NT, 2, 16, 8)  # [token tile][weight tile][rows 0-7 / 8-15][C as a 16 x 8 matrix]
    for blk in range(num_blocks):
        for half in range(2):
            w = [[_weight_regs(tile_codes, tile_scales, table, r, blk, num_blocks, lane, half) for lane in range(32)]
                 for r in range(NT)]
            xr = [[[_x_regs(x, 16 * mt + 8 * h + lane // 4, blk, lane % 4, half) for h in range(2)]
                   for lane in range(32)] for mt in range(MT)]
            for jj in range(2):
                for mt in range(MT):
                    # a0 = jj ? z : x and a2 = jj ? w : y of the row-g load; a1, a3 of the row-g+8 load
                    a_regs = [(xr[mt][lane][0][2 * jj], xr[mt][lane][1][2 * jj], xr[mt][lane][0][2 * jj + 1],
                               xr[mt][lane][1][2 * jj + 1]) for lane in range(32)]
                    for r in range(NT):
                        _mma(acc[mt, r, 0], a_regs, [(w[r][lane][jj][0], w[r][lane][jj][2]) for lane in range(32)])
                        _mma(acc[mt, r, 1], a_regs, [(w[r][lane][jj][1], w[r][lane][jj][3]) for lane in range(32)])

    out = torch.full((tokens, out_features), float("nan"))
    for lane in range(32):  # the epilogue: C register i of each lane to its (token, weight row)
        g, t = lane // 4, lane % 4
        for mt in range(MT):
            for r in range(NT):
                for h8 in range(2):
                    for i in range(4):
                        tok = 16 * mt + g + (8 if i >= 2 else 0)
                        row = r * 16 + 8 * h8 + 2 * t + (i & 1)
                        out[tok, row] = acc[mt, r, h8, g + (8 if i >= 2 else 0), 2 * t + (i & 1)]
    weight = _bf16(nf4_dequantize_reference(codes, absmax, shape, table))
    want = x.double() @ weight.double().t()
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
