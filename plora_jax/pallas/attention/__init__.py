"""Paged attention: decode (one query per row) and packed prefill over the paged KV cache.

`reference` (pure jnp, the semantics and the layout), `xla` (portable loops), `cpu` (a C++
kernel behind XLA's FFI), `gpu` and `tpu` (the Pallas paged-attention kernels that ship with
jax) and `ops` (the one switch the model calls).
"""
