"""Engine: the public Python API. No device code lives here.

    engine = Engine.from_pretrained("llama")              # or a .gguf path / HF folder
    engine.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0))
    for delta in engine.stream("Hello", SamplingParams(max_tokens=32)): ...
    handle = engine.submit(prompt, params)                # async: `async for e in handle.events()`

The pieces, along vLLM v1's seams:

- `InputProcessor` (inputs.py): validation, tokenization, `Request` creation, on the caller's
  thread; bad input raises `ValueError` naming the field before anything is queued.
- `EngineCore` (core.py): the loop that owns every piece of device state; requests and calls
  reach it through its inbox, and it publishes an immutable snapshot (`stats()` reads it).
- `ModelRunner` (runner.py): parameters, `EngineState` and the compiled steps.
- `CompilePlan` (compile_plan.py): every bucket, and the warm-up. The engine serves as soon as
  the minimal set of executables is ready and builds the others in the background; a restart
  loads them all from the on-disk executable cache.
- `OutputProcessor` (outputs.py): detokenization, stop checks and stream events.

`Engine(..., start=False)` leaves the loop unstarted: the caller then drives it with
`engine.core.step()` (what the tests do, instead of sleeping).

An engine a script never closes is closed at interpreter exit (`atexit`), before the
interpreter stops its threads: a thread stopped while inside XLA or a jitted call aborts the
process ("FATAL: exception not rethrown"), so without this a script that forgot `close()`
exited with SIGABRT.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import gc
import logging
import threading
import time
import weakref
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path

import jax
import numpy as np

from ..config import EngineConfig, ModelConfig
from ..limits import MAX_TOP_LOGPROBS
from ..lora.manager import LoraManager
from ..lora.node_cache import is_remote
from ..lora.peft import AdapterError
from ..models.loader import LoadedModel, load_model
from ..models.registry import cache_root
from ..pallas.attention import cpu as cpu_attention
from ..policies import Policy, make_policy
from ..shared_cache import SharedCache, shared_cache
from ..tokenizer import Tokenizer
from . import scoring
from .core import AddRequest, Cancel, EngineCore
from .errors import EngineDead
from .inputs import InputProcessor
from .kv_blocks import BlockAllocator, check_capacity
from .outputs import RequestFailed, RequestHandle, RequestOutput
from .runner import ModelRunner, resolve_dtype
from .sampling import Logprobs, SamplingParams

log = logging.getLogger(__name__)

_EMPTY_LOGPROBS = (((), np.float32), ((MAX_TOP_LOGPROBS,), np.int32), ((MAX_TOP_LOGPROBS,), np.float32))
_open_engines: weakref.WeakSet = weakref.WeakSet()  # engines not closed yet (closed at exit)
EXIT_CLOSE_S = 30.0  # longest the interpreter's exit waits for an open engine's loop


@atexit.register
def _close_open_engines() -> None:
    for engine in list(_open_engines):
        try:
            engine.close(timeout=EXIT_CLOSE_S)
        except Exception:  # exiting anyway: never let one engine keep the others open
            log.exception("closing an engine at exit failed")


def prepare_kernels(config: EngineConfig, shared: SharedCache | None = None) -> None:
    """Start building (or loading) the C++ attention kernel on a thread, if this engine may use
    it; the runner's own `ensure` then waits for that build instead of starting one."""
    if jax.default_backend() == "cpu" and config.attention_implementation in ("auto", "cpu"):
        kernels = cache_root(config.cache_dir) / "kernels"
        args = (kernels, shared)
        threading.Thread(target=cpu_attention.ensure, args=args, name="plora-kernel-build", daemon=True).start()


def freeze_heap() -> None:
    """Collect, then move every live object to the collector's permanent generation (as vLLM's
    engine does after start-up). Called once an engine is up: the model's, tokenizer's and
    executables' objects are never scanned again, so the collections that run while serving
    stay short (on a small host they were pauses of tens of milliseconds in the middle of steps)."""
    gc.collect()
    gc.freeze()


