"""The decode-step profile's kernel grouping (the profiling itself runs on the GPU machine)."""

import pytest

from bench.profile_step import kind_of, summarize


def test_kernel_kinds():
    assert kind_of("void (anonymous namespace)::nf4_mma_kernel<__nv_bfloat16, 1, 2, 4>") == "nf4_matmul"
    assert kind_of("_decode_kernel") == "attention"
    assert kind_of("void (anonymous namespace)::nf4_wide_kernel<__nv_bfloat16, 4, 1, 4, 3, 4>") == "nf4_matmul"
    assert kind_of("_merge_splits_kernel") == "attention"
    assert kind_of("void (anonymous namespace)::nf4_wgmma_kernel<__nv_bfloat16, 32, 2>") == "nf4_matmul"
    assert kind_of("void (anonymous namespace)::nf4_gemm_kernel<__nv_bfloat16>") == "nf4_matmul"
    assert kind_of("_add_rmsnorm_kernel") == "fused_glue"
    assert kind_of("_part_argmax_kernel") == kind_of("_merge_argmax_parts_kernel") == "sampling"  # greedy rows
    assert kind_of("_fill_kernel") == "other_glue"  # a replay's static inputs (triton_step_inputs)
    assert kind_of("sm90_xmma_gemm_bf16bf16_bf16f32") == "matmul_16bit"
    assert kind_of("void at::native::vectorized_elementwise_kernel<4, CopyFunctor>") == "other_glue"


def test_summary_per_step_and_glue_fraction():
    events = [("nf4_mma_kernel", 600.0), ("_add_rmsnorm_kernel", 100.0), ("elementwise_kernel", 100.0),
              ("_decode_kernel", 200.0)]
    summary = summarize(events, steps=2)
    assert summary["total_ms_per_step"] == 0.5
    assert summary["glue_fraction"] == 0.2
    assert summary["ms_per_step"]["nf4_matmul"] == 0.3
    assert summary["launches_per_step"] == {"nf4_matmul": 0.5, "fused_glue": 0.5, "other_glue": 0.5,
                                            "attention": 0.5}
    assert summary["top_kernels_launches_per_step"]["_decode_kernel"] == 0.5


def test_triton_resources_reads_each_compiled_variant():
    """bench.profile_step.triton_resources: every compiled variant of each kernel (its binary loaded first, as Triton
    fills n_regs then), through an autotuner-style wrapper too; kernels that never ran are left out."""
    from types import SimpleNamespace

    from bench.profile_step import triton_resources

    class Compiled:
        def __init__(self, regs, warps):
            self.metadata, self.n_regs, self.regs = SimpleNamespace(num_warps=warps, shared=512), None, regs

        def _init_handles(self):
            self.n_regs, self.n_spills = self.regs, 0

    shrink = SimpleNamespace(__name__="_shrink_kernel", device_caches={0: ({"a": Compiled(64, 4), "b": Compiled(96, 4)},
                                                                           {}, None)})
    idle = SimpleNamespace(__name__="_expand_kernel", device_caches={0: ({}, {}, None)})
    decode = SimpleNamespace(__name__="_decode_kernel", device_caches={1: ({"c": Compiled(80, 8)},)})
    wrapped = SimpleNamespace(fn=decode)
    got = triton_resources([shrink, idle, wrapped])
    assert got == {"_shrink_kernel": [{"registers": 64, "spills": 0, "warps": 4, "shared": 512},
                                      {"registers": 96, "spills": 0, "warps": 4, "shared": 512}],
                   "_decode_kernel": [{"registers": 80, "spills": 0, "warps": 8, "shared": 512}]}


def test_the_decode_steps_triton_kernels_import():
    pytest.importorskip("triton")
    from bench.profile_step import decode_step_kernels, triton_resources

    assert len(decode_step_kernels()) == 8 and isinstance(triton_resources(decode_step_kernels()), dict)
