"""The sort-free top-p, the integer-mass draw and the fused Triton top-p draw on CUDA give exactly the
CPU's answer on the same probabilities (integer histograms and cumulative sums are exact in any order)."""

from __future__ import annotations

import pytest
import torch

from server.kernels.sampling.sampling_masses import draw_from_masses, integer_masses, top_p_keep

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("spread", [0.3, 2.0, 8.0])
def test_top_p_and_draw_on_cuda_equal_the_cpu(spread):
    gen = torch.Generator().manual_seed(int(spread * 10))
    probs = (torch.randn(32, 128256, generator=gen) * spread).softmax(-1)
    top_p = torch.rand(32, generator=gen) * 0.98 + 0.01
    uniform = torch.rand(32, generator=gen).clamp(1e-6, 1 - 1e-6)
    keep = top_p_keep(probs, top_p, "sort")
    assert torch.equal(top_p_keep(probs.cuda(), top_p.cuda(), "radix").cpu(), keep)
    assert torch.equal(top_p_keep(probs.cuda(), top_p.cuda(), "sort").cpu(), keep)
    masses = integer_masses(probs).masked_fill(~keep, 0)
    drawn = draw_from_masses(masses, uniform)
    assert torch.equal(draw_from_masses(masses.cuda(), uniform.cuda()).cpu(), drawn)
    assert keep.gather(1, drawn[:, None]).all()
    from server.kernels.sampling.triton_top_p import top_p_draw

    assert torch.equal(top_p_draw(probs.cuda(), top_p.cuda(), uniform.cuda()).cpu(), drawn)


def test_fused_top_p_timing_printout():
    """Read with -s: the fused kernels (chunk, digit and block sizes) against the torch steps they replace,
    32 x 128256; each must give the torch steps' tokens. No assertion on speed."""
    from server.kernels.sampling.triton_top_p import top_p_draw

    probs = (torch.randn(32, 128256, device="cuda") * 2.0).softmax(-1)
    top_p, uniform = torch.full((32,), 0.9, device="cuda"), torch.rand(32, device="cuda")

    def torch_steps():
        return draw_from_masses(integer_masses(probs).masked_fill(~top_p_keep(probs, top_p), 0), uniform)

    configs = {"fused kernel (default: CUDA passes and draw where they build)": {},
               "fused kernel, Triton passes and draw": {"cuda": False}}
    configs.update({f"fused kernel chunk {c} digit bits {d} sub {s}": dict(chunk=c, digit_bits=d, sub=s)
                    for c in (4096,) for d in (3, 4, 5, 6) for s in (64, 128)})
    runs = [("torch sort + draw", torch_steps)]
    runs += [(name, lambda kw=kw: top_p_draw(probs, top_p, uniform, **kw)) for name, kw in configs.items()]
    for name, fn in runs:
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            fn()
        end.record()
        torch.cuda.synchronize()
        print(f"\ntop-p draw 32 x 128256, {name}: {start.elapsed_time(end) / 20 * 1e3:.0f} us")
    expected = torch_steps()
    for kw in configs.values():
        assert torch.equal(top_p_draw(probs, top_p, uniform, **kw), expected)


@pytest.mark.parametrize("spread", [0.05, 4.0])
def test_full_draw_on_cuda_equals_the_cpu(spread):
    """Rows without top-p at 32 x 128256 (the sampler's temperature-only draws): the fused chunk masses and draw
    against draw_from_masses over every token on the CPU."""
    from server.kernels.sampling.triton_top_p import full_draw

    gen = torch.Generator().manual_seed(7)
    probs = (torch.randn(32, 128256, generator=gen) * spread).softmax(-1)
    uniform = torch.rand(32, generator=gen)
    expected = draw_from_masses(integer_masses(probs), uniform)
    assert torch.equal(full_draw(probs.cuda(), uniform.cuda()).cpu(), expected)


def _rows_a_cut_meets(vocab: int, seed: int) -> torch.Tensor:
    """[32, vocab] probability rows: nearly flat (a random-weight model's), spread, peaked, and quantized ones in
    which most tokens tie with others (exact equal probabilities)."""
    gen = torch.Generator().manual_seed(seed)
    rows = [(torch.randn(8, vocab, generator=gen) * spread).softmax(-1) for spread in (0.05, 2.0, 8.0)]
    quantized = torch.randint(1, 48, (8, vocab), generator=gen).float()
    rows.append(quantized / quantized.sum(-1, keepdim=True))
    return torch.cat(rows)


