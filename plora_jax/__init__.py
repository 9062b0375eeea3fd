"""P-LoRA in JAX: serverless multi-LoRA serving with paged adapter memory and predictive prefetch.

Public API:

    from plora_jax import Engine, EngineConfig, SamplingParams
    engine = Engine.from_pretrained("llama")
    outputs = engine.generate(["Hello"], SamplingParams(max_tokens=16, temperature=0))
"""

from .config import EngineConfig, ModelConfig, RopeConfig
from .engine import Engine
from .models.convert import CheckpointError
from .models.registry import ModelFetchError
from .outputs import RequestFailed, RequestHandle, RequestMetrics, RequestOutput, StreamEvent
from .sampling import SamplingParams
from .tokenizer import Tokenizer

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
