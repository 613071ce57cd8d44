"""The one-kernel fill of a decode replay's static inputs (server.kernels.triton_step_inputs) on a CUDA GPU writes what
the torch reference writes; the engine tests replay graphs filled by it."""

from __future__ import annotations

import random

import pytest
import torch

from server.engine.cuda_graphs import DECODE_ROW_FIELDS, scatter_torch
from tests.unit.test_step_inputs_fill import static_inputs, step_values

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("bucket,max_blocks,width,num_tables,tiles", [(1, 16, 3, 2, 0), (37, 300, 260, 9, 0),
                                                                      (1024, 64, 50, 33, 96)])
def test_fill_kernel_matches_torch_on_cuda(bucket, max_blocks, width, num_tables, tiles):
    from server.kernels.triton_step_inputs import scatter_step_inputs

    rng = random.Random(bucket)
    expected = {k: v.cuda() for k, v in static_inputs(bucket, max_blocks, min(bucket, 256), tiles).items()}
    got = {name: tensor.clone() for name, tensor in expected.items()}
    for _ in range(3):
        values = step_values(rng, expected, num_tables, width).cuda()
        scatter_torch(expected, values, bucket, width, num_tables)
        scatter_step_inputs(got, values, tuple(DECODE_ROW_FIELDS), bucket, width, num_tables)
        for name, tensor in expected.items():
            assert torch.equal(got[name], tensor), name
