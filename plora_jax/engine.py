"""Engine: the public Python API, and the one loop thread that owns all device state.

    engine = Engine.from_pretrained("llama")              # or a .gguf path / HF folder
    engine.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0))
    for delta in engine.stream("Hello", SamplingParams(max_tokens=32)): ...
    handle = engine.submit(prompt, params)                # async: `async for e in handle.events()`

Threads. Callers validate and tokenize on their own thread, then post to an inbox. One loop
thread owns `EngineState` (paged KV cache + the per-slot token buffer) and is the only caller
of the jitted steps. Each iteration: drain the inbox (requests, cancels, calls), ask the
scheduler for a plan, dispatch the decode and prefill steps (JAX dispatch is asynchronous),
then read the *previous* iteration's sampled tokens, which the device copied to host in the
meantime. Stop checks, detokenization and streaming therefore overlap device work, and a
decode step never waits on the host for its input token (it reads the device buffer).

Compiled shapes. `_decode_jit` and `_prefill_jit` are defined once and donate the state. Every
shape they see is a bucket: decode rows (powers of two up to `max_num_seqs`), prefill rows (up to
`max_prefill_seqs`) times chunk length (powers of two up to `max_num_batched_tokens`), block-table
width (powers of two, from 64 tokens up to `max_model_len`). Warm-up compiles every combination
the scheduler can produce, so steady state never compiles (`stats()["compiles_after_warmup"]`);
the persistent compilation cache makes a restart's warm-up a disk read.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from . import compile_stats
from .adapters import AdapterError
from .buckets import cdiv, pick_bucket, pow2_buckets
from .config import EngineConfig, ModelConfig
from .detokenizer import IncrementalDetokenizer
from .kv_blocks import OutOfBlocks
from .lora_manager import LoraManager
from .lora_pool import LoraBatch
from .models.llama import Llama
from .models.loader import LoadedModel, load_model
from .models.registry import cache_root
from .outputs import RequestFailed, RequestHandle, RequestMetrics, RequestOutput, StreamEvent
from .pallas import lora_ops
from .policies import Decision, Policy, make_policy
from .sampling import SamplingInputs, SamplingParams, sample
from .scheduler import Request, Scheduler, Status, StepPlan
from .state import AttentionMetadata, EngineState, KVCache
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

_MIN_TABLE_TOKENS = 64  # smallest block-table width, in tokens


def resolve_dtype(name: str):
    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return jnp.dtype(name)


class Engine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel):
        self.config = config
        self.model_config: ModelConfig = loaded.config
        self.tokenizer: Tokenizer | None = loaded.tokenizer
        self.load_info = {
            "source": str(loaded.source),
            "from_cache": loaded.from_cache,
            "load_seconds": loaded.load_seconds,
        }
        self.dtype = resolve_dtype(config.dtype)
        self.max_model_len = min(config.max_model_len, self.model_config.max_position_embeddings)
        bs = config.block_size
        max_blocks = cdiv(self.max_model_len, bs)
        if max_blocks > config.num_kv_blocks - 1:
            raise ValueError(
                f"num_kv_blocks={config.num_kv_blocks} cannot hold one sequence of max_model_len="
                f"{self.max_model_len} ({max_blocks} blocks of {bs}); raise num_kv_blocks"
            )
        chunk = min(config.max_num_batched_tokens, self.max_model_len)
        self.prefill_buckets = pow2_buckets(min(config.min_prefill_bucket, chunk), chunk)
        self.prefill_row_buckets = pow2_buckets(1, config.max_prefill_seqs)
        self.batch_buckets = pow2_buckets(1, config.max_num_seqs)
        self.width_buckets = pow2_buckets(min(cdiv(_MIN_TABLE_TOKENS, bs), max_blocks), max_blocks)
        if config.compilation_cache and not jax.config.jax_compilation_cache_dir:
            jax.config.update("jax_compilation_cache_dir", str(cache_root(config.cache_dir) / "xla"))
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

        self._model = Llama(self.model_config, self.dtype, lora_ops.resolve(config.lora_implementation))
        self._params = jax.device_put(loaded.params)
        self._lora = LoraManager(self.model_config, config, self.dtype) if config.max_loras > 0 else None
        self._policy: Policy | None = None
        self._policy_time_s = 0.0  # time spent in policy decisions on the loop thread
        self._policy_fallbacks = 0  # decisions that failed and fell back to reactive loading
        self._policy_warned = False
        self._next_decision = 0.0  # time.monotonic() of the next interval decision
        self._unservable: list[Request] = []  # requests whose adapter was removed before admission
        self._load_failures: list = []  # (adapter, error) of synchronous loads, failed at the next poll
        self._state = EngineState(
            kv=KVCache.zeros(self.model_config, config.num_kv_blocks, bs, self.dtype),
            last_tokens=jnp.zeros((config.max_num_seqs,), jnp.int32),
            lora=self._lora.zeros() if self._lora else None,
        )
        self._scheduler = Scheduler(
            config.num_kv_blocks,
            bs,
            config.max_num_seqs,
            chunk,
            config.max_prefill_seqs,
            self.prefill_buckets,
            self.prefill_row_buckets,
            acquire_adapter=self._acquire_adapter,
            release_adapter=self._release_adapter,
        )
        # The sampler is its own executable: it then compiles once per row bucket instead of once
        # per (rows, tokens, width), which halves warm-up (the vocabulary sort compiles slowly).
        self._decode_jit = jax.jit(self._decode_step, donate_argnames=("kv",))
        self._prefill_jit = jax.jit(self._prefill_step, donate_argnames=("kv",))
        self._sample_jit = jax.jit(self._sample_step, donate_argnames=("last_tokens",))

        self._seed_rng = np.random.default_rng(config.seed)
        self._ids = itertools.count()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._handles: dict[str, RequestHandle] = {}
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._handles_lock = threading.Lock()
        self._fatal: BaseException | None = None
        self._steps = 0
        self._warmup_s = 0.0
        self._compiles_at_warmup = 0
        self._ready = threading.Event()
        compile_stats.install()
        if self._lora is not None:
            self._adopt_policy(make_policy(config.policy, config.policy_interval_s, config.predictor_checkpoint))
        self._thread = threading.Thread(target=self._run, name="plora-engine-loop", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._fatal is not None:
            raise RuntimeError(f"engine warm-up failed: {self._fatal}") from self._fatal

    # --- construction -------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model: str = "llama", **overrides) -> Engine:
        """Load `model` ("llama", a .gguf file or a Hugging Face folder); overrides set EngineConfig fields."""
        names = {f.name for f in dataclasses.fields(EngineConfig)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(f"unknown engine option(s) {unknown}; valid: {sorted(names)}")
        config = EngineConfig(model=str(model), **overrides)
        loaded = load_model(config.model, resolve_dtype(config.dtype), config.cache_dir, config.param_cache)
        return cls(config, loaded)

    @classmethod
    def from_params(
        cls, model_config: ModelConfig, params: dict, tokenizer: Tokenizer | None = None, **overrides
    ) -> Engine:
        """An engine over given parameters (random weights for tests and real-size benchmarks).

        Without a tokenizer, prompts must be token ids and outputs carry no text.
        """
        config = EngineConfig(model=model_config.name, **overrides)
        return cls(config, LoadedModel(model_config, params, tokenizer, Path(model_config.name), False, 0.0))

    def close(self) -> None:
        """Abort what is left, stop the loop thread and release it."""
        if self._thread.is_alive():
            self._inbox.put(("stop",))
            self._thread.join()
        if self._policy is not None:
            self._policy.close()
        if self._lora is not None:
            self._lora.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- jitted device functions (defined once; each donates the state) -----------------
    def _decode_step(self, params, kv: KVCache, last_tokens, slots, meta, lora: LoraBatch | None):
        # [batch, 1]: the newest token of each row (padding rows' out-of-range slots are clipped).
        tokens = last_tokens.at[slots].get(mode="clip")[:, None]
        logits, kv = self._model.apply({"params": params}, tokens, kv, meta, jnp.zeros_like(slots), lora)
        return kv, logits

    def _prefill_step(self, params, kv: KVCache, tokens, meta, logits_indices, lora: LoraBatch | None):
        """Logits [rows, vocab] at `logits_indices`, or of every token [rows, tokens, vocab] if None."""
        logits, kv = self._model.apply({"params": params}, tokens, kv, meta, logits_indices, lora)
        return kv, logits

    def _lora_batch(self, adapter_slots: list[int], num_rows: int) -> LoraBatch | None:
        if self._lora is None:
            return None
        row_slot = np.zeros((num_rows,), np.int32)  # padding rows: no adapter
        row_slot[: len(adapter_slots)] = adapter_slots
        return LoraBatch(self._state.lora, row_slot)

    def _sample_step(self, last_tokens, logits, write_slots, sampling):
        new, logprobs = sample(logits, sampling)
        # Rows that sample nothing (padding, non-final prompt chunks) carry an out-of-range slot.
        return last_tokens.at[write_slots].set(new, mode="drop"), new, logprobs

    # --- step inputs (numpy; padded to buckets) -----------------------------------------
    def _metadata(self, rows: list[tuple[int, int, list[int]]], num_rows: int, num_tokens: int):
        """AttentionMetadata for rows of (first position, token count, KV blocks); padding rows are empty."""
        bs = self.config.block_size
        ctx = max(start + n for start, n, _ in rows)
        width = pick_bucket(cdiv(ctx, bs), self.width_buckets)
        positions = np.zeros((num_rows, num_tokens), np.int32)
        slots = np.zeros((num_rows, num_tokens), np.int32)  # padding writes into reserved block 0
        tables = np.zeros((num_rows, width), np.int32)
        context_lens = np.zeros((num_rows,), np.int32)
        for r, (start, n, blocks) in enumerate(rows):
            pos = np.arange(start, start + n)
            positions[r, :n] = pos
            slots[r, :n] = np.asarray(blocks)[pos // bs] * bs + pos % bs
            used = cdiv(start + n, bs)
            tables[r, :used] = blocks[:used]
            context_lens[r] = start + n
        return AttentionMetadata(positions, slots, tables, context_lens)

    @staticmethod
    def _sampling(requests: list[Request], steps: list[int], num_rows: int) -> SamplingInputs:
        pad = num_rows - len(requests)
        params = [r.params for r in requests]
        return SamplingInputs(
            temperature=np.array([p.temperature for p in params] + [0.0] * pad, np.float32),
            top_k=np.array([p.top_k for p in params] + [0] * pad, np.int32),
            top_p=np.array([p.top_p for p in params] + [1.0] * pad, np.float32),
            seeds=np.array([r.seed for r in requests] + [0] * pad, np.uint32),
            steps=np.array(steps + [0] * pad, np.int32),
        )

    def _dispatch(self, plan: StepPlan) -> list[tuple[list[Request | None], jax.Array, jax.Array]]:
        """Launch the plan's device steps; returns (request per row, tokens, logprobs) still on device."""
        launched = []
        if plan.decode:
            reqs = [row.request for row in plan.decode]
            num_rows = pick_bucket(len(reqs), self.batch_buckets)
            slots = np.full((num_rows,), self.config.max_num_seqs, np.int32)
            slots[: len(reqs)] = [r.seq_slot for r in reqs]
            meta = self._metadata([(row.position, 1, row.request.blocks) for row in plan.decode], num_rows, 1)
            sampling = self._sampling(reqs, [row.step for row in plan.decode], num_rows)
            lora = self._lora_batch([r.adapter_slot for r in reqs], num_rows)
            kv, logits = self._decode_jit(self._params, self._state.kv, self._state.last_tokens, slots, meta, lora)
            last, new, logprobs = self._sample_jit(self._state.last_tokens, logits, slots, sampling)
            self._state = dataclasses.replace(self._state, kv=kv, last_tokens=last)
            launched.append((reqs, new, logprobs))
        if plan.prefill:
            rows = plan.prefill
            num_rows = pick_bucket(len(rows), self.prefill_row_buckets)
            num_tokens = pick_bucket(max(len(row.token_ids) for row in rows), self.prefill_buckets)
            tokens = np.zeros((num_rows, num_tokens), np.int32)
            last = np.zeros((num_rows,), np.int32)
            write_slots = np.full((num_rows,), self.config.max_num_seqs, np.int32)
            for i, row in enumerate(rows):
                tokens[i, : len(row.token_ids)] = row.token_ids
                last[i] = len(row.token_ids) - 1
                if row.final:
                    write_slots[i] = row.request.seq_slot
            meta = self._metadata(
                [(row.start, len(row.token_ids), row.request.blocks) for row in rows], num_rows, num_tokens
            )
            sampling = self._sampling([row.request for row in rows], [row.step for row in rows], num_rows)
            lora = self._lora_batch([row.request.adapter_slot for row in rows], num_rows)
            kv, logits = self._prefill_jit(self._params, self._state.kv, tokens, meta, last, lora)
            last_tokens, new, logprobs = self._sample_jit(self._state.last_tokens, logits, write_slots, sampling)
            self._state = dataclasses.replace(self._state, kv=kv, last_tokens=last_tokens)
            launched.append(([row.request if row.final else None for row in rows], new, logprobs))
        for _, new, logprobs in launched:
            new.copy_to_host_async()
            logprobs.copy_to_host_async()
        self._steps += 1
        return launched

    # --- the loop -----------------------------------------------------------------------
    def _run(self) -> None:
        self._loop_ident = threading.get_ident()
        try:
            start = time.perf_counter()
            if self.config.warmup:
                self._warmup()
            self._warmup_s = time.perf_counter() - start
            self._compiles_at_warmup = compile_stats.compiles_on_thread()
        except BaseException as e:
            self._fatal = e
        self._ready.set()
        if self._fatal is not None:
            return
        try:
            self._loop()
        except BaseException as e:  # a device or programming error: fail fast, never half-serve
            log.exception("engine loop failed")
            self._fatal = e
            with self._handles_lock:
                handles = list(self._handles.values())
                self._handles.clear()
            for handle in handles:
                handle._fail(e)

    def _loop(self) -> None:
        in_flight = None
        scheduler = self._scheduler
        while True:
            idle = in_flight is None and not scheduler.has_work()
            if not self._drain_inbox(block=idle):
                break
            if self._lora is not None:
                self._poll_adapters()
                if time.monotonic() >= self._next_decision:
                    self._decide()
            plan = scheduler.schedule()
            if self._unservable:
                self._fail_unservable()
            launched = self._dispatch(plan) if plan is not None else None
            if in_flight is not None:
                self._process(in_flight)
            elif launched is None and scheduler.has_work():
                time.sleep(0.001)  # work exists but cannot run yet (e.g. waiting for blocks)
            in_flight = launched
        if in_flight is not None:
            self._process(in_flight)
        for request in list(scheduler.running) + list(scheduler.waiting):
            self._end(request, "abort")

    def _drain_inbox(self, block: bool) -> bool:
        """Handle every queued message (waiting for one if `block`, but not past the next policy
        decision); False on stop."""
        while True:
            timeout = max(0.0, self._next_decision - time.monotonic()) if self._policy is not None else None
            try:
                message = self._inbox.get(block=block, timeout=timeout if block else None)
            except queue.Empty:
                return True
            block = False
            kind = message[0]
            if kind == "stop":
                return False
            if kind == "add":
                request = message[1]
                self._scheduler.add(request)
                if self._policy is not None and request.adapter is not None:
                    now = time.monotonic()
                    self._policy.observe(request.adapter, now)
                    self._decide(now)
            elif kind == "cancel":
                request = next(
                    (
                        r
                        for r in itertools.chain(self._scheduler.running, self._scheduler.waiting)
                        if r.request_id == message[1]
                    ),
                    None,
                )
                if request is not None:
                    self._end(request, "abort")
            elif kind == "call":
                _, fn, done = message
                try:
                    done.put((True, fn()))
                except Exception as e:
                    done.put((False, e))

    def _process(self, launched) -> None:
        for requests, new, logprobs in launched:
            new, logprobs = np.asarray(new), np.asarray(logprobs)
            for i, request in enumerate(requests):
                if request is None or request.status is Status.FINISHED:
                    continue  # a chunk that samples nothing, or a token past the end
                request.pending -= 1
                self._append(request, int(new[i]), float(logprobs[i]))

    def _append(self, request: Request, token: int, logprob: float) -> None:
        now = time.perf_counter()
        request.output_ids.append(token)
        request.logprobs.append(logprob)
        if request.first_token is None:
            request.first_token = now
        detok = self._detok.get(request.request_id)
        if detok is not None:
            detok.add_token(token)
        reason, stop_reason = None, None
        if token in request.stop_ids:
            reason, stop_reason = "stop", token
        elif detok is not None and detok.stop_string is not None:
            reason, stop_reason = "stop", detok.stop_string
        elif (
            len(request.output_ids) >= request.params.max_tokens
            or len(request.prompt_ids) + len(request.output_ids) >= request.max_total
        ):
            reason = "length"
        if reason is not None:
            self._end(request, reason, stop_reason)
        else:
            self._emit(request, StreamEvent(detok.take_delta(False) if detok else "", [token]))

    def _end(self, request: Request, reason: str, stop_reason=None) -> None:
        self._scheduler.finish(request, reason)
        with self._handles_lock:
            handle = self._handles.pop(request.request_id, None)
        detok = self._detok.pop(request.request_id, None)
        if handle is None:
            return
        last = [request.output_ids[-1]] if request.output_ids and reason != "abort" else []
        delta = detok.take_delta(True) if detok else ""
        handle._push(StreamEvent(delta, last, True, self._output(request, detok, stop_reason)))

    def _emit(self, request: Request, event: StreamEvent) -> None:
        with self._handles_lock:
            handle = self._handles.get(request.request_id)
        if handle is not None:
            handle._push(event)

    def _output(self, request: Request, detok, stop_reason) -> RequestOutput:
        end = request.finished_at
        first = request.first_token or end
        n = len(request.output_ids)
        metrics = RequestMetrics(
            arrival_time=request.arrival,
            queue_s=(request.first_scheduled or end) - request.arrival,
            ttft_s=first - request.arrival,
            tpot_s=(end - first) / (n - 1) if n > 1 else 0.0,
            e2e_s=end - request.arrival,
            num_preemptions=request.num_preemptions,
            adapter_wait_s=request.adapter_wait,
            cold_start=request.adapter_cold,
        )
        return RequestOutput(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_ids,
            token_ids=list(request.output_ids),
            text=detok.text if detok else "",
            finish_reason=request.finish_reason,
            stop_reason=stop_reason,
            logprobs=list(request.logprobs) if request.params.logprobs else None,
            metrics=metrics,
            prompt=request.prompt_text,
        )

    def prefill_shapes(self) -> list[tuple[int, int, int]]:
        """Every (rows, tokens, table width) a prefill step can have (see Scheduler._schedule_prefill)."""
        bs, limit = self.config.block_size, self.prefill_buckets[-1]
        shapes = []
        for previous, tokens in zip((0, *self.prefill_buckets[:-1]), self.prefill_buckets, strict=True):
            # One row: a chunk of (previous, tokens] tokens starting anywhere.
            smallest = pick_bucket(cdiv(previous + 1, bs), self.width_buckets)
            shapes += [(1, tokens, w) for w in self.width_buckets if w >= smallest]
            # Several rows: first chunks only, so the context is the chunk itself.
            widths = sorted({pick_bucket(cdiv(n, bs), self.width_buckets) for n in range(previous + 1, tokens + 1)})
            shapes += [(r, tokens, w) for r in self.prefill_row_buckets[1:] if r * tokens <= limit for w in widths]
        return shapes

    def _warmup(self) -> None:
        """Compile every shape the scheduler can produce, on dummy inputs that only touch reserved
        block 0 and drop their token writes."""
        drop = self.config.max_num_seqs
        empty = lambda rows, tokens, width: AttentionMetadata(
            np.zeros((rows, tokens), np.int32),
            np.zeros((rows, tokens), np.int32),
            np.zeros((rows, width), np.int32),
            np.zeros((rows,), np.int32),
        )
        if self._lora is not None:
            self._state = dataclasses.replace(self._state, lora=self._lora.warmup(self._state.lora))
        state = self._state
        kv = state.kv
        for rows, width in itertools.product(self.batch_buckets, self.width_buckets):
            kv, _ = self._decode_jit(
                self._params,
                kv,
                state.last_tokens,
                np.full((rows,), drop, np.int32),
                empty(rows, 1, width),
                self._lora_batch([], rows),
            )
        for rows, tokens, width in self.prefill_shapes():
            kv, _ = self._prefill_jit(
                self._params,
                kv,
                np.zeros((rows, tokens), np.int32),
                empty(rows, tokens, width),
                np.zeros((rows,), np.int32),
                self._lora_batch([], rows),
            )
        last = state.last_tokens
        for rows in sorted(set(self.batch_buckets) | set(self.prefill_row_buckets)):
            logits = np.zeros((rows, self.model_config.vocab_size), np.float32)
            last, *_ = self._sample_jit(last, logits, np.full((rows,), drop, np.int32), self._sampling([], [], rows))
        self._state = dataclasses.replace(self._state, kv=kv, last_tokens=last)
        jax.block_until_ready(self._state)

    # --- running work on the loop thread ------------------------------------------------
    def _call(self, fn):
        """Run fn() on the loop thread between steps and return its result."""
        self._check_alive()
        done: queue.SimpleQueue = queue.SimpleQueue()
        self._inbox.put(("call", fn, done))
        ok, value = done.get()
        if not ok:
            raise value
        return value

    def _check_alive(self) -> None:
        if self._fatal is not None:
            raise RuntimeError(f"the engine loop has stopped: {self._fatal}") from self._fatal
        if not self._thread.is_alive():
            raise RuntimeError("the engine is closed")

    # --- validation ---------------------------------------------------------------------
    def _token_ids(self, ids, name: str) -> list[int]:
        try:
            ids = [int(t) for t in ids]
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a string or a list of token ids") from None
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"{name} holds token ids outside [0, {vocab}): {bad[:5]}")
        return ids

    def _check_adapter(self, adapter, name: str) -> None:
        if adapter is None:
            return
        if self._lora is None:
            raise ValueError(f"{name}={adapter!r}: this engine serves no adapters (max_loras=0)")
        if adapter not in self._lora.entries:
            raise ValueError(f"{name}={adapter!r}: no adapter with this name is registered (see add_adapter)")

    # --- adapters (residency changes run on the loop thread) ----------------------------
    def _acquire_adapter(self, request: Request) -> bool:
        """Scheduler callback: put the request's adapter on the device and pin it; False: wait."""
        if request.adapter not in self._lora.entries:  # removed after the request was accepted
            if request not in self._unservable:
                self._unservable.append(request)
            return False
        now = time.perf_counter()
        if request.adapter_wait_start is None:
            request.adapter_wait_start = now
        if not request.adapter_counted:
            request.adapter_cold = self._lora.residency(request.adapter) != "device"
        slot = self._lora.acquire(request.adapter, first=not request.adapter_counted)
        request.adapter_counted = True
        if slot is None and self.config.adapter_loads == "sync" and self._lora.is_loading(request.adapter):
            # S-LoRA as released: the load happens inside the step, so the whole batch waits for it.
            pool, failures = self._lora.wait_for(request.adapter, self._state.lora)
            self._state = dataclasses.replace(self._state, lora=pool)
            self._load_failures += failures  # failed after schedule(): the queue is not ours to edit here
            if all(name != request.adapter for name, _ in failures):
                slot = self._lora.acquire(request.adapter, first=False)
        if slot is None:
            return False
        request.adapter_slot = slot
        request.adapter_wait += time.perf_counter() - request.adapter_wait_start
        request.adapter_wait_start = None
        return True

    def _fail_unservable(self) -> None:
        for request in self._unservable:
            if request.status is not Status.FINISHED:
                self._fail_request(request, AdapterError(f"adapter {request.adapter!r} was removed"))
        self._unservable.clear()

    def _poll_adapters(self, wait_for: str | None = None) -> None:
        """Commit finished adapter transfers (optionally waiting for `wait_for`'s); fail the
        requests whose adapter could not be loaded."""
        if wait_for is not None:
            pool, failures = self._lora.wait_for(wait_for, self._state.lora)
        else:
            pool, failures = self._lora.poll(self._state.lora)
        self._state = dataclasses.replace(self._state, lora=pool)
        failures, self._load_failures = self._load_failures + failures, []
        for name, error in failures:
            for request in list(self._scheduler.waiting):
                if request.adapter == name:
                    self._fail_request(request, AdapterError(f"adapter {name!r} could not be loaded: {error}"))

    def _fail_request(self, request: Request, error: BaseException) -> None:
        self._scheduler.finish(request, "abort")
        with self._handles_lock:
            handle = self._handles.pop(request.request_id, None)
        self._detok.pop(request.request_id, None)
        if handle is not None:
            handle._fail(error)

    def _release_adapter(self, request: Request) -> None:
        name = request.adapter
        # Only reactive freeing asks whether a waiting request needs the adapter: skip the queue scan otherwise.
        wanted = self._lora.free_when_unused and any(
            r.adapter == name and r is not request for r in self._scheduler.waiting
        )
        self._lora.release(name, wanted)
        request.adapter_slot = 0

    # --- residency policy (loop thread) -------------------------------------------------
    def _adopt_policy(self, policy: Policy) -> None:
        if self._policy is not None:
            self._policy.close()
        self._policy = policy
        self._lora.free_when_unused = policy.free_when_unused
        self._policy_warned = False
        self._next_decision = 0.0
        policy.start()

    def _decide(self, now: float | None = None) -> None:
        """Ask the policy (at an arrival or an interval) and apply its decision. A policy that
        raises (a failed or stalled forecaster) leaves reactive loading in place, logged once."""
        now = time.monotonic() if now is None else now
        start = time.perf_counter()
        view = self._lora.view(now, tuple(r.adapter for r in self._scheduler.waiting if r.adapter is not None))
        try:
            decision = self._policy.decide(view)
        except Exception as e:
            self._policy_fallbacks += 1
            if not self._policy_warned:
                self._policy_warned = True
                log.warning("policy %r failed (%s); falling back to reactive loading", self._policy.name, e)
            decision = Decision()
        self._lora.apply(decision)
        self._policy_time_s += time.perf_counter() - start
        self._next_decision = now + self._policy.interval_s

    def set_policy(self, policy: Policy | str) -> None:
        """Replace the residency policy (a name from `plora_jax.policies.POLICIES`, or a policy
        object such as `Oracle(arrivals)`); the old one is closed."""
        if self._lora is None:
            raise ValueError("this engine serves no adapters (max_loras=0)")
        if isinstance(policy, str):
            policy = make_policy(policy, self.config.policy_interval_s, self.config.predictor_checkpoint)
        if not isinstance(policy, Policy):
            raise ValueError(f"policy must be a policy name or a plora_jax.policies.Policy, got {type(policy)}")
        self._call(lambda: self._adopt_policy(policy))

    def reset_adapters(self, adapter_loads: str | None = None) -> None:
        """Empty the adapter device pool and host cache (adapters stay registered), so that a
        benchmark replays policies one after another on one warm engine from the same cold
        start; `adapter_loads` switches between "async" and "sync" (S-LoRA) loads. Call it idle."""
        if self._lora is None:
            raise ValueError("this engine serves no adapters (max_loras=0)")
        if adapter_loads not in (None, "async", "sync"):
            raise ValueError(f"adapter_loads must be 'async' or 'sync', got {adapter_loads!r}")

        def reset():
            if self._scheduler.has_work():
                raise RuntimeError("reset_adapters needs an idle engine (requests are running or waiting)")
            self._state = dataclasses.replace(self._state, lora=self._lora.clear(self._state.lora))
            if adapter_loads is not None:
                self.config = dataclasses.replace(self.config, adapter_loads=adapter_loads)

        self._call(reset)

    def add_adapter(self, name: str, path: str | Path) -> dict:
        """Register a PEFT adapter folder under `name`; it is read and validated now (AdapterError
        names the file and field) and loaded onto the device when a request first uses it (or
        earlier, if the policy prefetches it)."""
        if self._lora is None:
            raise ValueError("this engine serves no adapters (max_loras=0)")
        return self._call(lambda: self._describe(self._lora.add(name, path).name))

    def add_adapter_dir(self, folder: str | Path) -> dict:
        """Register every subfolder of `folder` that holds adapter_config.json, named after the
        subfolder, validated from config and tensor header only (weights are read when needed).
        Returns {"added": [names], "errors": {name: why}}; already registered ones are skipped."""
        if self._lora is None:
            raise ValueError("this engine serves no adapters (max_loras=0)")
        added, errors = self._call(lambda: self._lora.scan(folder))
        return {"added": added, "errors": errors}

    def _describe(self, name: str) -> dict:
        return next(d for d in self._lora.describe() if d["name"] == name)

    def remove_adapter(self, name: str) -> None:
        """Unregister an adapter. Waiting requests for it fail with an error naming it; running
        ones finish, and its device pages are freed when the last of them does."""
        if self._lora is None:
            raise ValueError("this engine serves no adapters (max_loras=0)")

        def remove():
            if name not in self._lora.entries:
                raise ValueError(f"adapter {name!r} is not registered")
            for request in list(self._scheduler.waiting):
                if request.adapter == name:
                    self._fail_request(request, AdapterError(f"adapter {name!r} was removed"))
            self._lora.remove(name)

        self._call(remove)

    def has_adapter(self, name: str) -> bool:
        """Whether `name` is registered (a read without a round trip to the loop thread)."""
        return self._lora is not None and name in self._lora.entries

    def adapters(self) -> list[dict]:
        """Every registered adapter: name, path, rank, target_modules, residency (device/host/disk), pages, bytes."""
        if self._lora is None:
            return []
        return self._call(self._lora.describe)

    def _make_request(
        self, prompt, params, adapter, name: str, request_id: str | None, adapter_field: str = "adapter"
    ) -> Request:
        if params is None:
            params = SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params for {name} must be a SamplingParams")
        self._check_adapter(adapter, adapter_field)
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{name}: this engine has no tokenizer; pass token ids")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = self._token_ids(prompt, name)
        if not ids:
            raise ValueError(f"{name} is empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"{name} has {len(ids)} tokens, leaving no room to generate (max_model_len={self.max_model_len})"
            )
        eos = frozenset(self.tokenizer.eos_token_ids) if self.tokenizer and not params.ignore_eos else frozenset()
        seed = params.seed if params.seed is not None else int(self._seed_rng.integers(2**32))
        return Request(
            request_id=request_id if request_id is not None else f"req-{next(self._ids)}",
            prompt_ids=ids,
            params=params,
            seed=seed,
            stop_ids=frozenset(params.stop_token_ids) | eos,
            max_total=min(len(ids) + params.max_tokens, self.max_model_len),
            adapter=adapter,
            prompt_text=prompt if isinstance(prompt, str) else None,
        )

    def _enqueue(self, request: Request) -> RequestHandle:
        handle = RequestHandle(request.request_id, self._cancel)
        with self._handles_lock:
            if request.request_id in self._handles:
                raise ValueError(f"request_id {request.request_id!r} is already in use")
            self._handles[request.request_id] = handle
        if self.tokenizer is not None:
            p = request.params
            self._detok[request.request_id] = IncrementalDetokenizer(
                self.tokenizer, request.prompt_ids, p.stop, p.include_stop_str_in_output, p.skip_special_tokens
            )
        self._inbox.put(("add", request))
        return handle

    def _cancel(self, request_id: str) -> None:
        self._inbox.put(("cancel", request_id))

    # --- public API ---------------------------------------------------------------------
    def submit(
        self,
        prompt: str | Sequence[int],
        sampling_params: SamplingParams | None = None,
        adapter: str | None = None,
        request_id: str | None = None,
    ) -> RequestHandle:
        """Queue one request; returns at once. Bad input raises ValueError naming the field."""
        self._check_alive()
        return self._enqueue(self._make_request(prompt, sampling_params, adapter, "prompt", request_id))

    def stream(
        self, prompt: str | Sequence[int], sampling_params: SamplingParams | None = None, adapter: str | None = None
    ) -> Iterator[str]:
        """Yield text deltas as they are generated; closing the generator early cancels the request."""
        handle = self.submit(prompt, sampling_params, adapter)
        try:
            for event in handle:
                if event.text:
                    yield event.text
        finally:
            handle.cancel()

    def generate(
        self,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        adapters: Sequence[str | None] | None = None,
        progress: bool = False,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids), continuously batched; results in prompt order.

        Every prompt is validated before any is queued, so bad input rejects the call as a whole.
        """
        from tqdm.auto import tqdm

        self._check_alive()
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            raise ValueError("prompts must be a list of prompts (wrap a single prompt in a list)")
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"sampling_params has {len(sampling_params)} entries for {len(prompts)} prompts")
        adapters = [None] * len(prompts) if adapters is None else list(adapters)
        if len(adapters) != len(prompts):
            raise ValueError(f"adapters has {len(adapters)} entries for {len(prompts)} prompts")
        requests = [
            self._make_request(p, sp, a, f"prompts[{i}]", None, f"adapters[{i}]")
            for i, (p, sp, a) in enumerate(zip(prompts, sampling_params, adapters, strict=True))
        ]
        handles = [self._enqueue(r) for r in requests]
        outputs = []
        with tqdm(total=len(handles), disable=not progress, desc="generate") as bar:
            for handle in handles:
                outputs.append(handle.result())
                bar.update(1)
        return outputs

    def logits(self, token_ids: Sequence[int], adapter: str | None = None) -> np.ndarray:
        """Logits [len(token_ids), vocab] (float32) of every position, as a causal LM scores them.

        Runs on the loop thread between steps, in chunks of `max_num_batched_tokens`; its shapes
        are compiled on first use (they are not part of the serving warm-up).
        """
        ids = self._score_input(token_ids, adapter, "token_ids", "adapter")
        return self._call(lambda: self._score([ids], [adapter]))[0]

    def logits_batch(
        self, token_ids: Sequence[Sequence[int]], adapters: Sequence[str | None] | None = None
    ) -> list[np.ndarray]:
        """`logits` of several sequences in one batch (one row each, each with its own adapter)."""
        adapters = [None] * len(token_ids) if adapters is None else list(adapters)
        if len(adapters) != len(token_ids):
            raise ValueError(f"adapters has {len(adapters)} entries for {len(token_ids)} sequences")
        seqs = [
            self._score_input(ids, adapter, f"token_ids[{i}]", f"adapters[{i}]")
            for i, (ids, adapter) in enumerate(zip(token_ids, adapters, strict=True))
        ]
        if not seqs:
            return []
        return self._call(lambda: self._score(seqs, adapters))

    def _score_input(self, token_ids, adapter, field: str, adapter_field: str) -> list[int]:
        self._check_adapter(adapter, adapter_field)
        ids = self._token_ids(token_ids, field)
        if not ids:
            raise ValueError(f"{field} is empty")
        if len(ids) > self.max_model_len:
            raise ValueError(f"{field} has {len(ids)} tokens, more than max_model_len={self.max_model_len}")
        return ids

    def _score(self, seqs: list[list[int]], adapters: list[str | None]) -> list[np.ndarray]:
        allocator = self._scheduler.blocks
        probes, tables = [], []
        try:
            for ids, adapter in zip(seqs, adapters, strict=True):
                try:
                    tables.append(allocator.allocate(cdiv(len(ids), self.config.block_size)))
                except OutOfBlocks as e:
                    raise RuntimeError(f"logits: the KV cache is busy ({e}); retry when fewer requests run") from None
                probe = Request("logits", ids, SamplingParams(), 0, frozenset(), len(ids), adapter=adapter)
                while adapter is not None and not self._acquire_adapter(probe):
                    if adapter not in self._lora.entries:
                        self._unservable.clear()
                        raise ValueError(f"adapter {adapter!r} is not registered (it was removed)")
                    if not self._lora.is_loading(adapter):
                        error = self._lora.entries[adapter].error
                        if error is not None:
                            raise AdapterError(f"adapter {adapter!r} could not be loaded: {error}") from error
                        raise RuntimeError(f"logits: the adapter pool is busy; {adapter!r} cannot be loaded now")
                    self._poll_adapters(wait_for=adapter)
                probes.append(probe)
            chunk = self.prefill_buckets[-1]
            num_rows = pick_bucket(len(seqs), pow2_buckets(1, max(len(seqs), 1)))
            out: list[list[np.ndarray]] = [[] for _ in seqs]
            for start in range(0, max(len(ids) for ids in seqs), chunk):
                parts = [ids[start : start + chunk] for ids in seqs]
                num_tokens = pick_bucket(max(len(p) for p in parts), self.prefill_buckets)
                tokens = np.zeros((num_rows, num_tokens), np.int32)
                for r, part in enumerate(parts):
                    tokens[r, : len(part)] = part
                rows = [
                    (min(start, len(ids)), len(part), blocks)
                    for ids, part, blocks in zip(seqs, parts, tables, strict=True)
                ]
                meta = self._metadata(rows, num_rows, num_tokens)
                lora = self._lora_batch([p.adapter_slot for p in probes], num_rows)
                kv, logits = self._prefill_jit(self._params, self._state.kv, tokens, meta, None, lora)
                self._state = dataclasses.replace(self._state, kv=kv)
                logits = np.asarray(logits)
                for r, part in enumerate(parts):
                    out[r].append(logits[r, : len(part)])
            return [np.concatenate(o) for o in out]
        finally:
            for blocks in tables:
                allocator.free(blocks)
            for probe in probes:
                if probe.adapter_slot:
                    self._release_adapter(probe)

    def stats(self) -> dict:
        """Counters of the engine (read without stopping it)."""
        scheduler = self._scheduler
        total = compile_stats.compiles_on_thread(self._thread.ident)
        return {
            "compiles_total": total,
            "compiles_after_warmup": total - self._compiles_at_warmup,
            "warmup_s": self._warmup_s,
            "running": len(scheduler.running),
            "waiting": len(scheduler.waiting),
            "kv_blocks_used": scheduler.blocks.num_used,
            "kv_blocks_total": scheduler.blocks.num_blocks - 1,
            "num_preemptions": scheduler.num_preemptions,
            "steps": self._steps,
            **(self._lora.stats() if self._lora else {}),
            **(self._policy_stats() if self._policy else {}),
        }

    def _policy_stats(self) -> dict:
        return {
            "policy": self._policy.name,
            "policy_time_s": self._policy_time_s,
            "policy_fallbacks": self._policy_fallbacks,
            **self._policy.stats(),
        }


__all__ = ["Engine", "RequestFailed", "RequestOutput", "resolve_dtype"]
