"""Completions and chat completions: a validated body into engine requests, and their answer.

One request must never cost the others more than its admitted share, so the work is done in
this order:

1. checks that cost nothing: the schema, the rules across fields, the model's name;
2. rendering and tokenization in a pool of their own (two threads; at most `MAX_TOKENIZING`
   requests queued for it, then 429), each text's length first held against what the context
   could take (`Tokenizer.max_token_chars` characters a token);
3. `max_tokens` against the context, and the log-probability budget (400 naming the field);
4. admission (`Admission`, 429), counted by the API itself;
5. echo scoring: admitted work, in a worker thread, one prompt at a time and one chunk per engine
   call, reduced to [tokens, 20] on the device, stopped between chunks if the client leaves;
6. submit, then the answer: server-sent events (`EventStream`), or JSON built in a worker
   thread, awaited while watching for the client to go away.

However a request ends (done, failed, its client gone before or after the first byte), its
engine requests are cancelled and its admission released, once.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from plora_jax.engine.inputs import InvalidInput
from plora_jax.engine.outputs import RequestFailed, RequestOutput
from plora_jax.limits import MAX_TOKENIZING
from plora_jax.lora.peft import AdapterError, AdapterRemoved

from .contract import ServingEngine, ServingHandle
from .metrics import ServerMetrics
from .protocol import (
    ApiError,
    EchoedPrompt,
    GenerationRequest,
    chat_logprobs,
    check_logprob_budget,
    chunk,
    completion_logprobs,
    echo_logprobs,
    fit_max_tokens,
    new_id,
    parse_request,
    response,
    usage_chunk,
)
from .schema import ChatCompletionRequest, CompletionRequest
from .sources import Resolver

log = logging.getLogger(__name__)


class Admission:
    """The 429 rule, on the API's own count of choices in flight (submitted, not yet ended), so
    a burst is bounded even while the engine warms up and publishes nothing. Waiting choices are
    those in flight less those the engine runs (its published `running`, which may lag a step:
    the estimate then errs toward refusing). The event loop is its one writer."""

    def __init__(self, max_queue_of: Callable[[], int], running_of: Callable[[], int]):
        self.max_queue_of, self.running_of = max_queue_of, running_of
        self.in_flight = 0

    def admit(self, n: int) -> Ticket:
        limit = self.max_queue_of()
        waiting = max(0, self.in_flight - self.running_of())
        if waiting + n > limit:
            raise ApiError(429, f"the waiting queue is full ({limit} requests); retry later")
        self.in_flight += n
        return Ticket(self, n)


class Ticket:
    """One request's admitted choices; each is released once (`release` as it ends, `close` for the rest)."""

    def __init__(self, admission: Admission, n: int):
        self.admission, self.held = admission, n

    def release(self, n: int = 1) -> None:
        n = min(n, self.held)
        self.held -= n
        self.admission.in_flight -= n

    def close(self) -> None:
        self.release(self.held)


