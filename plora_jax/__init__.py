"""P-LoRA in JAX: serverless multi-LoRA serving with paged adapter memory and predictive prefetch.

Public API:

    from plora_jax import Engine, EngineConfig, SamplingParams
    engine = Engine.from_pretrained("llama")
    outputs = engine.generate(["Hello"], SamplingParams(max_tokens=16, temperature=0))
"""

from .config import EngineConfig, ModelConfig, RopeConfig
from .engine.outputs import RequestFailed, RequestHandle, RequestMetrics, RequestOutput, StreamEvent
from .engine.sampling import SamplingParams
from .models.convert import CheckpointError
from .models.registry import ModelFetchError
from .tokenizer import Tokenizer


def __getattr__(name: str):
    # The engine (and with it the model, the kernels and flax) loads on first use, so tools that
    # only need configs or the tokenizer (the CLIs' --help, the server's argument parsing) start fast.
    if name == "Engine":
        from .engine.api import Engine

        return Engine
    raise AttributeError(f"module 'plora_jax' has no attribute {name!r}")


__all__ = [
    "CheckpointError",
    "Engine",
    "EngineConfig",
    "ModelConfig",
    "ModelFetchError",
    "RequestFailed",
    "RequestHandle",
    "RequestMetrics",
    "RequestOutput",
    "RopeConfig",
    "SamplingParams",
    "StreamEvent",
    "Tokenizer",
]
