"""bench.sass_loops on a hand-written cuobjdump excerpt: the kernels split by name, predicates and modifiers dropped
from opcodes, and a loop as the instructions from a backward branch's target to the branch."""

from __future__ import annotations

from bench import sass_loops

SASS = """
        Function : _Z1kv
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDS.64 R2, [R4+UR4] ;
        /*0020*/                   FMUL.FTZ R5, R2, R3 ;
        /*0030*/               @!P0 HMMA.16816.F32.BF16 R8, R4, R6, R8 ;
        /*0040*/               @P1 BRA 0x10 ;
        /*0050*/                   BRA 0x60 ;
        /*0060*/                   EXIT ;
        Function : _Z1gv
        /*0000*/                   EXIT ;
"""


def test_kernels_split_by_name_and_opcodes_lose_predicates_and_modifiers():
    found = sass_loops.kernels(SASS)
    assert list(found) == ["_Z1kv", "_Z1gv"]
    assert [sass_loops.opcode(text) for _, text in found["_Z1kv"]] == ["MOV", "LDS", "FMUL", "HMMA", "BRA", "BRA",
                                                                        "EXIT"]


def test_a_loop_runs_from_a_backward_branchs_target_to_the_branch():
    (start, end, ops), = sass_loops.loops(sass_loops.kernels(SASS)["_Z1kv"])  # the forward branch is no loop
    assert (start, end) == (0x10, 0x40)
    assert ops == {"LDS": 1, "FMUL": 1, "HMMA": 1, "BRA": 1}


def test_a_loops_sequence_keeps_program_order():
    instructions = sass_loops.kernels(SASS)["_Z1kv"]
    assert sass_loops.sequence(instructions, 0x10, 0x40) == ["LDS", "FMUL", "HMMA", "BRA"]
