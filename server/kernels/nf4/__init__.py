"""NF4 (bitsandbytes 4-bit NormalFloat) weight matmuls: references and the entry point (nf4_ops), the kernel choice
(nf4_dispatch, nf4_autotune, tuning_cache), the Triton and CUDA backends and their layout (nf4_layout, csrc/)."""
