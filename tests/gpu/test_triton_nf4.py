"""Fused NF4 Triton matmul on CUDA: vs the torch reference and bnb, under CUDA-graph capture, timings.

Run on the GPU machine: ``pytest tests/gpu/test_triton_nf4.py -s`` (``-s`` shows the timing table,
which is printed, never asserted; bench.kernels times the same kernels for the results).
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

import bitsandbytes as bnb  # noqa: E402  (after the skip: CPU CI never imports triton from here)
import bitsandbytes.functional as bnbf  # noqa: E402
import triton.testing  # noqa: E402

from server.kernels.nf4 import nf4_ops, triton_nf4  # noqa: E402

pytestmark = pytest.mark.gpu

SHAPES = [(2048, 2048), (2048, 8192), (8192, 2048), (4096, 6144), (4096, 28672), (14336, 4096)]  # (in, out)
DECODE_TOKENS = [1, 8, 32, 64]


@pytest.fixture(scope="module")
def weights():
    """(in, out) -> (codes, absmax_f, shape, code_table, quant_state), built once per module."""
    cache = {}

    def get(in_features, out_features):
        if (in_features, out_features) not in cache:
            gen = torch.Generator(device="cuda").manual_seed(in_features + out_features)
            w = torch.randn(out_features, in_features, device="cuda", generator=gen, dtype=torch.bfloat16)
            codes, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
            cache[(in_features, out_features)] = (
                codes, nf4_ops.nf4_absmax_float(state), tuple(state.shape), state.code, state
            )  # fmt: skip
        return cache[(in_features, out_features)]

    return get


def _inputs(num_tokens, in_features, out_features, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(num_tokens, in_features, device="cuda", generator=gen).to(torch.bfloat16)
    bias = torch.randn(out_features, device="cuda", generator=gen).to(torch.bfloat16)
    return x, bias


def _float64_reference(x, codes, absmax, shape, table, bias):
    weight = nf4_ops.nf4_dequantize_reference(codes, absmax, shape, table).to(x.dtype).double()
    return x.double() @ weight.t() + bias.double()


def _assert_close_bf16(got, expected, tolerance):
    scale = expected.float().abs().max().item()
    torch.testing.assert_close(got.float(), expected.float(), atol=tolerance * 0.1 * scale, rtol=tolerance)


@pytest.mark.parametrize("num_tokens", DECODE_TOKENS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"in{s[0]}_out{s[1]}")
def test_decode_matches_reference_and_bnb(weights, shape, num_tokens):
    codes, absmax, wshape, table, state = weights(*shape)
    x, bias = _inputs(num_tokens, *shape)
    got = nf4_ops.nf4_matmul(x, codes, absmax, wshape, table, bias=bias)  # the CUDA dispatch (nf4_dispatch)
    expected = nf4_ops.nf4_matmul_reference(x, codes, absmax, wshape, table, bias=bias)
    # Same bf16 weights, fp32 accumulate: only summation order and the final rounding differ.
    _assert_close_bf16(got, expected, tolerance=1e-2)
    # bitsandbytes is a second opinion, not the truth: at one row its gemv_4bit rounds differently
    # (up to 1.5 at output magnitude 155, H200 2026-12-01), so it must not be closer to the float64
    # result than we are.
    theirs = bnb.matmul_4bit(x, codes.t(), quant_state=state, bias=bias)
    exact = _float64_reference(x, codes, absmax, wshape, table, bias)
    assert (got.double() - exact).abs().max() <= (theirs.double() - exact).abs().max() * 1.5 + 1e-6


@pytest.mark.parametrize(
    "num_tokens, shape", [(300, (2048, 8192)), (1000, (14336, 4096)), (8192, (4096, 6144))], ids=str
)
def test_prefill_matches_reference(weights, num_tokens, shape):
    codes, absmax, wshape, table, _ = weights(*shape)
    x, bias = _inputs(num_tokens, *shape, seed=1)
    got = triton_nf4.nf4_matmul_triton(x, codes, absmax, wshape, table, bias=bias)
    expected = nf4_ops.nf4_matmul_reference(x, codes, absmax, wshape, table, bias=bias)
    _assert_close_bf16(got, expected, tolerance=1e-2)


@pytest.mark.parametrize("num_tokens", [1, 64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"in{s[0]}_out{s[1]}")
def test_cuda_graph_replay_matches_reference(weights, shape, num_tokens):
    codes, absmax, wshape, table, _ = weights(*shape)
    x, bias = _inputs(num_tokens, *shape, seed=2)
    out = torch.empty(num_tokens, shape[1], device="cuda", dtype=torch.bfloat16)

    def step():
        triton_nf4.nf4_matmul_triton(x, codes, absmax, wshape, table, out=out, bias=bias)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for seed in (3, 4):
        x.copy_(_inputs(num_tokens, *shape, seed=seed)[0])
        out.fill_(float("nan"))
        graph.replay()
        expected = nf4_ops.nf4_matmul_reference(x, codes, absmax, wshape, table, bias=bias)
        _assert_close_bf16(out, expected, tolerance=1e-2)


def _dequantize_then_matmul(x, codes, state):
    return x @ bnbf.dequantize_4bit(codes, state).to(x.dtype).t()


def _bench_us(fn) -> float:
    return triton.testing.do_bench(fn) * 1e3


def test_decode_shapes_with_timings(weights):
    """At every decode shape and token count the Triton kernel computes the reference; read with -s for its time
    against bnb.matmul_4bit and dequantize + cuBLAS (never asserted; GB/s counts codes, absmax, x and y)."""
    header = ["in", "out", "T", "triton_us", "GB/s", "bnb_us", "deq_mm_us", "config"]
    print("\n" + " ".join(f"{h:>9}" for h in header))
    for shape in SHAPES:
        codes, absmax, wshape, table, state = weights(*shape)
        for num_tokens in DECODE_TOKENS:
            x, _ = _inputs(num_tokens, *shape)
            out = torch.empty(num_tokens, shape[1], device="cuda", dtype=torch.bfloat16)
            fused = partial(triton_nf4.nf4_matmul_triton, x, codes, absmax, wshape, table, out=out)
            _assert_close_bf16(fused(), nf4_ops.nf4_matmul_reference(x, codes, absmax, wshape, table), 1e-2)
            triton_us = _bench_us(fused)
            bnb_us = _bench_us(partial(bnb.matmul_4bit, x, codes.t(), quant_state=state))
            deq_mm_us = _bench_us(partial(_dequantize_then_matmul, x, codes, state))
            num_bytes = codes.numel() + absmax.numel() * 4 + 2 * num_tokens * (shape[0] + shape[1])
            config = triton_nf4.pick_config(num_tokens, shape[1], shape[0], triton_nf4.device_num_sms(0))
            row = [*shape, num_tokens, f"{triton_us:.1f}", f"{num_bytes / triton_us / 1e3:.0f}"]
            row += [f"{bnb_us:.1f}", f"{deq_mm_us:.1f}"]
            print(" ".join(f"{v:>9}" for v in row), config)
