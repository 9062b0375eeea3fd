"""The engine: the public `Engine` (api), the loop that owns the device (core), the model
runner (runner), every compiled shape (compile_plan), the scheduler and the request side
(inputs, outputs). See `api` for how the pieces fit."""


def __getattr__(name: str):
    if name == "Engine":
        from .api import Engine

        return Engine
    raise AttributeError(f"module 'plora_jax.engine' has no attribute {name!r}")