class TextStream(Iterator[str]):
    """Text deltas of one request (`Engine.stream`)."""

    def __init__(self, handle: RequestHandle):
        self.handle = handle
        self._events = iter(handle)

    def __next__(self) -> str:
        for event in self._events:
            if event.text:
                return event.text
        raise StopIteration

    def close(self) -> None:
        self.handle.cancel()

    def __del__(self) -> None:
        self.handle.cancel()


class Engine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel, start: bool = True, wait_ready: bool = True):
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
        root = cache_root(config.cache_dir)
        blocks = BlockAllocator(config.num_kv_blocks)  # the scheduler's; the adapter pool's too when unified
        lora = LoraManager(self.model_config, config, self.dtype, blocks) if config.max_loras > 0 else None
        check_capacity(
            config.num_kv_blocks, config.block_size, self.max_model_len, lora.pages.max_charge if lora else 0
        )
        self.base_params = loaded.params
        self._runner = ModelRunner(
            self.model_config,
            loaded.params,
            config,
            self.max_model_len,
            lora.zeros() if lora else None,
            lora.max_pages if lora else 0,
            root,
        )
        if lora is not None:
            lora.commit = self._runner.commit_adapter
            lora.commit_size = self._runner.commit_size
        self._inputs = InputProcessor(
            self.model_config,
            self.tokenizer,
            self.max_model_len,
            config.seed,
            lora is not None,
            lambda: self.core.snapshot.adapters,
        )
        policy = self._make_policy(config.policy) if lora else None
        self.core = EngineCore(config, self._runner, self._inputs, lora, policy, blocks)
        self._warmer: threading.Thread | None = None
        self._closed = False
        self._scoring_lock = threading.Lock()  # one prompt_logprobs session at a time (they hold KV blocks)
        _open_engines.add(self)
        plan = self._runner.plan
        if config.warmup:
            self._warmer = threading.Thread(target=self._warm, name="plora-compile", daemon=True)
            self._warm_error: BaseException | None = None
            self._warmer.start()
        else:
            plan.minimal_ready.set()
            plan.complete.set()
        if start:
            self.core.start()
        if wait_ready:
            try:
                self.wait_ready()
            except BaseException:
                self.close()  # the caller gets no engine to close: stop its threads here
                raise

    def _warm(self) -> None:
        plan = self._runner.plan
        try:
            plan.warm()
        except BaseException as e:  # surfaced by wait_ready / health, never a silent hang
            self._warm_error = e
            if not plan.minimal_ready.is_set():
                plan.failure = e  # the engine cannot serve: its loop stops with this error
                plan.minimal_ready.set()
            else:
                log.warning("building the remaining executables failed (%s); serving with those built", e)
            plan.complete.set()

    # --- construction -----------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model: str = "llama", start: bool = True, wait_ready: bool = True, **overrides) -> Engine:
        """Load `model` ("llama", a .gguf file or a Hugging Face folder); overrides set EngineConfig
        fields. Returns once the engine can serve (the minimal executables are ready); with
        `wait_ready=False` at once (see `readiness()`)."""
        names = {f.name for f in dataclasses.fields(EngineConfig)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(f"unknown engine option(s) {unknown}; valid: {sorted(names)}")
        config = EngineConfig(model=str(model), **overrides)
        shared = shared_cache(config)  # one for the kernel and the parameters
        prepare_kernels(config, shared)  # builds the CPU attention kernel (first start) while the model loads
        loaded = load_model(
            config.model, resolve_dtype(config.dtype), config.cache_dir, config.param_cache, save_in_background=True,
            shared=shared,
        )  # fmt: skip
        return cls(config, loaded, start=start, wait_ready=wait_ready)

    @classmethod
    def from_params(
        cls,
        model_config: ModelConfig,
        params: dict,
        tokenizer: Tokenizer | None = None,
        start: bool = True,
        wait_ready: bool = True,
        **overrides,
    ) -> Engine:
        """An engine over given parameters (random weights for tests and real-size benchmarks).

        Without a tokenizer, prompts must be token ids and outputs carry no text.
        """
        config = EngineConfig(model=model_config.name, **overrides)
        loaded = LoadedModel(model_config, params, tokenizer, Path(model_config.name), False, 0.0)
        return cls(config, loaded, start=start, wait_ready=wait_ready)

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until the engine can serve (the minimal executables are built or loaded)."""
        plan = self._runner.plan
        ready = plan.minimal_ready.wait(timeout)
        if plan.failure is not None:
            raise RuntimeError(f"engine warm-up failed: {plan.failure}") from plan.failure
        return ready

    def wait_warm(self, timeout: float | None = None) -> bool:
        """Block until every executable of the plan is built (serving starts earlier: `wait_ready`)."""
        self.wait_ready(timeout)
        complete = self._runner.plan.complete.wait(timeout)
        if getattr(self, "_warm_error", None) is not None:
            raise RuntimeError(f"building executables failed: {self._warm_error}") from self._warm_error
        return complete

    def readiness(self) -> dict:
        """{"status", "compiled": executables ready, "total": executables}; status "warming"
        (building its first executables), "ok", "stalled" (one iteration of the loop, or a call
        on it, has run longer than `step_timeout_s`: a hung step) or "failed" (its loop died,
        or it was closed), with a "detail" when not ok."""
        plan = self._runner.plan
        out = {"status": "ok", "compiled": plan.num_ready, "total": plan.num_executables}
        busy_since = self.core.busy_since
        if plan.failure is not None or self.core.fatal is not None:
            # The kind only (readiness is public; the message may name files): the log has it all.
            out.update(
                status="failed", detail=f"the engine loop stopped ({type(plan.failure or self.core.fatal).__name__})"
            )
        elif self._closed:
            out.update(status="failed", detail="the engine is closed")
        elif not plan.minimal_ready.is_set():
            out["status"] = "warming"
        elif busy_since is not None and time.monotonic() - busy_since > self.config.step_timeout_s:
            seconds = time.monotonic() - busy_since
            out.update(status="stalled", detail=f"one engine step has run for {seconds:.0f} s")
        return out

    @property
    def runner(self) -> ModelRunner:
        """The model runner (benchmarks time its steps; touch it only from the thread that owns
        the engine: an engine built with start=False)."""
        return self._runner

    def close(self, timeout: float | None = None) -> None:
        """Abort what is left, stop the loop thread and release it. `timeout`: seconds to wait
        for the loop (a hung one is left behind; at exit, so that exit never hangs on it)."""
        self._closed = True
        _open_engines.discard(self)
        self.core.stop(timeout)
        if self._warmer is not None:
            self._runner.plan.cancelled.set()  # a background warm-up stops after its current build
            self._warmer.join(timeout)
        if self.core.policy is not None:
            self.core.policy.close()
        if self.core.lora is not None:
            self.core.lora.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- requests ---------------------------------------------------------------------------
    def _enqueue(self, request) -> RequestHandle:
        handle = self._inputs.attach_handle(request, self._cancel)
        self.core.post(AddRequest(request))
        return handle

    def _cancel(self, request_id: str) -> None:
        self.core.post(Cancel(request_id))

    def submit(
        self,
        prompt: str | Sequence[int],
        sampling_params: SamplingParams | None = None,
        adapter: str | None = None,
        request_id: str | None = None,
    ) -> RequestHandle:
        """Queue one request; returns at once. Bad input raises ValueError naming the field."""
        self.core.check_alive()
        return self._enqueue(self._inputs.make_request(prompt, sampling_params, adapter, "prompt", request_id))

    def stream(
        self, prompt: str | Sequence[int], sampling_params: SamplingParams | None = None, adapter: str | None = None
    ) -> TextStream:
        """An iterator of text deltas as they are generated. The request is queued at once (bad
        input raises here); closing the stream early (or dropping it) cancels the request."""
        return TextStream(self.submit(prompt, sampling_params, adapter))

    def generate(
        self,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        adapters: Sequence[str | None] | None = None,
        progress: bool = False,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids), continuously batched; results in prompt order.

        Every prompt is validated before any is queued, so bad input rejects the call as a whole.
        With an engine built with start=False, this call drives the loop itself.
        """
        from tqdm.auto import tqdm

        self.core.check_alive()
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
            self._inputs.make_request(p, sp, a, f"prompts[{i}]", None, f"adapters[{i}]")
            for i, (p, sp, a) in enumerate(zip(prompts, sampling_params, adapters, strict=True))
        ]
        handles = [self._enqueue(r) for r in requests]
        if not self.core.running:
            while not all(h.finished for h in handles):
                self.core.step()
        outputs = []
        with tqdm(total=len(handles), disable=not progress, desc="generate") as bar:
            for handle in handles:
                outputs.append(handle.result())
                bar.update(1)
        return outputs

    def logits(self, token_ids: Sequence[int], adapter: str | None = None):
        """Logits [len(token_ids), vocab] (float32) of every position, as a causal LM scores them.

        Runs on the loop thread between steps, in chunks of `max_num_batched_tokens`; its shapes
        are built on first use (they are not part of the serving warm-up; cached on disk after).
        """
        ids = self._inputs.score_input(token_ids, adapter, "token_ids", "adapter")
        return self.core.call(lambda: self.core.score([ids], [adapter]))[0]

    def prompt_logprobs(
        self,
        token_ids: Sequence[int],
        adapter: str | None = None,
        temperature: float = 0.0,
        cancel: threading.Event | None = None,
    ) -> Logprobs | None:
        """Each token's log-probability (from the second on) given the ones before it, under the
        logits divided by `temperature` (0: the model's own), and the 20 likeliest alternatives:
        numpy `Logprobs` of [len(token_ids) - 1] rows (a prompt's `echo`). Computed on the device
        chunk by chunk, so the host holds [tokens, 20], never [tokens, vocab]. None if `cancel`
        is set before the last chunk (it is checked between chunks: a client that left)."""
        ids = self._inputs.score_input(token_ids, adapter, "token_ids", "adapter")
        if len(ids) < 2:
            return Logprobs(*(np.zeros((0, *shape), dtype) for shape, dtype in _EMPTY_LOGPROBS))
        # One session at a time: it holds its blocks and pin from its first chunk to its last,
        # outside the scheduler, so two long ones could starve the cache. The wait stops if the
        # caller cancels.
        while not self._scoring_lock.acquire(timeout=0.2):
            if cancel is not None and cancel.is_set():
                return None
        try:
            return self._score_prompt(ids, adapter, float(temperature), cancel)
        finally:
            self._scoring_lock.release()

    def _score_prompt(self, ids: list[int], adapter: str | None, temperature: float, cancel) -> Logprobs | None:
        # One loop call per step (at most max_num_batched_tokens tokens): requests being served
        # take their steps in between, as they do beside a chunked prefill.
        session = self.core.call(lambda: scoring.Scoring(self.core, [ids], [adapter]))
        try:
            parts = []
            for step in session.steps:
                if cancel is not None and cancel.is_set():
                    return None
                run = lambda step=step: scoring.logprobs_step(self.core, session, step, temperature)
                parts += self.core.call(run)
        finally:
            with contextlib.suppress(EngineDead):  # a dead engine holds nothing any more
                self.core.call(session.close)
        return scoring.join_logprobs(parts)

    def logits_batch(self, token_ids: Sequence[Sequence[int]], adapters: Sequence[str | None] | None = None) -> list:
        """`logits` of several sequences in one batch (first chunks packed, each with its own adapter)."""
        adapters = [None] * len(token_ids) if adapters is None else list(adapters)
        if len(adapters) != len(token_ids):
            raise ValueError(f"adapters has {len(adapters)} entries for {len(token_ids)} sequences")
        seqs = [
            self._inputs.score_input(ids, adapter, f"token_ids[{i}]", f"adapters[{i}]")
            for i, (ids, adapter) in enumerate(zip(token_ids, adapters, strict=True))
        ]
        if not seqs:
            return []
        return self.core.call(lambda: self.core.score(seqs, adapters))

    def stats(self, fresh: bool = False) -> dict:
        """Counters of the engine: the snapshot the loop published last, plus the compile plan's
        own counters (any thread, never blocks). `fresh`: have the loop publish one first
        (waits for the loop between steps), so time-integrated figures run up to now."""
        if fresh:
            self.core.call(lambda: None)
        plan = self._runner.plan
        stats = dict(self.core.snapshot.stats)
        described = plan.describe()
        stats.update(described, warm=plan.complete.is_set())
        # The plan's compiles, wherever they ran, plus the loop thread's others (its own plan
        # builds, without warm-up, are in both counts once).
        loop_compiles = stats.pop("loop_compiles", 0)
        plan_on_loop = described["compiled_by_thread"].get(self.core.owner_thread, 0)
        stats["compiles_total"] = described["compiled"] + max(0, loop_compiles - plan_on_loop)
        if self.core.lora is not None:  # the node tier: thread-safe, read here rather than published
            stats.update(self.core.lora.node_cache.stats())
        return stats

    def record_steps(self, on: bool = True) -> None:
        """Start (or stop) recording every engine step's shape and duration (what a cost
        profile is fitted to: `plora_jax.serverless.sim.costs.fit`); `recorded_steps` takes them."""
        self.core.call(lambda: self.core.record_steps(on))

    def recorded_steps(self) -> list:
        """The `StepRecord`s recorded since the last call (and forgets them)."""
        return self.core.call(lambda: self.core.step_log.take() if self.core.step_log is not None else [])

    # --- adapters ---------------------------------------------------------------------------
    def _lora(self) -> LoraManager:
        if self.core.lora is None:
            raise ValueError("this engine serves no adapters (max_loras=0)")
        return self.core.lora

    def _make_policy(self, name: str) -> Policy:
        """The policy `name` under this engine's config."""
        c = self.config
        return make_policy(
            name,
            interval_s=c.policy_interval_s,
            predictor_checkpoint=c.predictor_checkpoint,
            retention_intervals=c.retention_intervals,
        )

    def set_policy(self, policy: Policy | str) -> None:
        """Replace the residency policy (a name from `plora_jax.policies.POLICIES`, or a policy
        object such as `Oracle(arrivals)`); the old one is closed."""
        self._lora()
        if isinstance(policy, str):
            policy = self._make_policy(policy)
        if not isinstance(policy, Policy):
            raise ValueError(f"policy must be a policy name or a plora_jax.policies.Policy, got {type(policy)}")
        self.core.call(lambda: self.core.adopt_policy(policy))

    @property
    def policy(self) -> Policy | None:
        """The residency policy in use (None without adapters)."""
        return self.core.policy

    def reset_adapters(self, adapter_loads: str | None = None, node_cache: bool = False) -> None:
        """Empty the adapter device pool and host cache (adapters stay registered), so that a
        benchmark replays policies one after another on one warm engine from the same cold
        start; `adapter_loads` switches between "async" and "sync" (S-LoRA) loads; `node_cache`
        also deletes the node cache's entries nobody is reading (remote adapters are then
        fetched from their store again). Call it idle."""
        self._lora()
        if adapter_loads not in (None, "async", "sync"):
            raise ValueError(f"adapter_loads must be 'async' or 'sync', got {adapter_loads!r}")
        self.core.call(lambda: self.core.reset_adapters(adapter_loads, node_cache))
        if adapter_loads is not None:
            self.config = dataclasses.replace(self.config, adapter_loads=adapter_loads)

    def add_adapter(self, name: str, path: str | Path, timeout: float | None = None) -> dict:
        """Register a PEFT adapter folder (or a store's URI: s3://, gs://, http(s)://, fetched
        into the node cache) under `name`; it is read and validated now (AdapterError
        names the file and field) and loaded onto the device when a request first uses it (or
        earlier, if the policy prefetches it). `timeout`: seconds to wait for the loop."""
        lora = self._lora()
        if self.has_adapter(name):  # before reading anything (the loop checks again when it inserts)
            raise AdapterError(f"adapter name {name!r} is already registered", "name")
        entry, copy = lora.prepare(name, path)  # validated and read here, on the caller's thread
        return self.core.call(lambda: self._describe(lora.insert(entry, copy).name), timeout)

    def add_adapter_dir(self, folder: str | Path) -> dict:
        """Register every subfolder of `folder` (or of a store's prefix, each fetched into the
        node cache) that holds adapter_config.json, named after the subfolder, validated from
        config and tensor header only (weights are read when needed).
        Returns {"added": [names], "errors": {name: why}}; already registered ones are skipped."""
        lora = self._lora()
        if is_remote(folder):  # fetched on this thread; the loop only inserts
            found = lora.registry.scan_remote(str(folder), self.core.snapshot.adapters)
            added, errors = self.core.call(lambda: lora.insert_found(*found))
        else:
            added, errors = self.core.call(lambda: lora.scan(folder))
        return {"added": added, "errors": errors}

    def _describe(self, name: str) -> dict:
        return next(d for d in self.core.lora.describe() if d["name"] == name)

    def remove_adapter(self, name: str, timeout: float | None = None) -> None:
        """Unregister an adapter. Waiting requests for it fail with an error naming it; running
        ones finish, and its device pages are freed when the last of them does. `timeout`:
        seconds to wait for the loop (TimeoutError after; the removal may still happen)."""
        self._lora()
        self.core.call(lambda: self.core.remove_adapter(name), timeout)

    def has_adapter(self, name: str) -> bool:
        """Whether `name` is registered (read from the published snapshot, without a round trip)."""
        return name in self.core.snapshot.adapters

    def prefetch(self, name: str, keep: Collection[str] = ()) -> str:
        """Start loading a registered adapter onto the device now, before any request asks for it
        (what a cluster's forecaster does on the replica it picks). To make room it evicts as a
        demand load would (any unpinned adapter, least recently used first) except those in
        `keep` (the caller's adapters more likely to be asked for than this one); when nothing
        can be evicted it does nothing. Returns the adapter's residency afterwards."""
        lora = self._lora()

        def start() -> str:  # on the loop thread, between steps
            if name not in lora.entries:
                raise ValueError(f"adapter {name!r} is not registered")
            if lora.pages.get(name) is None:
                lora.start_load(name, prefetch=True, keep=frozenset(keep))
            return lora.residency(name)

        return self.core.call(start)

    def host_adapters(self) -> frozenset[str]:
        """Adapters with a copy in the host cache, from the published snapshot."""
        return self.core.snapshot.on_host

    def resident_adapters(self) -> frozenset[str]:
        """Adapters placed in the device pool (or loading into it), from the published snapshot."""
        return self.core.snapshot.on_device

    def adapters(self, timeout: float | None = None) -> list[dict]:
        """Every registered adapter: name, path, rank, target_modules, residency (`metrics.RESIDENCIES`),
        pages, bytes. `timeout`: seconds to wait for the loop (TimeoutError after)."""
        if self.core.lora is None:
            return []
        return self.core.call(self.core.lora.describe, timeout)


__all__ = ["Engine", "RequestFailed", "RequestOutput", "TextStream", "resolve_dtype"]
