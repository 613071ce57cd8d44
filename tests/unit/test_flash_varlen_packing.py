"""How fresh prompts are packed for one flash-attention varlen call (server.kernels.attention.flash_varlen.packing): the
cumulative lengths and the rows the call reads and writes. The call itself runs on the GPU suite
(tests/gpu/test_prefill_attention_gpu.py)."""

from __future__ import annotations

from server.kernels.attention.flash_varlen import Packing, packing
from server.model.llama import PrefillSeq


def _seq(q_start, q_len):
    return PrefillSeq(q_start=q_start, q_len=q_len, ctx_len=q_len, block_table=None)


def test_back_to_back_prompts_are_one_span_in_row_order():
    seqs = [_seq(300, 5), _seq(0, 300), _seq(305, 2048)]
    assert packing(seqs) == Packing(first=0, end=2353, rows=None, cu_lens=[0, 300, 305, 2353], max_len=2048)


def test_prompts_with_rows_between_them_list_their_rows():
    """A prompt with a cached prefix (rows 3-5) sits between two fresh ones."""
    pack = packing([_seq(6, 2), _seq(0, 3)])
    assert pack.rows == [0, 1, 2, 6, 7]
    assert (pack.cu_lens, pack.max_len) == ([0, 3, 5], 3)

