"""The paged LoRA op: shrink (x @ A^T) and expand (y @ B) through the adapter page table.

`reference` (pure jnp, the semantics), `xla` (the CPU path), `gpu` (Pallas on Triton), `tpu`
(Pallas on Mosaic) and `ops` (the one switch the model calls).
"""
