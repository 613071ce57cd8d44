"""The ops the model and the engine call, each family in its own package (DESIGN.md, "Layout"): nf4, lora,
attention, glue (the decoder layer's non-matmul work) and sampling. In each, an `*_ops` module (or the sampler's
reference, server.engine.sampler_reference) holds the pure-torch reference with the semantics and the dispatch;
beside it the fast backends (`triton_*`, `cuda_*` and their csrc/), which import only the shared layout and meta
helpers (nf4_layout, lora_meta, split_sums, pdl), never the dispatch module: no two files import each other.

This package's own modules are the helpers every family shares: programmatic dependent launch (pdl, triton_pdl),
unsummed split-K partials (split_sums), launch overrides for A/B timing, copies that neither sync nor hold the GIL
(host_device), whether Triton is importable (backends) and the decode replay's input fill (triton_step_inputs).

The modules kept their names when they moved here from server/model and server/engine (2026-12-08): bench/NOTES.md
and the commit history name them so."""
