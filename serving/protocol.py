"""The OpenAI wire format: parsing completion and chat requests into engine calls, and building
responses, stream chunks and error bodies.

Parsing is strict where a wrong value would silently change the answer (types, ranges, unknown
roles, and every OpenAI field we do not implement, `UNSUPPORTED_FIELDS`, set to anything but its
neutral value) and lenient where nothing changes (unknown fields, `user`, an empty
`logit_bias`, `best_of` = 1). Every refusal is an `ApiError` carrying the HTTP status and OpenAI's error JSON,
with `param` naming the field.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp
import numpy as np

from plora_jax.engine.sampling import MAX_TOP_LOGPROBS, SamplingParams, logprobs_of


class ApiError(Exception):
    """An error answered as OpenAI's `{"error": {...}}` JSON with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def type(self) -> str:
        return {
            400: "invalid_request_error",
            401: "authentication_error",
            404: "not_found_error",
            413: "invalid_request_error",
            429: "rate_limit_error",
        }.get(self.status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class GenerationRequest:
    """A parsed completion or chat request."""

    model: str
    adapter: str | None  # None: the base model
    prompts: list[str | list[int]]  # text or token ids; chat: the one rendered conversation
    params: SamplingParams
    stream: bool
    include_usage: bool  # stream_options.include_usage
    chat: bool
    max_tokens_field: str | None = None  # the field that set max_tokens; None: omitted (up to the context)
    n: int = 1  # samples of each prompt
    echo: bool = False  # completions: the answer repeats the prompt (with its logprobs, if asked)
    score_only: bool = False  # echo with max_tokens 0: nothing is generated

    def choices(self, params_per_prompt: list[SamplingParams]) -> list[tuple[str | list[int], SamplingParams]]:
        """(prompt, params) of every choice, in OpenAI's order (prompt by prompt, then sample by
        sample). Sample j of a seeded request uses seed + j, so sample 0 is the single request's."""
        out = []
        for prompt, params in zip(self.prompts, params_per_prompt, strict=True):
            for j in range(self.n):
                seed = params.seed if params.seed is None or j == 0 else (params.seed + j) % 2**32
                out.append((prompt, dataclasses.replace(params, seed=seed)))
        return out


def _number(body: dict, name: str, default, kind=float, low=None, high=None):
    value = body.get(name, default)
    if value is None:
        return default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        ok = ok and float(value).is_integer()
    if not ok:
        raise ApiError(400, f"'{name}' must be a {'an integer' if kind is int else 'number'}, got {value!r}", name)
    value = kind(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ApiError(400, f"'{name}' must be in [{low}, {high}], got {value!r}", name)
    return value


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise ApiError(400, "'stop' must be a non-empty string or a list of up to 4 of them", "stop")
    return tuple(stop)


# OpenAI fields this server does not implement. Ignoring one would answer with something the
# client did not ask for (plain text for a tool call or a JSON schema, no logprobs), so a request
# that sets one gets 400 naming it. Each maps to its neutral values, which are accepted.
UNSUPPORTED_FIELDS = {
    "best_of": (1,),
    "frequency_penalty": (0,),
    "presence_penalty": (0,),
    "logit_bias": ({},),
    "suffix": ("",),
    "tools": ([],),
    "tool_choice": ("none",),
    "parallel_tool_calls": (),  # meaningless without tools: any value is refused
    "functions": ([],),
    "function_call": ("none",),
    "response_format": ({"type": "text"},),
}


MAX_PROMPTS = 64  # prompts in one completions request
MAX_N = 16  # samples of each prompt


def _is_token(t) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and t >= 0


def _prompts(value) -> list[str | list[int]]:
    """OpenAI's four forms: a string, a list of strings, a list of token ids, a list of those."""
    if isinstance(value, str):
        prompts = [value]
    elif isinstance(value, list) and value and all(_is_token(t) for t in value):
        prompts = [list(value)]
    elif isinstance(value, list) and value and all(isinstance(p, str) for p in value):
        prompts = list(value)
    elif isinstance(value, list) and value and all(isinstance(p, list) and p and all(map(_is_token, p)) for p in value):
        prompts = [list(p) for p in value]
    else:
        prompts = []
    if not prompts or any(p == "" for p in prompts):
        raise ApiError(
            400,
            "'prompt' must be a non-empty string, a list of them, a list of token ids (integers >= 0) "
            "or a list of those",
            "prompt",
        )
    if len(prompts) > MAX_PROMPTS:
        raise ApiError(400, f"'prompt' holds {len(prompts)} prompts, more than {MAX_PROMPTS}", "prompt")
    return prompts


def _logprobs(body: dict, chat: bool) -> tuple[bool, int]:
    """(return log-probabilities, how many top alternatives): chat's boolean `logprobs` with
    `top_logprobs`, or completions' integer `logprobs` (the number of alternatives)."""
    if not chat:
        value = _number(body, "logprobs", None, int, 0, MAX_TOP_LOGPROBS)
        return value is not None, value or 0
    wanted = body.get("logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise ApiError(400, f"'logprobs' must be true or false, got {wanted!r}", "logprobs")
    top = _number(body, "top_logprobs", 0, int, 0, MAX_TOP_LOGPROBS)
    if top and not wanted:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return bool(wanted), top


def _check_unsupported(body: dict) -> None:
    for name, neutral in UNSUPPORTED_FIELDS.items():
        value = body.get(name)
        # 0.0 is 0, but False is not 0: booleans and numbers are told apart.
        if value is None or any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in neutral):
            continue
        allowed = f" (only {', '.join(repr(v) for v in neutral)})" if neutral else ""
        raise ApiError(400, f"'{name}' is not supported{allowed}", name)


def parse_request(body: Any, chat: bool, render_chat) -> GenerationRequest:
    """`render_chat(messages) -> str` applies the model's chat template."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required: the base model's name or an adapter's", "model")
    _check_unsupported(body)
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty list", "messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise ApiError(400, f"messages[{i}]: 'role' must be system, user or assistant", f"messages[{i}].role")
            content = m.get("content")
            if isinstance(content, list):  # OpenAI's content parts: text only
                if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                    raise ApiError(400, f"messages[{i}]: only text content parts are supported", f"messages[{i}]")
                m = {**m, "content": "".join(p.get("text", "") for p in content)}
                messages[i] = m
            if not isinstance(m.get("content"), str):
                raise ApiError(400, f"messages[{i}]: 'content' must be a string", f"messages[{i}].content")
        prompts = [render_chat(messages)]
    else:
        prompts = _prompts(body.get("prompt"))
    n = _number(body, "n", 1, int, 1, MAX_N)
    max_name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options")
    ignore_eos = body.get("ignore_eos", False)  # vLLM's extension, for benchmarks and tests
    if not isinstance(ignore_eos, bool):
        raise ApiError(400, "'ignore_eos' must be true or false", "ignore_eos")
    logprobs, top_logprobs = _logprobs(body, chat)
    if logprobs and stream:
        raise ApiError(400, "'logprobs' with 'stream' is not supported (ask without streaming)", "logprobs")
    echo = body.get("echo")
    if echo is not None and not isinstance(echo, bool):
        raise ApiError(400, f"'echo' must be true or false, got {echo!r}", "echo")
    if echo and (chat or stream):
        raise ApiError(400, "'echo' is supported for completions without 'stream' only", "echo")
    max_tokens = _number(body, max_name, 1, int, 0 if echo else 1)
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32):
        raise ApiError(400, f"'seed' must be an integer in [0, 2**32), got {seed!r}", "seed")
    try:
        params = SamplingParams(
            max_tokens=max(1, max_tokens),  # 0 (echo only): nothing is submitted
            temperature=_number(body, "temperature", 1.0, float, 0.0, 2.0),
            top_p=_number(body, "top_p", 1.0, float, 1e-9, 1.0),
            seed=seed,
            stop=_stop(body),
            ignore_eos=ignore_eos,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
        )
    except ValueError as e:
        raise ApiError(400, str(e)) from None
    given = max_name if body.get(max_name) is not None else None
    include_usage, echo, score_only = bool(options.get("include_usage")), bool(echo), max_tokens == 0
    return GenerationRequest(model, None, prompts, params, stream, include_usage, chat, given, n, echo, score_only)


def fit_max_tokens(req: GenerationRequest, prompt_tokens: int, max_model_len: int) -> SamplingParams:
    """The params for one prompt of `req`. Omitted, `max_tokens` is what the context leaves after
    the prompt (vLLM's rule); given and larger than that, it is a 400 naming the field and the
    limit. A prompt that fills the context is left to the engine, whose error names the prompt."""
    room = max_model_len - prompt_tokens
    if room <= 0 or req.score_only:
        return req.params
    if req.max_tokens_field is None:
        return dataclasses.replace(req.params, max_tokens=room)
    if req.params.max_tokens > room:
        raise ApiError(
            400,
            f"'{req.max_tokens_field}' is {req.params.max_tokens}, but the prompt has {prompt_tokens} tokens and "
            f"the context holds {max_model_len}: at most {room} can be generated",
            req.max_tokens_field,
        )
    return req.params


def new_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def openai_finish_reason(reason: str | None) -> str | None:
    return {"abort": "stop"}.get(reason, reason)


def usage_of(req: GenerationRequest, outputs) -> dict:
    """Prompt tokens counted once per prompt (not per sample), completion tokens per choice."""
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs[:: req.n])
    return usage(prompt_tokens, sum(len(o.token_ids) for o in outputs))


@dataclass
class EchoedPrompt:
    """A prompt repeated in its answer (`echo`): its text, ids and, with logprobs, each token's
    log-probability and alternatives (None for the first, which nothing predicts)."""

    text: str
    ids: list[int]
    logprobs: list[float | None] | None = None
    top_logprobs: list[list[tuple[int, float]] | None] | None = None


def prompt_logprobs(logits: np.ndarray, ids: list[int], temperature: float, top: int) -> tuple[list, list]:
    """The prompt's own log-probabilities from its logits [len(ids), vocab]: token i under the
    distribution after token i - 1, scaled by the temperature as generated tokens are."""
    rows = len(ids) - 1
    lp = logprobs_of(jnp.asarray(logits[:-1]), jnp.asarray(ids[1:], jnp.int32), jnp.full((rows,), temperature))
    chosen, top_ids, top_lps = (np.asarray(x) for x in (lp.chosen, lp.top_ids, lp.top))
    tops = [list(zip(top_ids[i, :top].tolist(), top_lps[i, :top].tolist(), strict=True)) for i in range(rows)]
    return [None, *chosen.tolist()], [None, *tops]


def completion_logprobs(out, token_text, echoed: EchoedPrompt | None = None) -> dict:
    """Completions' shape: parallel lists over the tokens (the prompt's first, when echoed);
    `text_offset` is each token's start in the concatenated token strings."""
    ids, logprobs = list(out.token_ids), list(out.logprobs)
    alternatives = list(out.top_logprobs or [[] for _ in ids])
    if echoed is not None:
        ids, logprobs = echoed.ids + ids, echoed.logprobs + logprobs
        alternatives = list(echoed.top_logprobs) + alternatives
    tokens = [token_text(t) for t in ids]
    offsets = [0]
    for text in tokens[:-1]:
        offsets.append(offsets[-1] + len(text))
    top = [None if alts is None else {token_text(t): lp for t, lp in alts} for alts in alternatives]
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(out, token_text) -> dict:
    """Chat's shape: `content`, one entry per generated token with its top alternatives."""

    def entry(token_id: int, logprob: float) -> dict:
        text = token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    alternatives = out.top_logprobs or [[] for _ in out.token_ids]
    return {
        "content": [
            {**entry(t, lp), "top_logprobs": [entry(a, alp) for a, alp in alts]}
            for t, lp, alts in zip(out.token_ids, out.logprobs, alternatives, strict=True)
        ]
    }


def response(req: GenerationRequest, rid: str, outputs, token_text=None, echoed=None) -> dict:
    """The whole answer: one choice per output, indexed in order. `token_text(id)`: a token's
    text, for log-probabilities (when the request asked for them); `echoed`: per prompt, its
    `EchoedPrompt` (with `echo`)."""
    choices = []
    for index, out in enumerate(outputs):
        reason = openai_finish_reason(out.finish_reason)
        if req.chat:
            message = {"role": "assistant", "content": out.text}
            logprobs = chat_logprobs(out, token_text) if req.params.logprobs else None
            choices.append({"index": index, "message": message, "finish_reason": reason, "logprobs": logprobs})
        else:
            echo = echoed[index // req.n] if echoed else None
            logprobs = completion_logprobs(out, token_text, echo) if req.params.logprobs else None
            text = echo.text + out.text if echo else out.text
            choices.append({"index": index, "text": text, "finish_reason": reason, "logprobs": logprobs})
    return {
        "id": rid,
        "object": "chat.completion" if req.chat else "text_completion",
        "created": int(time.time()),
        "model": req.model,
        "choices": choices,
        "usage": usage_of(req, outputs),
    }


def chunk(
    req: GenerationRequest, rid: str, created: int, index: int, text: str | None, finish_reason: str | None, first=False
):
    """One stream chunk of choice `index`: a text delta, or (with `finish_reason`) its end."""
    if req.chat:
        delta: dict = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice = {
            "index": index,
            "delta": delta,
            "finish_reason": openai_finish_reason(finish_reason),
            "logprobs": None,
        }
        kind = "chat.completion.chunk"
    else:
        choice = {
            "index": index,
            "text": text or "",
            "finish_reason": openai_finish_reason(finish_reason),
            "logprobs": None,
        }
        kind = "text_completion"
    return {"id": rid, "object": kind, "created": created, "model": req.model, "choices": [choice]}


def usage_chunk(req: GenerationRequest, rid: str, created: int, outputs) -> dict:
    kind = "chat.completion.chunk" if req.chat else "text_completion"
    return {
        "id": rid,
        "object": kind,
        "created": created,
        "model": req.model,
        "choices": [],
        "usage": usage_of(req, outputs),
    }
