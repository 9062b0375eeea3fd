"""A fake engine for tests of the HTTP layer itself: `serving.contract.ServingEngine` with outputs
a reader can compute by hand, in milliseconds, driven deterministically.

Tokens are bytes: a text's ids are its UTF-8 bytes (256 and 257 are special: end of sequence
and end of turn), the chat template is `<role>content\\n` per message then `<assistant>`. Token
i of a request's output is `(last prompt token + 1 + i) % 256`, with log-probability -1.0 and
alternatives (the token, -1.0), (token + 1, -2.0), ... A request finishes with "length" at
`max_tokens`, or "stop" if it draws a stop token id.

With `auto=True` a request runs to its end as it is submitted; with `auto=False` nothing
happens until the test calls `step()`, which gives every open request one token. The handles
are the engine's own `RequestHandle`s, so the app sees exactly what a real engine gives it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from plora_jax.engine.errors import EngineDead
from plora_jax.engine.inputs import InvalidInput
from plora_jax.engine.outputs import RequestHandle, RequestOutput, StreamEvent
from plora_jax.engine.sampling import SamplingParams
from plora_jax.limits import MAX_TOP_LOGPROBS
from plora_jax.lora.peft import AdapterError
from serving.contract import PromptLogprobs

EOS, EOT = 256, 257
VOCAB = 258


class ByteTokenizer:
    max_token_chars = 1

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, token_ids, skip_special_tokens: bool = True) -> str:
        special = {EOS: "<eos>", EOT: "<eot>"}
        parts = [
            bytes([t]).decode("latin-1") if t < 256 else ("" if skip_special_tokens else special[t]) for t in token_ids
        ]
        return "".join(parts)

    def apply_chat_template(self, messages: list[dict]) -> str:
        for m in messages:
            if m["content"] == "refuse me":  # as a template's raise_exception does
                raise ValueError("messages: the chat template refused them: refused")
        return "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>"


def fake_token(prompt: list[int], i: int) -> int:
    return (prompt[-1] + 1 + i) % 256


@dataclass
class _Open:
    handle: RequestHandle
    prompt: list[int]
    params: SamplingParams
    adapter: str | None
    tokens: list[int] = field(default_factory=list)


class FakeEngine:
    def __init__(self, auto: bool = True, max_model_len: int = 256):
        self.auto, self.max_model_len = auto, max_model_len
        self.tokenizer = ByteTokenizer()
        self.registered: dict[str, Path] = {}
        self.open: dict[str, _Open] = {}
        self.cancelled: list[str] = []
        self.submitted: list[tuple[list[int], SamplingParams, str | None]] = []
        self.status = "ok"
        self.dead = False
        self.hold_scoring = None  # a threading.Event: prompt_logprobs waits for it (tests of cancellation)
        self.scoring_cancelled = 0
        self._ids = itertools.count()

    # --- the contract --------------------------------------------------------------------------
    def readiness(self) -> dict:
        return {"status": self.status}

    def stats(self) -> dict:
        return {"running": len(self.open), "waiting": 0}

    def has_adapter(self, name: str) -> bool:
        return name in self.registered

    def adapters(self, timeout: float | None = None) -> list[dict]:
        return [{"name": n, "path": str(p), "rank": 8, "residency": "disk"} for n, p in self.registered.items()]

    def add_adapter(self, name: str, path: Path | str, timeout: float | None = None) -> dict:
        if not (Path(path) / "adapter_config.json").is_file():
            raise AdapterError(f"{Path(path).name}/adapter_config.json: missing")
        self.registered[name] = Path(path)
        return {"name": name}

    def remove_adapter(self, name: str, timeout: float | None = None) -> None:
        if self.registered.pop(name, None) is None:
            raise ValueError(f"adapter {name!r} is not registered")

    def submit(self, prompt, sampling_params: SamplingParams, adapter: str | None = None) -> RequestHandle:
        params = sampling_params
        if self.dead:
            raise EngineDead("the engine loop has stopped: injected")
        ids = list(prompt)
        if not all(0 <= t < VOCAB for t in ids):
            raise InvalidInput("prompt", f"prompt holds token ids outside [0, {VOCAB})")
        if len(ids) >= self.max_model_len:
            raise InvalidInput("prompt", f"prompt has {len(ids)} tokens, leaving no room to generate")
        if any(t >= VOCAB for t in params.stop_token_ids):
            raise InvalidInput("sampling_params.stop_token_ids", "sampling_params.stop_token_ids holds ids outside")
        rid = f"fake-{next(self._ids)}"
        handle = RequestHandle(rid, self._cancel)
        self.open[rid] = _Open(handle, ids, params, adapter)
        self.submitted.append((ids, params, adapter))
        if self.auto:
            while rid in self.open:
                self._advance(rid)
        return handle

    def prompt_logprobs(self, token_ids, adapter, temperature: float, cancel=None) -> PromptLogprobs | None:
        if self.hold_scoring is not None:  # a test holds scoring until it lets go (or cancels)
            self.hold_scoring.wait()
            if cancel is not None and cancel.is_set():
                self.scoring_cancelled += 1
                return None
        n = len(token_ids) - 1
        top_ids = (np.asarray(token_ids[1:])[:, None] + np.arange(MAX_TOP_LOGPROBS)[None]) % 256
        top = -1.0 - np.arange(MAX_TOP_LOGPROBS, dtype=np.float32)[None].repeat(n, 0)
        return PromptLogprobs(np.full(n, -1.0, np.float32), top_ids.astype(np.int32), top)

    # --- driving -------------------------------------------------------------------------------
    def step(self) -> None:
        """Every open request gets one token (auto=False)."""
        for rid in list(self.open):
            self._advance(rid)

    def _advance(self, rid: str) -> None:
        r = self.open[rid]
        token = fake_token(r.prompt, len(r.tokens))
        r.tokens.append(token)
        top = [((token + j) % 256, -1.0 - j) for j in range(r.params.top_logprobs)] if r.params.logprobs else None
        lps = [-1.0] if r.params.logprobs else None
        text = self.tokenizer.decode([token])
        if token in r.params.stop_token_ids:
            self._finish(rid, "stop")
        elif len(r.tokens) >= r.params.max_tokens:
            self._finish(rid, "length")
        else:
            r.handle._push(StreamEvent(text, [token], logprobs=lps, top_logprobs=top and [top]))

    def _finish(self, rid: str, reason: str) -> None:
        r = self.open.pop(rid)
        n = len(r.tokens)
        last = r.tokens[-1:] if reason != "abort" else []
        wanted = r.params.logprobs
        out = RequestOutput(
            rid,
            r.prompt,
            list(r.tokens),
            self.tokenizer.decode(r.tokens),
            reason,
            logprobs=[-1.0] * n if wanted else None,
            top_logprobs=[[((t + j) % 256, -1.0 - j) for j in range(r.params.top_logprobs)] for t in r.tokens]
            if r.params.top_logprobs
            else None,
        )
        event = StreamEvent(self.tokenizer.decode(last), last, True, out)
        if wanted:
            event.logprobs = [-1.0] * len(last)
            event.top_logprobs = out.top_logprobs[-len(last) :] if last and out.top_logprobs else None
        r.handle._push(event)

    def _cancel(self, rid: str) -> None:
        if rid in self.open:
            self.cancelled.append(rid)
            self._finish(rid, "abort")

    def fail(self, rid: str, error: BaseException) -> None:
        """End an open request with an engine failure."""
        self.open.pop(rid).handle._fail(error)
