"""The OpenAI-compatible HTTP server (`python -m serving.main --model llama`, issue 7).

It will wrap `plora_jax.Engine`; until it lands, `python -m plora_jax.generate` is the command-line
entry point.
"""
