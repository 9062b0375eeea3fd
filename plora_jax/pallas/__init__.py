"""Pallas kernels for the paged LoRA gather (shrink and expand, decode and prefill; issue 4).

Each kernel will sit next to its pure-jnp reference, which is also the XLA path used on CPU.
"""
