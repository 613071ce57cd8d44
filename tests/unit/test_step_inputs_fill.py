"""A decode replay's static inputs: the one-kernel fill (server.kernels.triton_step_inputs, under the Triton
interpreter) writes what the torch reference (cuda_graphs.scatter_torch) writes, stale columns and all."""

from __future__ import annotations

import random

import pytest
import torch

from server.engine.cuda_graphs import DECODE_ROW_FIELDS, scatter_torch
from tests.unit.triton_interp import interpreted


@pytest.fixture(scope="module")
def kernel():
    return interpreted("server.kernels.triton_step_inputs")


def static_inputs(bucket: int, max_blocks: int, logit_rows: int, tiles: int) -> dict[str, torch.Tensor]:
    """The static tensors of a graph (dtypes as DecodeGraphs.step_inputs makes them), holding stale values."""
    inputs = {name: torch.full((bucket,), 7, dtype=dtype) for name, dtype in DECODE_ROW_FIELDS.items()}
    inputs["block_tables"] = torch.full((bucket, max_blocks), 9, dtype=torch.int32)
    inputs["logit_rows"] = torch.full((logit_rows,), 5, dtype=torch.long)
    if tiles:
        inputs["lora_tile_starts"] = torch.full((tiles + 1,), 4, dtype=torch.int32)
        inputs["lora_tile_slots"] = torch.full((tiles,), 4, dtype=torch.int32)
    return inputs


def step_values(rng: random.Random, inputs: dict[str, torch.Tensor], num_tables: int, width: int) -> torch.Tensor:
    """_fill's layout: 5 fields and the owners [6, bucket], the tables [num_tables, width], logit rows, tiles."""
    bucket = inputs["input_ids"].numel()
    fields = [[rng.randrange(-1, 1 << 40) for _ in range(bucket)] for _ in DECODE_ROW_FIELDS]
    fields[3] = [rng.randrange(0, 5000) for _ in range(bucket)]  # context lengths and slots fit int32
    fields[4] = [rng.randrange(-1, 64) for _ in range(bucket)]
    owners = [rng.randrange(num_tables) for _ in range(bucket)]
    tables = [rng.randrange(1 << 20) for _ in range(num_tables * width)]
    rest = [rng.randrange(-1, 1000) for _ in range(sum(inputs[name].numel() for name in
                                                        ("logit_rows", "lora_tile_starts", "lora_tile_slots")
                                                        if name in inputs))]
    return torch.tensor(sum(fields, []) + owners + tables + rest, dtype=torch.long)


@pytest.mark.parametrize("bucket,max_blocks,width,num_tables,tiles", [
    (1, 16, 3, 2, 0),  # one decode row (and the padding sequence)
    (37, 300, 260, 9, 0),  # tables wider than the kernel's block of 128
    (64, 40, 40, 5, 12),  # a tiled graph's step
])
def test_kernel_writes_what_torch_writes(kernel, bucket, max_blocks, width, num_tables, tiles):
    rng = random.Random(bucket)
    expected = static_inputs(bucket, max_blocks, min(bucket, 32), tiles)
    got = {name: tensor.clone() for name, tensor in expected.items()}
    for _ in range(2):  # a second step over the first one's values
        values = step_values(rng, expected, num_tables, width)
        scatter_torch(expected, values, bucket, width, num_tables)
        kernel.scatter_step_inputs(got, values, tuple(DECODE_ROW_FIELDS), bucket, width, num_tables)
        for name, tensor in expected.items():
            assert torch.equal(got[name], tensor), name
    assert (expected["block_tables"][:, width:] == 9).all()  # the stale columns past the width stay


def test_kernel_rejects_a_strided_block_table(kernel):
    inputs = static_inputs(4, 16, 4, 0)
    inputs["block_tables"] = inputs["block_tables"].t().contiguous().t()
    values = step_values(random.Random(0), inputs, 2, 4)
    with pytest.raises(ValueError, match="contiguous"):
        kernel.scatter_step_inputs(inputs, values, tuple(DECODE_ROW_FIELDS), 4, 4, 2)
