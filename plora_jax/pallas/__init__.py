"""The model's two custom ops, one folder each (as tokamax lays out its ops):

- `lora/`: the paged LoRA gather (shrink x @ A^T, expand y @ B) through the adapter page table;
- `attention/`: paged attention over the KV cache (decode and packed prefill).

Each folder holds the pure-jnp reference (the semantics, tested against), the XLA path, the
Pallas kernels for GPU (Triton) and TPU (Mosaic) (and, for attention, a C++ kernel for CPU),
and `ops.py`, the one switch the model calls.
"""
