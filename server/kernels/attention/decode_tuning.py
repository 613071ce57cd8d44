"""The decode attention's launch choices (server.kernels.attention.triton_attention): how many splits a row's context
takes, and the kernel's tuning (DECODE_TUNING, overridable in the engine by LORAPLEX_DECODE_TUNING for A/B timing). No
Triton here: the choices are plain values, read when a launch is built."""

from __future__ import annotations

import os

from server.kernels.launch_overrides import launch_overrides

_NUM_SMS = 132  # H100; only steers the split heuristic


# Least cache positions a split may cover: one loop iteration. H200, batch 1, context 192 (3 tiles), Hkv 8: one
# split 6.91 us (8 programs, the three tiles one after another); 8 splits with the merge kernel 5.45 (thirteenth
# session; 512 before, which left batch 1 unsplit below 1,024 positions of block table).
MIN_SPLIT_POSITIONS = 64


def choose_num_splits(num_rows: int, num_kv_heads: int, max_blocks: int, block_size: int) -> int:
    """Split each row's context when rows x kv heads leave SMs idle and contexts can be long."""
    programs = num_rows * num_kv_heads
    max_by_length = max(1, (max_blocks * block_size) // MIN_SPLIT_POSITIONS)
    return max(1, min(16, max_by_length, (2 * _NUM_SMS) // max(programs, 1)))


# Launch choices of the decode kernel; tests/gpu/test_triton_kernels.py
# (test_decode_attention_tunings_at_the_engine_shapes, -s) checks and times the others. tile_n: cache positions a loop
# iteration takes; num_stages: Triton's software pipelining depth of that loop (None: Triton's default, 3). H200, Hq 32,
# Hkv 8, D 128 (thirteenth session, graph replay, us): 8 warps against 4: batch 1 at context 192 6.15 / 6.91, batch 32
# at 192 8.60 / 9.10, at 1,024 42.95 / 47.93, batch 2 at 4,096 15.55 / 15.70; V's load issued after the softmax instead
# of beside K's changed nothing (Triton's pipeliner already issues both loads early: one stage 7.47 / 9.77 / 55.37 /
# 19.78; the choice, v_first, was removed in the fiftieth session); tiles of 32 lost everywhere without splits. Measured
# and dropped (twenty-second session, H200, 8B batch 1, context 192, graph replay): the splits merged by the decode
# kernel's last program of each (row, kv head) (a ticket counter a pair) instead of the merge kernel: 6.48 against 6.30
# us with the rotary fused in, 8.31 against 7.15 without.
# fresh_kv (rotary only): the row's new k and v taken from registers instead of read back from the cache (the kernel's
# FRESH_KV), so the tiles' loads do not wait for the rotary prologue's store and barrier. Off
# (LORAPLEX_DECODE_FRESH_KV=1): timed on an H100 (forty-fourth session, 8B shapes, graph replay) it won at batch 1 (7.50
# -> 6.63 us) and lost at 32 (9.18 -> 10.19; 1B 7.01 -> 9.26), and the 8B engine bench moved within its spread (batch 1
# 366.7 / 367.5 tokens/s, merged batch-32 step 3.667 / 3.676 ms with LORAPLEX_PDL_LORA=1 beside it).
# maxnreg: registers a thread at most (ptxas spills past them; None: its choice). At 8 warps the kernel took 194-202
# registers when this was written (an SM held one program: batch 32's 256 programs in two waves over 132 SMs); ncu
# counted 98 in the fiftieth session (two programs an SM, one wave). Timed with each of the 32 layers' caches and
# partials cold, as a step meets them (H200, 8B batch 32, forty-sixth session,
# test_rotary_decode_attention_choices_with_each_layer_cold -s, us a layer): the default 12.43, maxnreg 128 12.80, 4
# warps 12.84, tile_n 32 17.24, fresh_kv 13.26, two splits 16.25: the defaults stay.
# Measured slower and removed (fiftieth session, H100, design in ff7cf0a): kv_pack, two or four adjacent kv heads a
# program (128 or 64 programs, one wave; each tile's rows 512 or 1,024 contiguous bytes; each q row's dots over every
# head's dims with the other heads' q dims zero, the same attention): each layer cold, us a layer, default 14.04, two
# heads 21.75 (num_stages 1 16.72, 2 17.38, 4 warps 17.64, tile_n 32 17.19), four heads 30.93; the 8B engine's merged
# batch-32 step 3.983 against 3.672 ms. The time follows a program's bytes, not the waves.
# Measured slower and removed (2026-12-07; design in 94b1e42): early_tile (the first tile loaded before the PDL wait)
# and prefetch (the next positions' k and v lines asked of the L2 there). H200 8B batch-32 step: both 3.428 ms, default
# 3.382. H100 merged batch-32 step profile, GPU time: default 5.999 ms, early_tile 6.002, prefetch=128 6.011 (attention
# 0.770, 0.794, 0.811 ms a step).
DECODE_TUNING = {"tile_n": 64, "num_stages": None, "num_warps": 8, "maxnreg": None,
                 "fresh_kv": os.environ.get("LORAPLEX_DECODE_FRESH_KV", "0") == "1"}


def tuning_overrides(text: str) -> dict:
    """DECODE_TUNING entries from "name=value,..." (LORAPLEX_DECODE_TUNING, for engine A/Bs of the launch choices:
    the tests time them on one layer's inputs, whose cache sits in L2, where a step reads each layer's from DRAM)."""
    return launch_overrides(text, DECODE_TUNING, "LORAPLEX_DECODE_TUNING", nullable=("num_stages", "maxnreg"))


DECODE_TUNING.update(tuning_overrides(os.environ.get("LORAPLEX_DECODE_TUNING", "")))
