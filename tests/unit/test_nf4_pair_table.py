"""The byte-pair table (server/kernels/nf4/csrc/nf4_device.cuh: stage_pair_table, pair_offset, load_pair_at), emulated
on the CPU before any GPU runs it: the bytes stage_pair_table writes, the addresses a lane's byte permute gives, and the
shared-memory banks a half-warp's 8-byte loads touch. Every byte value must read back its two codes (high nibble
first), from the lane's own copy, and no load of a half-warp may meet a bank conflict, whatever bytes it reads."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[2] / "server" / "kernels" / "nf4" / "csrc"
CODES = [float(i) / 16 - 0.5 for i in range(16)]  # any 16 distinct values


def _constants() -> dict[str, int]:
    """kPairCopies, kPairTableBytes and the table's offset in the shared window (kPairsTableWindow) as nf4_device.cuh
    defines them, and the byte permutes' selectors."""
    text = (CSRC / "nf4_device.cuh").read_text()
    window = re.search(r"kPairsTableWindow = (0x[0-9a-fA-F]+);", text).group(1)
    copies = int(re.search(r"constexpr int kPairCopies = (\d+);", text).group(1))
    span = re.search(r"constexpr int kPairTableBytes = (.+?);", text).group(1).replace("kPairCopies", str(copies))
    selectors = re.findall(r"__byte_perm\(word, (?:copy_off|pair_reg), (0x[0-9a-f]+)u \|", text)
    return {"copies": copies, "span": eval(span, {}), "selectors": [int(s, 16) for s in selectors],  # noqa: S307
            "window": int(window, 16)}


def byte_perm(x: int, y: int, selector: int) -> int:
    """CUDA's __byte_perm: result byte n is byte (selector >> 4n) & 7 of the 8 bytes y:x."""
    pool = (y << 32 | x).to_bytes(8, "little")
    return int.from_bytes(bytes(pool[(selector >> 4 * n) & 7] for n in range(4)), "little")


def _staged(copies: int, span: int, threads: int) -> dict[int, float]:
    """stage_pair_table: {byte address of an fp32 word: its value}, from every thread's 16-byte stores."""
    words = {}
    for tid in range(threads):
        for i in range(tid, 256 * copies // 2, threads):
            v = i // (copies // 2)
            base = 256 * v + 16 * (i % (copies // 2))
            for k, value in enumerate((CODES[v >> 4], CODES[v & 15]) * 2):
                assert base + 4 * k not in words and base + 4 * k < span
                words[base + 4 * k] = value
    return words


def test_the_table_reads_back_each_bytes_two_codes_from_the_lanes_own_copy():
    const = _constants()
    assert const["selectors"] == [0x5504, 0x7604]  # pair_offset (copy offset), load_pair_at (window | copy offset)
    words = _staged(const["copies"], const["span"], threads=1024)
    assert len(words) == 256 * const["copies"] * 2  # every copy of every value, once
    window = const["window"]
    assert window % 0x10000 == 0 and window >= 0x10000  # 64 KB-aligned: bytes 2-3 of an address, not 0-1
    for lane in range(32):
        copy_off = 8 * (lane & (const["copies"] - 1))  # pair_copy_offset
        for v in range(256):
            for b in range(4):
                word = random.Random(v * 4 + b).getrandbits(32) & ~(0xFF << 8 * b) | v << 8 * b
                for selector, reg, base in ((0x5504, copy_off, 0), (0x7604, window | copy_off, window)):
                    address = byte_perm(word, reg, selector | b << 4) - base
                    assert address == 256 * v + copy_off
                    assert (words[address], words[address + 4]) == (CODES[v >> 4], CODES[v & 15])


@pytest.mark.parametrize("seed", range(20))
def test_a_half_warps_loads_touch_32_distinct_banks(seed):
    """An 8-byte load is served a half-warp at a time: its 16 lanes read copies 0-15 at 256 v + 8 c, banks 2c and
    2c + 1 whatever the values v (random bytes here: broadcasts aside, one wavefront needs distinct banks)."""
    rng = random.Random(seed)
    copies = _constants()["copies"]
    for half in (0, 1):
        banks = set()
        for lane in range(16 * half, 16 * half + 16):
            address = 256 * rng.randrange(256) + 8 * (lane & (copies - 1))
            banks |= {(address // 4) % 32, (address // 4 + 1) % 32}
        assert len(banks) == 32
