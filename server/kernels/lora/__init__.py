"""Batched multi-adapter LoRA: the reference and dispatch (lora_ops), its per-step metadata (lora_meta), the Triton
shrink and expand kernels, the slot load, and the pieces a decode step fuses into other kernels."""
