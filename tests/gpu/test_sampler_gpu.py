"""The sort-free top-p, the integer-mass draw and the fused Triton top-p draw on CUDA give exactly the
CPU's answer on the same probabilities (integer histograms and cumulative sums are exact in any order)."""

from __future__ import annotations

import pytest
import torch

from server.engine.sampling_masses import draw_from_masses, integer_masses, top_p_keep

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
    from server.engine.triton_top_p import top_p_draw

    assert torch.equal(top_p_draw(probs.cuda(), top_p.cuda(), uniform.cuda()).cpu(), drawn)


def test_fused_top_p_timing_printout():
    """Read with -s: the fused kernels (chunk, digit and block sizes) against the torch steps they replace,
    32 x 128256; each must give the torch steps' tokens. No assertion on speed."""
    from server.engine.triton_top_p import top_p_draw

    probs = (torch.randn(32, 128256, device="cuda") * 2.0).softmax(-1)
    top_p, uniform = torch.full((32,), 0.9, device="cuda"), torch.rand(32, device="cuda")

    def torch_steps():
        return draw_from_masses(integer_masses(probs).masked_fill(~top_p_keep(probs, top_p), 0), uniform)

    configs = {"fused kernel (default)": {}}
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
    from server.engine.triton_top_p import full_draw

    gen = torch.Generator().manual_seed(7)
    probs = (torch.randn(32, 128256, generator=gen) * spread).softmax(-1)
    uniform = torch.rand(32, generator=gen)
    expected = draw_from_masses(integer_masses(probs), uniform)
    assert torch.equal(full_draw(probs.cuda(), uniform.cuda()).cpu(), expected)
