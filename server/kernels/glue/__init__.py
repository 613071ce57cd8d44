"""A decoder layer's non-matmul work (residual add + norm, silu * up, split-K sums): references and dispatch
(glue_ops) and the fused Triton kernels (triton_glue)."""
