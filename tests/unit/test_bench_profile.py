"""The decode-step profile's kernel grouping (the profiling itself runs on the GPU machine)."""

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