def _json(payload: dict) -> bytes:
    return json.dumps(payload, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'), allow_nan=False)}\n\n"


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _retrieved(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


def _param(field: str, chat: bool) -> str | None:
    """The API's name for a field the engine names."""
    if field.startswith(("prompt", "token_ids")):
        return "messages" if chat else "prompt"
    if field.startswith("adapter"):
        return "model"
    return field.removeprefix("sampling_params.") if field.startswith("sampling_params.") else None


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def request_failed(e: RequestFailed) -> ApiError:
    """A request the engine failed: 404 if its adapter was removed before it ran; 500 with the
    adapter's own error (its files named by folder name) if it could not be loaded, or with the
    failure's own message when nothing caused it (a gateway's words); else 500 naming only the
    kind of failure (an engine's internal error may name its files)."""
    cause = e.__cause__
    if isinstance(cause, AdapterRemoved):
        return ApiError(404, str(e), "model", "model_not_found")
    if cause is None or isinstance(cause, AdapterError):  # our own words (a gateway's), or an adapter's
        return ApiError(500, str(e))
    return ApiError(500, f"the engine failed the request ({type(cause).__name__})")


async def first(work: Awaitable, request: Request):
    """`work`'s result, unless the client disconnects first: then ClientGone (and `work` is
    cancelled; a thread it runs in finishes on its own)."""
    task = asyncio.ensure_future(work)
    task.add_done_callback(_retrieved)
    watcher = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            raise ClientGone
        return task.result()
    finally:
        watcher.cancel()
        task.cancel()


class EventStream(StreamingResponse):
    """Server-sent events whose end, however it comes, runs `close`: after the last event, on an
    error, and when the client left before the first byte (then the events' generator never
    starts, and its own `finally` would never run)."""

    def __init__(self, events: AsyncIterator[str], close: Callable[[], None]):
        super().__init__(events, media_type="text/event-stream")
        self._close = close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._close()


class Generation:
    """The completions and chat endpoints over one engine (`__call__(body, request)`)."""

    def __init__(
        self,
        engine: ServingEngine,
        model_name: str,
        metrics: ServerMetrics,
        admission: Admission,
        max_queue_of: Callable[[], int],
        resolver: Resolver,
    ):
        self.engine, self.model_name, self.metrics = engine, model_name, metrics
        self.resolver = resolver  # registers a template's adapter on its first request
        self.admission, self.max_queue_of = admission, max_queue_of
        # Work before admission has its own pool: a flood of long prompts waits here (and gets
        # 429 past MAX_TOKENIZING), not in front of admitted requests' answers.
        self.tokenizer_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="plora-tokenize")
        self.tokenizing = 0  # requests in or waiting for the pool (event loop only)
        # Echo scoring waits on the engine for minutes at a time (one prompt at a time across the
        # server: the engine scores one session at once); its own thread keeps the shared pool
        # (answers, /v1/models, loads) free.
        self.scoring_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="plora-echo")

    def close(self) -> None:
        """Stop the pools' threads (the app's shutdown)."""
        self.tokenizer_pool.shutdown(wait=False, cancel_futures=True)
        self.scoring_pool.shutdown(wait=False, cancel_futures=True)

    async def __call__(self, body: CompletionRequest | ChatCompletionRequest, request: Request) -> Response:
        endpoint = "chat" if isinstance(body, ChatCompletionRequest) else "completions"
        try:
            return await self._generate(body, request, endpoint)
        except ApiError as e:
            self.metrics.finished(endpoint, str(e.status))
            raise
        except ClientGone:
            self.metrics.finished(endpoint, "disconnected")
            return Response(status_code=499)  # nobody reads it: the client is gone

    async def _resolve_model(self, name: str) -> str | None:
        if name == self.model_name:
            return None
        if self.engine.has_adapter(name):
            return name
        if self.resolver.can_resolve(name):
            await self.resolver.resolve(name)
            return name
        raise ApiError(404, f"the model '{name}' does not exist", "model", "model_not_found")

    async def _generate(self, body, request: Request, endpoint: str) -> Response:
        req = parse_request(body)
        req.adapter = await self._resolve_model(req.model)
        texts = await self._tokenized(req)
        per_prompt = [fit_max_tokens(req, len(ids), self.engine.max_model_len) for ids in req.prompts]
        choices = req.choices(per_prompt)
        max_queue = self.max_queue_of()
        if len(choices) > max(1, max_queue):  # could never be admitted (one choice always may be, later)
            message = f"{len(choices)} choices (prompts x n) are more than the queue holds ({max_queue})"
            raise ApiError(400, message, "prompt" if len(req.prompts) > max(1, max_queue) else "n")
        check_logprob_budget(req, per_prompt)
        ticket = self.admission.admit(len(choices))
        try:
            echoed = await self._echo(req, texts, request) if req.echo else None
            rid = new_id(req.chat)
            if req.score_only:  # echo with max_tokens 0: the prompts' scores are the whole answer
                ticket.close()
                return await self._scores(req, rid, echoed, endpoint)
            handles = self._submit(choices, req)
        except BaseException:
            ticket.close()
            raise
        if req.stream:
            stream = _Stream(self, req, rid, handles, ticket, endpoint)
            return EventStream(stream.events(), stream.close)
        return await self._answer(request, req, rid, handles, ticket, echoed, endpoint)

    async def _tokenized(self, req: GenerationRequest) -> list[str | None]:
        if self.tokenizing >= MAX_TOKENIZING:
            raise ApiError(429, f"{MAX_TOKENIZING} requests are being tokenized; retry later")
        self.tokenizing += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.tokenizer_pool, self._tokenize, req)
        finally:
            self.tokenizing -= 1

    def _tokenize(self, req: GenerationRequest) -> list[str | None]:
        """Render (chat) and tokenize the prompts, in a worker thread, refusing a text longer
        than the context could hold before any work on it. Returns the prompts' texts."""
        tokenizer, context = self.engine.tokenizer, self.engine.max_model_len
        limit, field = context * tokenizer.max_token_chars, "messages" if req.chat else "prompt"

        def check(chars: int) -> None:
            if chars > limit:
                message = f"'{field}' holds {chars} characters; a context of {context} tokens holds at most {limit}"
                raise ApiError(400, message, field)

        if req.chat:
            check(sum(len(m["content"]) for m in req.messages))
            try:
                req.prompts = [tokenizer.apply_chat_template(req.messages)]
            except ValueError as e:  # no template, or the template refused these messages
                raise ApiError(400, str(e), "messages") from None
        texts = [p if isinstance(p, str) else None for p in req.prompts]
        for text in texts:
            if text is not None:
                check(len(text))
        req.prompts = [p if isinstance(p, list) else tokenizer.encode(p) for p in req.prompts]
        return texts

    async def _echo(self, req: GenerationRequest, texts: list[str | None], request: Request) -> list[EchoedPrompt]:
        """Each prompt's text (as sent, or decoded from its ids) and ids, with logprobs its
        scores from the engine (a worker thread, one prompt at a time; if the client leaves, the
        engine stops at its next chunk and ClientGone is raised)."""
        decode = self.engine.tokenizer.decode
        temperature = 0.0 if req.params.greedy else req.params.temperature  # as the sampler scales
        echoed = []
        for ids, text in zip(req.prompts, texts, strict=True):
            if text is None:
                text = await asyncio.to_thread(decode, ids, skip_special_tokens=False)
            echo = EchoedPrompt(text, list(ids))
            if req.params.logprobs:
                cancel = threading.Event()
                score = functools.partial(self.engine.prompt_logprobs, ids, req.adapter, temperature, cancel)
                scoring = asyncio.get_running_loop().run_in_executor(self.scoring_pool, score)
                try:
                    scored = await first(scoring, request)
                except NotImplementedError:
                    message = "'echo' with logprobs is not supported by this server's engine"
                    raise ApiError(400, message, "echo") from None
                except InvalidInput as e:
                    raise ApiError(400, str(e), _param(e.field, req.chat)) from None
                except AdapterRemoved as e:
                    raise ApiError(404, str(e), "model", "model_not_found") from None
                except AdapterError as e:  # its load failed: as a generation request is answered
                    raise ApiError(500, str(e)) from None
                finally:
                    cancel.set()  # however this ends (left, shut down, failed), the engine stops scoring
                echo.logprobs, echo.top_logprobs = echo_logprobs(scored, req.params.top_logprobs)
            echoed.append(echo)
        return echoed

    def _submit(self, choices, req: GenerationRequest) -> list[ServingHandle]:
        handles = []
        try:
            for prompt, params in choices:
                handles.append(self.engine.submit(prompt, params, req.adapter))
        except BaseException as e:  # none of the request's choices may outlive a failed submit
            for handle in handles:
                handle.cancel()
            if isinstance(e, InvalidInput):
                raise ApiError(400, str(e), _param(e.field, req.chat)) from None
            raise
        return handles

    def token_text(self) -> Callable[[int], str]:
        """A token's text (memoized for one answer: the same tokens recur)."""
        decode, memo = self.engine.tokenizer.decode, {}

        def text(token: int) -> str:
            if token not in memo:
                memo[token] = decode([token], skip_special_tokens=False)
            return memo[token]

        return text

    async def _scores(self, req: GenerationRequest, rid: str, echoed, endpoint: str) -> Response:
        outputs = [RequestOutput("", e.ids, [], "", "length", logprobs=[], top_logprobs=[]) for e in echoed]
        outputs = [o for o in outputs for _ in range(req.n)]
        body = await asyncio.to_thread(lambda: _json(response(req, rid, outputs, self.token_text(), echoed)))
        self.metrics.finished(endpoint, "200")
        return Response(body, media_type="application/json")

    async def _answer(self, request: Request, req, rid, handles, ticket: Ticket, echoed, endpoint) -> Response:
        """The whole answer, awaited while watching the client: if it goes away first, every
        choice is cancelled at once (its KV blocks freed at the engine's next step)."""

        async def result(handle: ServingHandle) -> RequestOutput:
            try:
                return await handle.aresult()
            finally:
                ticket.release()

        try:
            outputs = await first(asyncio.gather(*(result(h) for h in handles)), request)
        except RequestFailed as e:
            raise request_failed(e) from None
        finally:
            for handle in handles:
                handle.cancel()  # a no-op once finished; at once if the client left
            ticket.close()
        body = await asyncio.to_thread(lambda: _json(response(req, rid, outputs, self.token_text(), echoed)))
        self.metrics.finished(endpoint, "200", *outputs)
        return Response(body, media_type="application/json")


