"""The sampler's device kernels (semantics in server.engine.sampler and sampler_reference): the greedy rows' argmax,
the integer probability masses, and the top-p cut and draw in Triton and CUDA (csrc/top_p.cu)."""
