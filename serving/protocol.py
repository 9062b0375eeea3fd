"""The OpenAI wire format's meaning: validated requests (`serving.schema`) into engine calls, and
responses, stream chunks and error bodies out.

The models check each field's type and range, and refuse every OpenAI field we do not
implement (`schema.UNSUPPORTED_FIELDS`) set to anything but its neutral value; here are the
rules across fields and those that depend on the model (the context length). Every refusal is an
`ApiError` carrying the HTTP status and OpenAI's error JSON, with `param` naming the field.
"""

from __future__ import annotations

import dataclasses
import math
import time
import uuid
from dataclasses import dataclass

from plora_jax.engine.sampling import SamplingParams
from plora_jax.limits import MAX_LOGPROB_ENTRIES, SEED_BOUND

from .contract import PromptLogprobs
from .schema import ChatCompletionRequest, CompletionRequest

# OpenAI's logprobs are JSON numbers: -Infinity and NaN are not. A token the distribution rules
# out (-inf) or an adapter whose numbers overflowed (NaN) gets vLLM's floor instead.
MIN_LOGPROB = -9999.0


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
            403: "permission_error",
            404: "not_found_error",
            413: "invalid_request_error",
            415: "invalid_request_error",
            429: "rate_limit_error",
        }.get(self.status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class GenerationRequest:
    """A parsed completion or chat request."""

    model: str
    adapter: str | None  # None: the base model
    prompts: list[str | list[int]]  # text or token ids (token ids once tokenized); chat: filled when rendered
    params: SamplingParams
    stream: bool
    include_usage: bool  # stream_options.include_usage
    chat: bool
    max_tokens_field: str | None = None  # the field that set max_tokens; None: omitted (up to the context)
    n: int = 1  # samples of each prompt
    echo: bool = False  # completions: the answer repeats the prompt (with its logprobs, if asked)
    score_only: bool = False  # echo with max_tokens 0: nothing is generated
    messages: list[dict] | None = None  # chat: the conversation, for the chat template

    def choices(self, params_per_prompt: list[SamplingParams]) -> list[tuple[str | list[int], SamplingParams]]:
        """(prompt, params) of every choice, in OpenAI's order (prompt by prompt, then sample by
        sample). Sample j of a seeded request uses seed + j, so sample 0 is the single request's."""
        out = []
        for prompt, params in zip(self.prompts, params_per_prompt, strict=True):
            for j in range(self.n):
                seed = params.seed if params.seed is None or j == 0 else (params.seed + j) % SEED_BOUND
                out.append((prompt, dataclasses.replace(params, seed=seed)))
        return out


def _value(value, default):
    return default if value is None else value


def parse_request(body: CompletionRequest | ChatCompletionRequest) -> GenerationRequest:
    """The engine calls of a validated request (`serving.schema`): the rules across fields are
    checked here (each field's own, and the refusal of `schema.UNSUPPORTED_FIELDS`, were checked
    by the model). A chat's prompt is left to render (`messages`): that is work, done off the
    event loop by the caller."""
    chat = isinstance(body, ChatCompletionRequest)
    stream = bool(body.stream)
    messages = None
    if chat:
        messages = [{"role": m.role, "content": m.text} | ({"name": m.name} if m.name else {}) for m in body.messages]
        prompts = []
        logprobs, top_logprobs, echo = bool(body.logprobs), _value(body.top_logprobs, 0), False
        if body.echo:
            raise ApiError(400, "'echo' is supported for completions without 'stream' only", "echo")
        if top_logprobs and not logprobs:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
    else:
        value = body.prompt
        if isinstance(value, str):
            prompts = [value]
        elif all(isinstance(t, int) for t in value):
            prompts = [list(value)]
        else:
            prompts = list(value)
        logprobs, top_logprobs, echo = body.logprobs is not None, body.logprobs or 0, bool(body.echo)
        if echo and stream:
            raise ApiError(400, "'echo' is supported for completions without 'stream' only", "echo")
    max_name = "max_completion_tokens" if chat and body.max_completion_tokens is not None else "max_tokens"
    given = getattr(body, max_name)
    max_tokens = _value(given, 1)
    if max_tokens == 0 and not echo:
        raise ApiError(400, f"'{max_name}' must be >= 1 (0 only with 'echo')", max_name)
    stop = body.stop
    try:
        params = SamplingParams(
            max_tokens=max(1, max_tokens),  # 0 (echo only): nothing is submitted
            temperature=_value(body.temperature, 1.0),
            top_p=_value(body.top_p, 1.0),
            top_k=_value(body.top_k, -1),
            seed=body.seed,
            stop=(stop,) if isinstance(stop, str) else tuple(stop or ()),
            stop_token_ids=tuple(body.stop_token_ids or ()),
            ignore_eos=bool(body.ignore_eos),
            include_stop_str_in_output=bool(body.include_stop_str_in_output),
            skip_special_tokens=_value(body.skip_special_tokens, True),
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            frequency_penalty=_value(body.frequency_penalty, 0.0),
            presence_penalty=_value(body.presence_penalty, 0.0),
            repetition_penalty=_value(body.repetition_penalty, 1.0),
        )
    except ValueError as e:
        raise ApiError(400, str(e)) from None
    if body.stream_options is not None and not stream:
        raise ApiError(400, "'stream_options' is only allowed with 'stream': true", "stream_options")
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return GenerationRequest(
        body.model,
        None,
        prompts,
        params,
        stream,
        include_usage,
        chat,
        max_name if given is not None else None,
        _value(body.n, 1),
        echo,
        max_tokens == 0,
        messages,
    )


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


def finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else MIN_LOGPROB


def check_logprob_budget(req: GenerationRequest, params_per_prompt: list[SamplingParams]) -> None:
    """A 400 naming the field when the answer would hold more than `MAX_LOGPROB_ENTRIES`
    log-probabilities: over every choice, (its echoed prompt's tokens + the tokens it may
    generate) x (1 + top_logprobs). Checked before any work is done for the request."""
    if not req.params.logprobs:
        return
    per_entry = 1 + req.params.top_logprobs
    entries = 0
    for prompt, params in zip(req.prompts, params_per_prompt, strict=True):
        echoed = len(prompt) if req.echo else 0
        generated = 0 if req.score_only else params.max_tokens
        entries += req.n * (echoed + generated) * per_entry
    if entries > MAX_LOGPROB_ENTRIES:
        field = ("top_logprobs" if req.params.top_logprobs else "logprobs") if req.chat else "logprobs"
        raise ApiError(
            400,
            f"'{field}': this request could return {entries} log-probabilities (choices x (echoed + generated "
            f"tokens) x (1 + alternatives)), more than the server's limit of {MAX_LOGPROB_ENTRIES}; lower "
            "max_tokens, n, the number or length of prompts, or the alternatives asked for",
            field,
        )


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


def echo_logprobs(scored: PromptLogprobs, top: int) -> tuple[list, list]:
    """An echoed prompt's (logprobs, top_logprobs) from the engine's scores: the first token's
    are None (nothing predicts it), each later one's its own and its `top` alternatives."""
    chosen = scored.chosen.tolist()
    ids, values = scored.top_ids[:, :top].tolist(), scored.top[:, :top].tolist()
    tops = [list(zip(i, v, strict=True)) for i, v in zip(ids, values, strict=True)]
    return [None, *chosen], [None, *tops]


def completion_logprobs(out, token_text, echoed: EchoedPrompt | None = None, offset: int = 0) -> dict:
    """Completions' shape: parallel lists over the tokens (the prompt's first, when echoed) of
    `out` (a `RequestOutput`, or a `StreamEvent` of a stream); `text_offset` is each token's start
    in the concatenated token strings (from `offset`: the length of those already streamed)."""
    ids, logprobs = list(out.token_ids), list(out.logprobs)
    alternatives = list(out.top_logprobs or [[] for _ in ids])
    if echoed is not None:
        ids, logprobs = echoed.ids + ids, echoed.logprobs + logprobs
        alternatives = list(echoed.top_logprobs) + alternatives
    tokens = [token_text(t) for t in ids]
    offsets = [offset]
    for text in tokens[:-1]:
        offsets.append(offsets[-1] + len(text))
    top = [None if alts is None else {token_text(t): finite(lp) for t, lp in alts} for alts in alternatives]
    logprobs = [None if lp is None else finite(lp) for lp in logprobs]
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(out, token_text) -> dict:
    """Chat's shape: `content`, one entry per generated token (of a `RequestOutput` or a stream's
    `StreamEvent`) with its top alternatives."""

    def entry(token_id: int, logprob: float) -> dict:
        text = token_text(token_id)
        return {"token": text, "logprob": finite(logprob), "bytes": list(text.encode("utf-8"))}

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
        reason = out.finish_reason  # "abort" (cut short) is vLLM's, never passed off as "stop"
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
    req: GenerationRequest,
    rid: str,
    created: int,
    index: int,
    text: str | None,
    finish_reason: str | None,
    first=False,
    logprobs: dict | None = None,
):
    """One stream chunk of choice `index`: a text delta (with its tokens' `logprobs`, in the
    endpoint's shape, when asked), or (with `finish_reason`) its end."""
    if req.chat:
        delta: dict = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice = {
            "index": index,
            "delta": delta,
            "finish_reason": finish_reason,
            "logprobs": logprobs,
        }
        kind = "chat.completion.chunk"
    else:
        choice = {
            "index": index,
            "text": text or "",
            "finish_reason": finish_reason,
            "logprobs": logprobs,
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
