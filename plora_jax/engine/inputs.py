"""Input processing: validation, tokenization and request creation, on the caller's thread.

Everything a caller can get wrong is checked here, before anything reaches the loop, and
raises `InvalidInput` (a `ValueError`) naming the field (`prompts[3]`, `adapters[1]`,
`sampling_params.stop_token_ids`) in its message and in `.field`. The request's detokenizer
and its sampling row (`sampling.SAMPLING_ROW`: the values its steps' device inputs hold) are
built here too and travel with the request, so nothing a caller sent is converted on the loop.
What the loop owns is read through its published snapshot (`EngineSnapshot.adapters`), never
from its live state.

Request ids are reserved here under a lock (the only state callers share with the loop: the
loop releases an id when its request ends), so a duplicate id is refused synchronously.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Sequence

import numpy as np

from ..config import ModelConfig
from ..detokenizer import IncrementalDetokenizer
from ..limits import SEED_BOUND
from ..tokenizer import Tokenizer
from .outputs import RequestHandle
from .sampling import SamplingParams, sampling_row
from .scheduler import Request


class InvalidInput(ValueError):
    """Input the engine refuses; `field` is the argument it names (`prompt`, `prompts[3]`, ...)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class InputProcessor:
    def __init__(
        self,
        model_config: ModelConfig,
        tokenizer: Tokenizer | None,
        max_model_len: int,
        seed: int,
        lora_enabled: bool,
        registered_adapters: Callable[[], frozenset[str]],
    ):
        self.vocab_size = model_config.vocab_size
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.lora_enabled = lora_enabled
        self._registered = registered_adapters
        self._seed_rng = np.random.default_rng(seed)
        self._ids = itertools.count()
        self._live_ids: set[str] = set()
        self._lock = threading.Lock()

    # --- validation -----------------------------------------------------------------------
    def token_ids(self, ids, field: str) -> list[int]:
        try:
            ids = [int(t) for t in ids]
        except (TypeError, ValueError, OverflowError):
            raise InvalidInput(field, f"{field} must be a string or a list of token ids") from None
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidInput(field, f"{field} holds token ids outside [0, {self.vocab_size}): {bad[:5]}")
        return ids

    def check_adapter(self, adapter, field: str) -> None:
        if adapter is None:
            return
        if not self.lora_enabled:
            raise InvalidInput(field, f"{field}={adapter!r}: this engine serves no adapters (max_loras=0)")
        if adapter not in self._registered():
            raise InvalidInput(field, f"{field}={adapter!r}: no adapter with this name is registered (see add_adapter)")

    def score_input(self, token_ids, adapter, field: str, adapter_field: str) -> list[int]:
        self.check_adapter(adapter, adapter_field)
        ids = self.token_ids(token_ids, field)
        if not ids:
            raise InvalidInput(field, f"{field} is empty")
        if len(ids) > self.max_model_len:
            raise InvalidInput(field, f"{field} has {len(ids)} tokens, more than max_model_len={self.max_model_len}")
        return ids

    # --- requests -------------------------------------------------------------------------
    def make_request(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None,
        adapter: str | None,
        field: str = "prompt",
        request_id: str | None = None,
        adapter_field: str = "adapter",
    ) -> Request:
        """A validated `Request` (not yet queued, its id not yet reserved)."""
        if params is None:
            params = SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidInput("sampling_params", f"sampling_params for {field} must be a SamplingParams")
        self.check_adapter(adapter, adapter_field)
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidInput(field, f"{field}: this engine has no tokenizer; pass token ids")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = self.token_ids(prompt, field)
        if not ids:
            raise InvalidInput(field, f"{field} is empty")
        if len(ids) >= self.max_model_len:
            raise InvalidInput(
                field,
                f"{field} has {len(ids)} tokens, leaving no room to generate (max_model_len={self.max_model_len})",
            )
        outside = [t for t in params.stop_token_ids if t >= self.vocab_size]
        if outside:
            raise InvalidInput(
                "sampling_params.stop_token_ids",
                f"sampling_params.stop_token_ids holds ids outside [0, {self.vocab_size}): {outside[:5]}",
            )
        tok = self.tokenizer
        eos = frozenset(tok.eos_token_ids) if tok and not params.ignore_eos else frozenset()
        seed = params.seed if params.seed is not None else int(self._seed_rng.integers(SEED_BOUND))
        detok = None
        if tok is not None:
            detok = IncrementalDetokenizer(
                tok, ids, params.stop, params.include_stop_str_in_output, params.skip_special_tokens
            )
        return Request(
            request_id=request_id if request_id is not None else f"req-{next(self._ids)}",
            prompt_ids=ids,
            params=params,
            seed=seed,
            stop_ids=frozenset(params.stop_token_ids) | eos,
            max_total=min(len(ids) + params.max_tokens, self.max_model_len),
            adapter=adapter,
            prompt_text=prompt if isinstance(prompt, str) else None,
            detokenizer=detok,
            sampling=sampling_row(params, seed, self.vocab_size),
        )

    def attach_handle(self, request: Request, cancel: Callable[[str], None]) -> RequestHandle:
        """Reserve the request's id and give it the caller's handle."""
        with self._lock:
            if request.request_id in self._live_ids:
                raise InvalidInput("request_id", f"request_id {request.request_id!r} is already in use")
            self._live_ids.add(request.request_id)
        request.handle = RequestHandle(request.request_id, cancel)
        return request.handle

    def release(self, request_id: str) -> None:
        """Free an id (the loop, when its request ends)."""
        with self._lock:
            self._live_ids.discard(request_id)
