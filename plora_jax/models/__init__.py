"""Model code (Flax Llama) and checkpoint loaders (GGUF, Hugging Face folders, orbax cache)."""
