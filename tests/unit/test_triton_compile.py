"""The engine's Triton kernels compiled for the H100/H200 (sm_90) on the CPU, no GPU needed: Triton's front end,
its GPU passes and ptxas reject what the interpreter runs happily (a variable whose shape changes across a branch,
a helper called with one argument too many: a GPU call of the twenty-second session was lost to each). Opt-in with
LORAPLEX_TRITON_COMPILE=1 (`make test-triton` sets it; it needs triton installed and must run without
TRITON_INTERPRET, which turns @triton.jit functions into interpreted ones). Variants are the ones the engine
launches: each constexpr branch that it takes at least once."""

from __future__ import annotations

import os

import pytest

from bench.triton_sm90 import DECODE_META, DELTA_META, FUSED_ACT_META, LORA_META, SHRINK_META

pytestmark = pytest.mark.skipif(os.environ.get("LORAPLEX_TRITON_COMPILE") != "1",
                                reason="set LORAPLEX_TRITON_COMPILE=1 to compile the Triton kernels for sm_90")

def compile_sm90(fn, constexprs: dict, types: dict | None = None, num_warps: int = 4):
    """bench.triton_sm90.compile_sm90, skipped where Triton runs interpreted or is absent, and checked to reach a
    cubin (ptxas took the PTX)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("Triton runs interpreted in this process")
    pytest.importorskip("triton")
    from bench.triton_sm90 import compile_sm90 as compile_for_sm90

    kernel = compile_for_sm90(fn, constexprs, types, num_warps)
    assert kernel.asm["cubin"]
    return kernel


@pytest.fixture(scope="module")
def modules():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("Triton runs interpreted in this process")
    pytest.importorskip("triton")
    from server.kernels import triton_step_inputs
    from server.kernels.attention import triton_attention, triton_prefill_attention
    from server.kernels.glue import triton_glue
    from server.kernels.lora import triton_lora, triton_lora_decode
    from server.kernels.nf4 import triton_nf4
    from server.kernels.sampling import triton_argmax

    return {"attention": triton_attention, "glue": triton_glue, "lora": triton_lora, "lora_decode": triton_lora_decode,
            "nf4": triton_nf4,
            "prefill": triton_prefill_attention, "argmax": triton_argmax, "fill": triton_step_inputs}


DECODE_TYPES = {"block_tables_ptr": "*i32", "context_lens_ptr": "*i32", "acc_ptr": "*fp32", "stats_ptr": "*fp32",
                "rope_ptr": "*fp32", "slot_ptr": "*i64"}


@pytest.mark.parametrize("head_dim,splits,rotary,sums,delta", [
    (128, 1, False, False, False), (128, 8, True, False, False), (64, 1, True, True, False),
    (128, 4, False, False, False), (128, 2, True, True, True)])
def test_decode_attention(modules, head_dim, splits, rotary, sums, delta):
    types = DECODE_TYPES | ({"src_ptr": "*fp32"} if sums else {}) | ({"delta_ptr": "*fp32"} if delta else {})
    compile_sm90(modules["attention"]._decode_kernel, {
        "HEAD_DIM": head_dim, "BLOCK_SIZE": 16, "BLOCK_H": 16, "TILE_N": 64, "NUM_SPLITS": splits,
        "DOT_PRECISION": "tf32", "ROTARY": rotary, "SUMS": sums, "HAS_BIAS": sums, "HAS_DELTA": delta,
        "MOST_SPLITS": 3 if sums else 16, "FRESH_KV": rotary and head_dim == 128, "PDL": splits > 1}, types, 8)
    if splits > 1:
        compile_sm90(modules["attention"]._merge_splits_kernel,
                     {"HEAD_DIM": head_dim, "NUM_SPLITS": splits, "BLOCK_S": splits, "PDL": True},
                     {"acc_ptr": "*fp32", "stats_ptr": "*fp32"})


def test_prefill_attention(modules):
    ints = {name: "*i32" for name in ("tables_ptr", "tile_seq_ptr", "tile_row_ptr", "q_start_ptr", "q_len_ptr",
                                      "ctx_len_ptr")}
    compile_sm90(modules["prefill"]._prefill_kernel, {"HEAD_DIM": 128, "BLOCK_SIZE": 16, "BLOCK_M": 64,
                                                      "BLOCK_N": 64, "UPCAST_DOT": False, "DOT_PRECISION": "tf32"},
                 ints, 8)


@pytest.mark.parametrize("has_add,gather,sums", [(True, False, False), (False, False, False), (False, True, False),
                                                (True, False, True)])
def test_norms(modules, has_add, gather, sums):
    compile_sm90(modules["glue"]._add_rmsnorm_kernel,
                 {"HAS_ADD": has_add, "GATHER": gather, "SUMS": sums, "HAS_BIAS": sums, "BLOCK": 4096, "PDL": has_add},
                 {"ids_ptr": "*i64"} | ({"delta_ptr": "*fp32"} if sums else {}))


@pytest.mark.parametrize("sums,delta", [(False, False), (True, False), (True, True)])
def test_activation_and_rotary(modules, sums, delta):
    deltas = {"delta_ptr": "*fp32"} if delta else {}
    partials = ({"gu_ptr": "*fp32"} if sums else {}) | deltas
    for most in (16, 3) if sums else (16,):  # the count read at run time, or compiled in
        compile_sm90(modules["glue"]._silu_mul_kernel,
                     {"BLOCK": 256, "SUMS": sums, "HAS_BIAS": sums, "MOST_SPLITS": most, "HAS_DELTA": delta,
                      "HAS_LORA": False, "BLOCK_R": 16, "SHRINK": False, "BLOCK_R2": 16, "PDL": sums},
                     partials)
    if not delta:  # gate_up's pending LoRA delta (LORAPLEX_LORA_FUSED_ACT), on the base output or its partials
        compile_sm90(modules["glue"]._silu_mul_kernel,
                     {"BLOCK": 1024, "SUMS": sums, "HAS_BIAS": False, "MOST_SPLITS": 16 if sums else 1,
                      "HAS_DELTA": False, "HAS_LORA": True, "BLOCK_R": 32, "SHRINK": False, "BLOCK_R2": 16,
                      "PDL": sums},
                     partials | FUSED_ACT_META)
        # and down_proj's shrink of the result (LORAPLEX_LORA_SILU_SHRINK), at the one-row launch's 256 columns
        compile_sm90(modules["glue"]._silu_mul_kernel,
                     {"BLOCK": 256, "SUMS": sums, "HAS_BIAS": False, "MOST_SPLITS": 16 if sums else 1,
                      "HAS_DELTA": False, "HAS_LORA": True, "BLOCK_R": 16, "SHRINK": True, "BLOCK_R2": 32,
                      "PDL": True},
                     partials | FUSED_ACT_META | SHRINK_META, 1)
    compile_sm90(modules["glue"]._rotary_write_kv_kernel,
                 {"NUM_Q_HEADS": 32, "NUM_KV_HEADS": 8, "HALF": 64, "SUMS": sums, "HAS_BIAS": sums,
                  "HAS_DELTA": delta},
                 {"rope_ptr": "*fp32", "slot_ptr": "*i64"} | ({"src_ptr": "*fp32"} if sums else {}) | deltas, 1)


@pytest.mark.parametrize("tiled", [False, True])
def test_step_inputs_fill(modules, tiled):
    tile_type = "*i32" if tiled else "*i64"
    compile_sm90(modules["fill"]._fill_kernel, {"BLOCK": 128}, {
        "values_ptr": "*i64", "ids_ptr": "*i64", "positions_ptr": "*i64", "slots_ptr": "*i64",
        "context_ptr": "*i32", "lora_ptr": "*i32", "tables_ptr": "*i32", "logit_ptr": "*i64",
        "starts_ptr": tile_type, "tile_slots_ptr": tile_type}, 1)


def test_greedy_argmax(modules):
    compile_sm90(modules["argmax"]._part_argmax_kernel, {"BLOCK": modules["argmax"].BLOCK},
                 {"part_value_ptr": "*fp32", "part_at_ptr": "*i32"}, 16)
    compile_sm90(modules["argmax"]._merge_argmax_parts_kernel, {"PARTS": modules["argmax"].PARTS},
                 {"part_value_ptr": "*fp32", "part_at_ptr": "*i32", "out_ptr": "*i64"}, 1)




@pytest.mark.parametrize("block_m,atomic", [(1, False), (16, True), (1, True)])
def test_lora_shrink(modules, block_m, atomic):
    compile_sm90(modules["lora"]._shrink_kernel, {"BLOCK_M": block_m, "BLOCK_N": 16, "BLOCK_K": 128,
                                                  "ATOMIC": atomic, "DOT_PRECISION": "tf32", "PDL": atomic},
                 LORA_META)


@pytest.mark.parametrize("block_m,slices", [(1, 3), (16, 1), (16, 2)])
def test_lora_expand(modules, block_m, slices):
    compile_sm90(modules["lora"]._expand_kernel, {"BLOCK_M": block_m, "BLOCK_N": 64, "BLOCK_R": 16,
                                                  "NUM_SLICES": slices, "DOT_PRECISION": "tf32",
                                                  "PDL": slices == 2}, LORA_META)


@pytest.mark.parametrize("one_row", [False, True])
def test_lora_expand_with_split_sums(modules, one_row):
    compile_sm90(modules["lora_decode"]._expand_sums_kernel, {"BLOCK_N": 64, "BLOCK_R": 16, "NUM_SLICES": 3,
                                                       "HAS_BIAS": True, "DOT_PRECISION": "tf32",
                                                       "ONE_ROW": one_row, "PDL": one_row},
                 DECODE_META)


@pytest.mark.parametrize("slices,one_row", [(2, False), (3, False), (2, True)])
def test_lora_side_delta(modules, slices, one_row):
    compile_sm90(modules["lora_decode"]._lora_delta_kernel, {"BLOCK_N": 256, "BLOCK_R": 16, "NUM_SLICES": slices,
                                                 "DOT_PRECISION": "tf32", "ONE_ROW": one_row, "PDL": one_row},
                 DELTA_META)


@pytest.mark.parametrize("sums,bias", [(False, False), (True, False), (True, True)])
def test_lora_add_delta(modules, sums, bias):
    compile_sm90(modules["lora_decode"]._lora_add_delta_kernel, {"BLOCK_N": 256, "SUMS": sums, "HAS_BIAS": bias,
                                                                     "PDL": sums},
                 {"src_ptr": "*fp32" if sums else "*bf16", "delta_ptr": "*fp32"})


@pytest.mark.parametrize("split", [1, 4])
def test_nf4_matmul(modules, split):
    compile_sm90(modules["nf4"]._nf4_matmul_kernel, {
        "HAS_BIAS": True, "WRITE_PARTIAL": split > 1, "UPCAST_DOT": False, "BLOCK_T": 16, "BLOCK_N": 64,
        "K_GROUPS": 2, "SPLIT_K": split}, {"words_ptr": "*i32", "absmax_ptr": "*fp32", "table_ptr": "*fp32"}
        | ({"out_ptr": "*fp32"} if split > 1 else {}))


def test_decode_lora_variants_report_their_registers():
    """bench.triton_sm90's report: every decode LoRA launch compiles, and its cubin gives a register count that
    bounds the programs an SM holds (a cubin format without EIATTR_REGCOUNT would read None and fail here)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("Triton runs interpreted in this process")
    pytest.importorskip("triton")
    from bench.triton_sm90 import compile_sm90 as compile_for_sm90
    from bench.triton_sm90 import lora_decode_variants, resources

    for label, fn, constexprs, types, num_warps, spec in lora_decode_variants():
        found = resources(compile_for_sm90(fn, constexprs, types, num_warps, **spec), num_warps)
        assert 16 <= found["registers"] <= 255, label
        assert 1 <= found["programs_per_sm"] <= 64 // num_warps, label
        if label.startswith("expand") and "one row" in label:  # LORAPLEX_LORA_ONE_ROW: the rank sum within a thread
            assert found["shared_bytes"] == 0 and found["registers"] <= 128, (label, found)
        if label.startswith("activation") and "down's shrink" not in label:  # gate's and up's B in flight together:
            assert found["shared_bytes"] == 0, (label, found)  # 153 registers, within a thread
        if "down's shrink" in label:  # its rank sums cross the program's threads: a few words of shared memory
            assert found["shared_bytes"] <= 256, (label, found)
