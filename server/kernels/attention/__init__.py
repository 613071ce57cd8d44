"""Attention over the paged KV cache: the references and dispatch (attention_ops), the Triton decode and prefill
kernels, flash-attention for fresh prompts, and rotary with the cache write (rotary_attention)."""