@pytest.mark.parametrize("vocab,chunk", [(128256, 4096), (5003, 1024), (5003, 4096)])
def test_cuda_top_p_cut_equals_the_triton_kernels(vocab, chunk):
    """The CUDA radix passes (server/kernels/sampling/csrc/top_p.cu) leave the cut and every chunk's mass above it and
    ties at it bit for bit as the Triton passes do, on every kind of row and top_p (none, 1.0 in float32 only,
    small, large); a vocabulary that ends inside a chunk, and chunks of one and many per row."""
    from server.kernels.sampling import cuda_top_p
    from server.kernels.sampling.sampling_masses import NO_TOP_P
    from server.kernels.sampling.triton_top_p import top_p_cut

    probs = _rows_a_cut_meets(vocab, seed=vocab + chunk).cuda()
    gen = torch.Generator().manual_seed(3)
    top_p = torch.rand(32, generator=gen) * 0.98 + 0.01
    top_p[::7] = NO_TOP_P
    top_p[3::9] = 0.99999999  # 1.0 in float32: still cuts at 2**40
    top_p[5::11] = 1e-4
    top_p = top_p.cuda()
    assert cuda_top_p.available(probs.device)
    cut, per_chunk = top_p_cut(probs, top_p, chunk=chunk, cuda=True)
    expected_cut, expected_per_chunk = top_p_cut(probs, top_p, chunk=chunk, cuda=False)
    assert torch.equal(cut, expected_cut)
    assert torch.equal(per_chunk, expected_per_chunk)
    assert (cut >= 0).any() and (cut < 0).any()  # rows that cut and rows that keep everything


@pytest.mark.parametrize("vocab,chunk", [(128256, 4096), (5003, 1024)])
def test_cuda_top_p_draw_equals_the_triton_kernels_and_the_cpu(vocab, chunk):
    """Each row drawn at 16 uniforms across [0, 1) (so a wrong kept set or a wrong scan shows): the CUDA draw
    gives the Triton draw's tokens and the CPU's (sorting top_p_keep, draw_from_masses), with and without
    top-p."""
    from server.kernels.sampling.triton_top_p import full_draw, top_p_draw

    base = _rows_a_cut_meets(vocab, seed=vocab)
    probs = base.repeat_interleave(16, dim=0)  # [512, vocab]
    gen = torch.Generator().manual_seed(5)
    top_p = (torch.rand(32, generator=gen) * 0.98 + 0.01).repeat_interleave(16)
    uniform = ((torch.arange(16) + torch.rand(16, generator=gen)) / 16).repeat(32).clamp(max=1 - 2**-23)
    keep = top_p_keep(probs, top_p, "sort")
    expected = draw_from_masses(integer_masses(probs).masked_fill(~keep, 0), uniform)
    probs, top_p, uniform = probs.cuda(), top_p.cuda(), uniform.cuda()
    assert torch.equal(top_p_draw(probs, top_p, uniform, chunk=chunk, cuda=True).cpu(), expected)
    assert torch.equal(top_p_draw(probs, top_p, uniform, chunk=chunk, cuda=False).cpu(), expected)
    expected_full = draw_from_masses(integer_masses(probs.cpu()), uniform.cpu())
    assert torch.equal(full_draw(probs, uniform, chunk=chunk, cuda=True).cpu(), expected_full)
    assert torch.equal(full_draw(probs, uniform, chunk=chunk, cuda=False).cpu(), expected_full)


def test_cuda_top_p_is_captured_by_a_cuda_graph():
    """The ctypes launches go to the current stream, so a graph captures them: a replay on new probabilities
    draws what an eager call draws."""
    from server.kernels.sampling.triton_top_p import top_p_draw

    probs = _rows_a_cut_meets(128256, seed=1).cuda()
    top_p, uniform = torch.full((32,), 0.9, device="cuda"), torch.rand(32, device="cuda")
    top_p_draw(probs, top_p, uniform, cuda=True)  # built and loaded outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        drawn = top_p_draw(probs, top_p, uniform, cuda=True)
    probs.copy_(_rows_a_cut_meets(128256, seed=2).cuda())
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(drawn, top_p_draw(probs, top_p, uniform, cuda=False))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 32])
def test_row_argmax_on_cuda_equals_argmax_with_ties_and_nan(dtype, rows):
    """The two-pass argmax of the greedy rows (row_argmax) against torch's own on the GPU: bf16 rows of few
    distinct values (ties at the max in many chunks), a masked row, NaN."""
    from server.kernels.sampling.row_argmax import row_argmax

    gen = torch.Generator().manual_seed(rows)
    x = torch.randint(-6, 7, (rows, 128256), generator=gen).to(dtype).cuda()
    y = torch.randn(rows, 128256, generator=gen).to(dtype).cuda()
    if rows > 1:
        x[1] = float("-inf")
        y[1, 100_000] = y[1, 120_000] = float("nan")
    for logits in (x, y):
        assert torch.equal(row_argmax(logits), logits.argmax(dim=-1))
        assert torch.equal(row_argmax(logits), logits.cpu().argmax(dim=-1).cuda())
