"""The OpenAI wire format as Pydantic models: what FastAPI validates and what `/openapi.json` shows.

Requests are validated strictly where a wrong type would silently change the answer (`"1"` is
not a number, `true` is not an integer), and ranges are part of each field, so the schema says
what the server accepts: every number and list has a lower and an upper bound, each taken from
`plora_jax.limits` (where `SamplingParams` and the input processor read them too), so nothing a
client sends can overflow what the engine holds. Unknown fields are ignored, as OpenAI does. Fields of OpenAI's API
this server does not implement are declared too (a client generated from the schema can send
them), documented as such, and refused with 400 unless neutral (`UNSUPPORTED_FIELDS`).
Rules across fields (echo with streaming, top_logprobs without logprobs, max_tokens against the
context) are checked where the request becomes engine calls (`protocol.parse_request`).

Validation errors become OpenAI's error JSON (`describe_error`, called by the server's handler),
with `param` naming the field (`messages[0].role`) and the message saying what was wrong and
what was sent.

Responses and stream chunks have models too: FastAPI checks every successful JSON answer against
its model; error bodies, `/health` and stream chunks are written directly and checked by the
tests (schemathesis against the schema, and each stream chunk against its model).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from plora_jax.limits import (
    INT32_MAX,
    MAX_MESSAGES,
    MAX_N,
    MAX_NAME_CHARS,
    MAX_PATH_CHARS,
    MAX_PENALTY,
    MAX_PROMPTS,
    MAX_REPETITION_PENALTY,
    MAX_STOP,
    MAX_STOP_CHARS,
    MAX_STOP_TOKEN_IDS,
    MAX_TEMPERATURE,
    MAX_TOKENS,
    MAX_TOP_K,
    MAX_TOP_LOGPROBS,
    MAX_USER_CHARS,
    MIN_REPETITION_PENALTY,
    MIN_TEMPERATURE,
    SEED_BOUND,
)

_STRICT = ConfigDict(strict=True, extra="ignore")


def _is_token(t) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= INT32_MAX


Text = Annotated[str, Field(min_length=1)]
TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS)]
StopText = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
Prompt = Text | Annotated[list[Text], Field(min_length=1, max_length=MAX_PROMPTS)] | TokenIds
Prompt |= Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]


# OpenAI fields this server does not implement. Ignoring one would answer with something the
# client did not ask for (plain text for a tool call or a JSON schema), so a request that sets
# one gets 400 naming it. Each maps to its neutral values, which are accepted (and are all the
# schema allows).
UNSUPPORTED_FIELDS = {
    "best_of": (1,),
    "logit_bias": ({},),
    "suffix": ("",),
    "tools": ([],),
    "tool_choice": ("none",),
    "parallel_tool_calls": (),  # meaningless without tools: any value is refused
    "functions": ([],),
    "function_call": ("none",),
    "response_format": ({"type": "text"},),
    "min_p": (0,),  # vLLM's sampling extensions the sampler does not have
    "min_tokens": (0,),
}


class TextFormat(BaseModel):
    model_config = _STRICT
    type: Literal["text"]


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool | None = Field(None, description="Send a last chunk with the usage of the whole request.")


class _Sampling(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = _STRICT
    model: Name = Field(description="The base model's name or a registered adapter's (`/v1/models`).")
    max_tokens: int | None = Field(
        None, ge=0, le=MAX_TOKENS, description="Tokens to generate; omitted: up to the context. 0 only with `echo`."
    )
    temperature: float | None = Field(
        None, ge=0, le=MAX_TEMPERATURE, description=f"Below {MIN_TEMPERATURE}: greedy. Default 1."
    )
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus mass. Default 1.")
    top_k: int | None = Field(
        None,
        ge=-1,
        le=MAX_TOP_K,
        description="vLLM's extension: sample among the k likeliest (-1, 0: all; beyond the vocabulary: all).",
    )
    n: int | None = Field(None, ge=1, le=MAX_N, description="Samples of each prompt; sample j uses seed + j.")
    stream: bool | None = Field(None, description="Answer as server-sent events (OpenAI's chunks, then [DONE]).")
    stream_options: StreamOptions | None = None
    stop: StopText | Annotated[list[StopText], Field(max_length=MAX_STOP)] | None = Field(
        None, description=f"Up to {MAX_STOP} non-empty stop strings of at most {MAX_STOP_CHARS} characters."
    )
    seed: int | None = Field(None, ge=0, lt=SEED_BOUND, description="Makes sampling reproducible, whatever the batch.")
    frequency_penalty: float | None = Field(
        None, ge=-MAX_PENALTY, le=MAX_PENALTY, description="Minus this times the count of each token generated so far."
    )
    presence_penalty: float | None = Field(
        None, ge=-MAX_PENALTY, le=MAX_PENALTY, description="Minus this for each token generated so far."
    )
    repetition_penalty: float | None = Field(
        None,
        ge=MIN_REPETITION_PENALTY,
        le=MAX_REPETITION_PENALTY,
        description="vLLM's extension: divides positive logits of tokens in the prompt or output (1: off).",
    )
    ignore_eos: bool | None = Field(None, description="vLLM's extension: do not stop at the end-of-sequence token.")
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = Field(
        None, description="vLLM's extension: token ids that end generation too (not shown in the text)."
    )
    include_stop_str_in_output: bool | None = Field(
        None, description="vLLM's extension: keep the stop string that ended generation in the text."
    )
    skip_special_tokens: bool | None = Field(
        None, description="vLLM's extension: leave special tokens out of the text (default true)."
    )
    user: str | None = Field(None, max_length=MAX_USER_CHARS, description="Accepted and ignored.")
    best_of: Literal[1] | None = Field(None, description="Not supported: only 1.")
    min_p: Literal[0] | None = Field(None, description="Not supported: only 0.")
    min_tokens: Literal[0] | None = Field(None, description="Not supported: only 0.")
    logit_bias: Annotated[dict[str, float], Field(max_length=0)] | None = Field(None, description="Not supported.")

    @field_validator(*UNSUPPORTED_FIELDS, mode="before", check_fields=False)
    @classmethod
    def _unsupported(cls, value, info):
        neutral = UNSUPPORTED_FIELDS[info.field_name]
        # 0.0 is 0, but False is not 0: booleans and numbers are told apart.
        if value is None or any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in neutral):
            return value
        allowed = f" (only {', '.join(repr(v) for v in neutral)})" if neutral else ""
        raise ValueError(f"'{info.field_name}' is not supported{allowed}")

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value):
        stop = [value] if isinstance(value, str) else value
        if value is not None and (
            not isinstance(stop, list)
            or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop)
            or len(stop) > MAX_STOP
        ):
            raise ValueError(
                f"'stop' must be a non-empty string or a list of up to {MAX_STOP} of them, "
                f"each at most {MAX_STOP_CHARS} characters"
            )
        return value


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    prompt: Prompt = Field(
        description=f"A string, a list of strings, a list of token ids or a list of those (up to {MAX_PROMPTS})."
    )
    echo: bool | None = Field(None, description="Repeat the prompt (with its logprobs, if asked) before the text.")
    logprobs: int | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS, description="Return each token's logprob and this many likeliest alternatives."
    )
    suffix: Literal[""] | None = Field(None, description="Not supported: only ''.")

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, value):
        listed = isinstance(value, list) and bool(value)
        if isinstance(value, str) or (listed and all(_is_token(t) for t in value)):
            prompts = [value]
        elif listed and all(
            isinstance(p, str) or (isinstance(p, list) and p and all(map(_is_token, p))) for p in value
        ):
            prompts = value if len({isinstance(p, str) for p in value}) == 1 else []  # not mixed
        else:
            prompts = []
        if not prompts or any(p == "" for p in prompts):
            raise ValueError(
                "'prompt' must be a non-empty string, a list of them, a list of token ids (integers in "
                f"[0, {INT32_MAX}]) or a list of those"
            )
        if len(prompts) > MAX_PROMPTS:
            raise ValueError(f"'prompt' holds {len(prompts)} prompts, more than {MAX_PROMPTS}")
        return value


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart] = Field(description="Text, or OpenAI's content parts (text parts only).")
    name: Name | None = Field(None, description="The participant's name, given to the chat template.")

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(
        None, ge=1, le=MAX_TOKENS, description="OpenAI's newer name for max_tokens."
    )
    logprobs: bool | None = Field(None, description="Return each generated token's logprob.")
    top_logprobs: int | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS, description="With logprobs: this many likeliest alternatives per token."
    )
    tools: Annotated[list[dict[str, Any]], Field(max_length=0)] | None = Field(None, description="Not supported.")
    tool_choice: Literal["none"] | None = Field(None, description="Not supported: only 'none'.")
    parallel_tool_calls: None = Field(None, description="Not supported (no tools).")
    functions: Annotated[list[dict[str, Any]], Field(max_length=0)] | None = Field(None, description="Not supported.")
    function_call: Literal["none"] | None = Field(None, description="Not supported: only 'none'.")
    response_format: TextFormat | None = Field(None, description="Not supported: only {'type': 'text'}.")
    echo: bool | None = Field(None, description="vLLM's chat extension; not supported: only false.")


class LoadLoraRequest(BaseModel):
    """POST /v1/load_lora_adapter (vLLM's body)."""

    model_config = _STRICT
    lora_name: Name
    lora_path: str = Field(
        min_length=1, max_length=MAX_PATH_CHARS, description="A PEFT folder inside a configured adapter folder."
    )


class UnloadLoraRequest(BaseModel):
    """POST /v1/unload_lora_adapter (vLLM's body)."""

    model_config = _STRICT
    lora_name: Name


# --- responses -------------------------------------------------------------------------------
FinishReason = Literal["stop", "length", "abort"]  # abort: cut short (vLLM's)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]  # None: an echoed prompt's first token
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason | None
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChunkChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: CompletionLogprobs | None = None  # of this chunk's tokens


class CompletionChunk(BaseModel):
    """One server-sent event of a streamed completion (the last, with include_usage: no choices, usage)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: FinishReason | None
    logprobs: ChatLogprobs | None = None  # of this chunk's tokens


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str | None
    parent: str | None = None  # adapters: the base model
    rank: int | None = None  # adapters: LoRA rank
    residency: str | None = None  # adapters: where its weights are now (`plora_jax.metrics.RESIDENCIES`; cluster)


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["warming", "ok", "stalled", "failed"]
    compiled: int | None = None  # executables ready
    total: int | None = None  # executables of the compile plan
    engine: str | None = None  # the cluster gateway: what it fronts
    detail: str | None = None  # why it is not ok


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error, and the last event of a stream that failed."""

    error: ErrorInfo


def param_of(loc) -> str | None:
    """A validation error's location as OpenAI names it: ('body', 'messages', 0, 'role') ->
    'messages[0].role'. Union branches (pydantic names them by type) and dict keys are left out."""
    name = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            name += f"[{part}]" if name else ""
        elif part in _FIELD_NAMES:
            name += f".{part}" if name else part
    return name or None


def describe_error(error: dict) -> tuple[str, str | None]:
    """(message, param) of one pydantic error."""
    kind, loc, msg = error.get("type", ""), tuple(error.get("loc", ())), error.get("msg", "")
    if kind == "json_invalid":
        return f"malformed JSON body: {error.get('ctx', {}).get('error', msg)}", None
    param = param_of(loc)
    if param is None:
        if isinstance(error.get("input"), bytes):  # FastAPI hands on a body it did not read as JSON
            return "the request body must be JSON (send 'Content-Type: application/json')", None
        return "the request body must be a JSON object", None
    if kind == "missing":
        return f"'{param}' is required", param
    if kind == "value_error":
        return msg.removeprefix("Value error, "), param
    sent = repr(error.get("input"))
    sent = sent if len(sent) <= 80 else sent[:77] + "..."
    return f"'{param}': {msg[0].lower() + msg[1:] if msg else 'invalid'}, got {sent}", param


_REQUESTS = (CompletionRequest, ChatCompletionRequest, ChatMessage, StreamOptions, TextPart, LoadLoraRequest)
_FIELD_NAMES = frozenset(name for model in _REQUESTS for name in model.model_fields)