class _Stream:
    """One streamed answer: the choices' events merged as they come (each chunk carries its
    choice's index); an engine failure ends it with an error chunk, never a silent truncation."""

    def __init__(self, gen: Generation, req: GenerationRequest, rid: str, handles, ticket: Ticket, endpoint: str):
        self.gen, self.req, self.rid, self.handles, self.ticket = gen, req, rid, handles, ticket
        self.endpoint = endpoint
        self.status: str | None = None  # the metrics label, once counted
        self.pumps: list[asyncio.Task] = []

    def close(self) -> None:
        """Idempotent: stop reading, cancel what runs, release the admission, count the end."""
        for task in self.pumps:
            task.cancel()
        for handle in self.handles:
            handle.cancel()
        self.ticket.close()
        self._count("disconnected")

    def _count(self, status: str, *outputs) -> None:
        if self.status is None:
            self.status = status
            self.gen.metrics.finished(self.endpoint, status, *outputs)

    async def _pump(self, index: int, handle: ServingHandle, queue: asyncio.Queue) -> None:
        try:
            async for event in handle.events():
                await queue.put((index, event, None))
        except Exception as e:  # reported in the stream, whatever it is
            await queue.put((index, None, e))
        finally:
            self.ticket.release()

    async def events(self) -> AsyncIterator[str]:
        req, rid, created = self.req, self.rid, int(time.time())
        queue: asyncio.Queue = asyncio.Queue()
        self.pumps = [asyncio.create_task(self._pump(i, h, queue)) for i, h in enumerate(self.handles)]
        outputs: list = [None] * len(self.handles)
        offsets = [0] * len(self.handles)  # completions' text_offset continues across chunks
        token_text = self.gen.token_text()
        try:
            if req.chat:
                for index in range(len(self.handles)):
                    yield _sse(chunk(req, rid, created, index, "", None, first=True))
            remaining = len(self.handles)
            while remaining:
                index, event, error = await queue.get()
                if error is not None:
                    raise error
                if event.text or (req.params.logprobs and event.token_ids):
                    logprobs = None
                    if req.params.logprobs and req.chat:
                        logprobs = chat_logprobs(event, token_text)
                    elif req.params.logprobs:
                        logprobs = completion_logprobs(event, token_text, offset=offsets[index])
                        offsets[index] += sum(len(t) for t in logprobs["tokens"])
                    yield _sse(chunk(req, rid, created, index, event.text, None, logprobs=logprobs))
                if event.finished:
                    outputs[index] = event.output
                    remaining -= 1
                    yield _sse(chunk(req, rid, created, index, None if req.chat else "", event.output.finish_reason))
            if req.include_usage:
                yield _sse(usage_chunk(req, rid, created, outputs))
            yield "data: [DONE]\n\n"
            self._count("200", *outputs)
        except Exception as e:
            self._count("500")
            if isinstance(e, RequestFailed):
                error = request_failed(e)
            else:
                log.exception("stream %s failed", rid)
                error = ApiError(500, f"the stream failed: {type(e).__name__}")
            yield _sse(error.body())
            yield "data: [DONE]\n\n"
        finally:
            self.close()
