"""The engine contract of the HTTP API: everything `serving.app` asks of an engine, and nothing else.

Three classes implement it: `plora_jax.Engine` (one engine in this process),
`serving.cluster.gateway.ClusterEngine` (the replicas of a Ray Serve deployment) and the tests'
`FakeEngine` (hand-computable outputs, so the API's own tests run in milliseconds). The app is
written against these Protocols, never against one implementation's attributes.

Which calls may block: `submit`, `has_adapter`, `readiness` and `stats` read published state and
return at once (the event loop calls them). `adapters`, `add_adapter`, `remove_adapter` and
`prompt_logprobs` may wait for the engine or read files, so the app runs them in a worker
thread. `submit` validates its input on the caller's thread and raises
`plora_jax.engine.inputs.InvalidInput` naming the field; a closed or dead engine raises
`plora_jax.engine.errors.EngineDead` (and one without room for a scoring call `EngineBusy`).
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Literal, Protocol, TypedDict, runtime_checkable

from plora_jax.engine.outputs import RequestOutput, StreamEvent
from plora_jax.engine.sampling import Logprobs, SamplingParams

Status = Literal["warming", "ok", "stalled", "failed"]


class Readiness(TypedDict, total=False):
    status: Status  # ok: serving; warming: building its first executables; stalled: a step hangs
    compiled: int  # executables ready
    total: int  # executables of the compile plan
    engine: str  # what a gateway fronts
    detail: str  # why it is not ok


class AdapterListing(TypedDict):
    name: str
    path: str  # the folder it was registered from (never shown to clients as is)
    rank: int
    residency: str  # one of plora_jax.metrics.RESIDENCIES (cluster: "cluster")


# A prompt's own log-probabilities (`prompt_logprobs`): token i + 1 under the distribution
# after token i, as numpy arrays: chosen [len - 1] f32, top_ids [len - 1, MAX_TOP_LOGPROBS] i32
# (likeliest first) and top [len - 1, MAX_TOP_LOGPROBS] f32.
PromptLogprobs = Logprobs


@runtime_checkable
class Tokenizer(Protocol):
    @property
    def max_token_chars(self) -> int:
        """Characters of the longest token: a text longer than this many per context token
        cannot fit the context, which is checked before tokenizing it."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    def apply_chat_template(self, messages: list[dict]) -> str: ...


@runtime_checkable
class ServingHandle(Protocol):
    """One submitted request."""

    @property
    def finished(self) -> bool: ...

    def events(self) -> AsyncIterator[StreamEvent]:
        """The request's events (the last carries its `RequestOutput`); raises `RequestFailed`."""

    async def aresult(self) -> RequestOutput: ...

    def cancel(self) -> None:
        """Abort it (a no-op once it ended): it ends with finish_reason "abort" and frees what it holds."""


@runtime_checkable
class ServingEngine(Protocol):
    @property
    def tokenizer(self) -> Tokenizer: ...

    @property
    def max_model_len(self) -> int: ...

    def readiness(self) -> Readiness: ...

    def stats(self) -> dict:
        """Counters (`running`, `waiting`, ...; what /metrics shows), from published state."""

    def has_adapter(self, name: str) -> bool: ...

    def adapters(self, timeout: float | None = None) -> list[AdapterListing]:
        """Every registered adapter; `timeout`: seconds to wait for the engine (TimeoutError)."""

    def add_adapter(self, name: str, path: Path | str, timeout: float | None = None) -> dict:
        """Register a PEFT folder or a store's URI (already confined by the caller); AdapterError
        (its `field` "name" or "path"; SourceUnavailable when the store cannot be read) if it is
        bad, TimeoutError past `timeout` waiting for the engine."""

    def remove_adapter(self, name: str, timeout: float | None = None) -> None:
        """Unregister; ValueError if `name` is not registered, TimeoutError past `timeout`."""

    def submit(
        self, prompt: list[int], sampling_params: SamplingParams, adapter: str | None = None
    ) -> ServingHandle: ...

    def prompt_logprobs(
        self, token_ids: list[int], adapter: str | None, temperature: float, cancel: threading.Event | None = None
    ) -> PromptLogprobs | None:
        """Score a prompt (`echo`), in chunks; None if `cancel` is set before the last one.
        NotImplementedError where the engine cannot score."""
