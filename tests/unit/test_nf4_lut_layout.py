"""The lut layout the CUDA lut kernel streams (nf4_layout.lut_pack), decoded on the CPU the way the kernel
reads it (csrc/nf4_lut.cuh): chunks, lanes, macro steps and padding, then the kernel's register tables and
byte-permute lookups emulated bit for bit. Each must give back exactly the reference weight."""

from __future__ import annotations

import pytest
import torch

from server.model.nf4_layout import lut_layout_sizes, lut_pack
from server.model.nf4_ops import nf4_dequantize_reference

TABLE = torch.linspace(-1, 1, 16)


def _prmt(a: int, b: int, sel: int) -> int:
    """PTX prmt.b32 in its plain mode, for selectors whose nibbles have bit 3 clear."""
    source = (a & 0xFFFFFFFF) | (b & 0xFFFFFFFF) << 32
    out = 0
    for n in range(4):
        index = sel >> 4 * n & 0xF
        assert index < 8, "the kernel never asks prmt to replicate a sign"
        out |= (source >> 8 * index & 0xFF) << 8 * n
    return out


def _bf16_bits(values: list[float]) -> list[int]:
    return [int(v) & 0xFFFF for v in torch.tensor(values, dtype=torch.float32).to(torch.bfloat16).view(torch.int16)]


def _table_registers(scale: float) -> tuple[list[int], list[int]]:
    """build_table: the 16 scaled values, packed in pairs, split into low-byte and high-byte registers."""
    products = (TABLE * torch.tensor(scale, dtype=torch.float32)).tolist()  # fp32 products, as the kernel
    bits = _bf16_bits(products)
    lo, hi = [], []
    for r in range(4):
        p0 = bits[4 * r] | bits[4 * r + 1] << 16
        p1 = bits[4 * r + 2] | bits[4 * r + 3] << 16
        lo.append(_prmt(p0, p1, 0x6420))
        hi.append(_prmt(p0, p1, 0x7531))
    return lo, hi


def _lookup_word(word: int, lo: list[int], hi: list[int]) -> list[int]:
    """lookup_word: four registers of two bf16 each, (high nibble's value, low nibble's value) per byte."""
    sel7, pick = word & 0x77777777, (word >> 1 & 0x44444444) | 0x32103210
    out = []
    for shift in (0, 16):
        s7, p = sel7 >> shift & 0xFFFF, pick >> shift & 0xFFFF
        low = _prmt(_prmt(lo[0], lo[1], s7), _prmt(lo[2], lo[3], s7), p)
        high = _prmt(_prmt(hi[0], hi[1], s7), _prmt(hi[2], hi[3], s7), p)
        out += [_prmt(low, high, 0x4051), _prmt(low, high, 0x6273)]
    return out


def _decode_as_kernel(codes: torch.Tensor, scales: torch.Tensor, shape, emulate_lookup: bool) -> torch.Tensor:
    """Dense [out, in] from the lut layout, lane by lane: lane 4g + t of (tile, macro) holds 4 x 16 bytes
    (row g's 32 bytes of block 4 * macro + t, then row g + 8's) and the two rows' scales; byte i covers
    k = 64 * block + 2i (high nibble) and + 1. With emulate_lookup the values come through the kernel's
    register tables (bf16 bits), else straight from TABLE * scale in float32."""
    out_features, in_features = shape
    tiles, macros = -(-out_features // 16), -(-(in_features // 64) // 4)
    dense = torch.full((tiles * 16, macros * 256), float("nan"))
    chunks = codes.view(tiles, macros, 4, 32, 16)
    pairs = scales.view(tiles, macros, 32, 2)
    for tile in range(tiles):
        for macro in range(macros):
            for lane in range(32):
                g, t = divmod(lane, 4)
                k0 = 64 * (4 * macro + t)
                for h in range(2):
                    row, scale = tile * 16 + g + 8 * h, float(pairs[tile, macro, lane, h])
                    block_bytes = torch.cat([chunks[tile, macro, 2 * h + c, lane] for c in range(2)]).tolist()
                    if emulate_lookup:
                        lo, hi = _table_registers(scale)
                        for v in range(8):
                            word = int.from_bytes(bytes(block_bytes[4 * v:4 * v + 4]), "little")
                            for i, reg in enumerate(_lookup_word(word, lo, hi)):
                                for half in range(2):  # register i: byte 4v + i, its two elements
                                    bits = torch.tensor([reg >> 16 * half & 0xFFFF], dtype=torch.int32)
                                    value = bits.to(torch.int16).view(torch.bfloat16).float()
                                    dense[row, k0 + 8 * v + 2 * i + half] = value
                    else:
                        for i, byte in enumerate(block_bytes):
                            dense[row, k0 + 2 * i] = TABLE[byte >> 4] * scale
                            dense[row, k0 + 2 * i + 1] = TABLE[byte & 0xF] * scale
    assert not dense.isnan().any(), "every element of every padded tile and macro step is written exactly once"
    assert (dense[out_features:] == 0).all() and (dense[:, in_features:] == 0).all(), "padding is zero"
    return dense[:out_features, :in_features]


def _weight(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    numel = shape[0] * shape[1]
    codes = torch.randint(0, 256, (numel // 2, 1), dtype=torch.uint8, generator=gen)
    absmax = torch.rand(numel // 64, generator=gen) + 0.5
    return codes, absmax


@pytest.mark.parametrize("shape", [(16, 256), (37, 192), (20, 576)], ids=str)
def test_lut_layout_decodes_to_the_reference_weight(shape):
    codes, absmax = _weight(shape, shape[0] * 131 + shape[1])
    lut_codes, lut_scales = lut_pack(codes, absmax, shape)
    assert (lut_codes.numel(), lut_scales.numel()) == lut_layout_sizes(shape)
    expected = nf4_dequantize_reference(codes, absmax, shape, TABLE)
    assert torch.equal(_decode_as_kernel(lut_codes, lut_scales, shape, emulate_lookup=False), expected)


def test_lut_register_tables_give_the_rounded_reference_values():
    """The byte-permute lookups of the kernel, emulated: every weight equals round_to_bf16(code * absmax)."""
    shape = (16, 320)  # five quant blocks: the second macro step is padded
    codes, absmax = _weight(shape, 7)
    lut_codes, lut_scales = lut_pack(codes, absmax, shape)
    expected = nf4_dequantize_reference(codes, absmax, shape, TABLE).to(torch.bfloat16).float()
    assert torch.equal(_decode_as_kernel(lut_codes, lut_scales, shape, emulate_lookup=True), expected)


def test_lut_pack_in_place_keeps_the_buffers():
    shape = (37, 192)
    codes, absmax = _weight(shape, 3)
    buffers = tuple(torch.full((n,), 7, dtype=d) for n, d in zip(lut_layout_sizes(shape), (torch.uint8, torch.float32),
                                                                  strict=True))
    pointers = [b.data_ptr() for b in buffers]
    result = lut_pack(codes, absmax, shape, out=buffers)
    assert [b.data_ptr() for b in result] == pointers
    fresh = lut_pack(codes, absmax, shape)
    assert torch.equal(result[0], fresh[0]) and torch.equal(result[1], fresh[1])
