"""The prefill benchmark's inputs and FLOP count (the timing itself runs on the GPU machine)."""

from bench.prefill import MAX_LEN, MIN_LEN, NUM_PROMPTS, lengths_equal, lengths_unequal, model_flops
from bench.shapes import SHAPES


def test_unequal_lengths_keep_the_total():
    lengths = lengths_unequal()
    assert len(lengths) == NUM_PROMPTS and sum(lengths) == sum(lengths_equal())
    assert min(lengths) == MIN_LEN and abs(max(lengths) - MAX_LEN) <= 1 and len(set(lengths)) == NUM_PROMPTS


def test_model_flops_are_linear_dominated_and_causal():
    shape = SHAPES["8b"]
    equal, unequal = model_flops(shape, lengths_equal()), model_flops(shape, lengths_unequal())
    assert 9.0e14 < equal < 1.0e15  # ~2 x 7B linear params x 65,536 tokens plus attention
    assert unequal > equal  # causal attention grows with the square of each length
