"""Continuous-batching scheduler: host only (Python and numpy), owned by the engine's loop thread.

Every step the scheduler decides which requests run and how: each request already prefilled
decodes one token, and the remaining token budget (`max_num_batched_tokens` minus the decode
rows) goes to prompt chunks, first of a request mid-prefill, then of waiting requests admitted
in arrival order. The chunks are packed end to end into one row of tokens (segments of a
packed prefill, at most `max_prefill_seqs`), so a step pads only once, to its token bucket. A
chunk that continues a prompt (its earlier tokens already in the cache) is only ever the first
segment: the attention reads earlier keys for segment 0 alone. The scheduler owns the KV
`BlockAllocator` and the decode-batch rows (`seq_slot`s), and grows a request's blocks as its
tokens are computed, never ahead of need.

Tokens are read one step late. When step i is dispatched, step i-1's sampled tokens are still
in flight, so a request carries `pending` tokens (sampled on the device, not yet seen here).
Its next decode input comes from a device buffer indexed by `seq_slot`, not from the host; the
invariant for a prefilled request is `num_computed == num_tokens - 1` (every token but the
newest has its K/V in the cache). A request found finished when its tokens are read may have
one more token in flight; that result is dropped.

With one device-memory budget for KV and adapters, a request short of blocks first has the
adapter tiers evict unused adapters for theirs (`reclaim`); only then does it wait or preempt.
A request whose adapter cannot be placed for lack of that memory waits in arrival order, as one
waiting for blocks does: a later request would take what it waits for.

When a decode cannot get a block, the most recently admitted running request is preempted by
recompute: its blocks and slot are freed and it returns to the front of the queue; when it is
admitted again, its prompt plus the tokens generated so far are prefilled anew. Sampling keys
depend only on a request's seed and token index, so preemption changes no output.

Nothing here touches the device: the simulator (`plora_jax.serverless.sim`) runs this same
scheduler on a virtual clock, so admission, packing, padding and preemption are the engine's.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..buckets import cdiv
from .kv_blocks import BlockAllocator
from .sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """Host state of one request."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    stop_ids: frozenset[int]
    max_total: int  # cap on prompt + generated tokens
    adapter: str | None = None
    prompt_text: str | None = None
    detokenizer: Any = None  # IncrementalDetokenizer of this request (None without a tokenizer)
    sampling: Any = None  # its sampling.SAMPLING_ROW record, built by the input processor (None: from params)
    handle: Any = None  # the caller's RequestHandle (None for internal probes)
    adapter_slot: int = 0  # the adapter's slot in the device pool while admitted (0: none)
    adapter_wait: float = 0.0  # seconds spent waiting for the adapter (loads, full pool)
    adapter_wait_start: float | None = None
    adapter_counted: bool = False  # its arrival was counted (hit or cold start)
    adapter_cold: bool = False  # its adapter was not on the device when it arrived (a cold start)
    adapter_tier: str = ""  # the fastest tier holding its adapter when it arrived (`metrics.TIERS`)
    arrival: float = field(default_factory=time.perf_counter)
    status: Status = Status.WAITING
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # with params.top_logprobs
    prefill_ids: list[int] = field(default_factory=list)  # what the current admission prefills
    num_computed: int = 0  # tokens whose K/V are in the cache
    prefilled: bool = False  # the newest token lives in the device buffer; decode may run
    pending: int = 0  # tokens sampled on the device, not yet read
    blocks: list[int] = field(default_factory=list)
    seq_slot: int | None = None
    finish_reason: str | None = None
    num_preemptions: int = 0
    first_scheduled: float | None = None
    first_token: float | None = None
    finished_at: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids) + self.pending

    @property
    def num_generated(self) -> int:
        return len(self.output_ids) + self.pending

    @property
    def at_limit(self) -> bool:
        """True once enough tokens are sampled (read or not) to reach max_tokens or max_total."""
        return self.num_generated >= self.params.max_tokens or self.num_tokens >= self.max_total


@dataclass
class PrefillRow:
    """One segment of a packed prefill step."""

    request: Request
    start: int  # position of the chunk's first token
    token_ids: list[int]
    final: bool  # the chunk ends the prefill: its last token's logits are sampled
    step: int  # index of the token sampled (len(outputs) before it)


@dataclass
class DecodeRow:
    request: Request
    position: int  # position whose K/V this step writes (the newest token's)
    step: int


@dataclass
class StepPlan:
    decode: list[DecodeRow]
    prefill: list[PrefillRow]


class Scheduler:
    def __init__(
        self,
        num_kv_blocks: int,
        block_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_prefill_seqs: int,
        acquire_adapter=None,
        release_adapter=None,
        clock: Callable[[], float] = time.perf_counter,
        arrive_adapter=None,
        blocks: BlockAllocator | None = None,
        reclaim: Callable[[int], bool] | None = None,
        waits_for_memory: Callable[[Request], bool] | None = None,
    ):
        self.clock = clock  # the engine's wall clock, or a simulator's virtual one
        # The KV blocks: given when the adapter pool shares their budget, which then holds some.
        self.blocks = blocks if blocks is not None else BlockAllocator(num_kv_blocks)
        if self.blocks.num_blocks != num_kv_blocks:
            raise ValueError(f"the block allocator has {self.blocks.num_blocks} blocks, num_kv_blocks={num_kv_blocks}")
        self._reclaim = reclaim  # reclaim(n): evict unused adapters until n blocks are free; whether they are
        # waits_for_memory(request): its adapter could not be placed for room it shares with KV
        self._waits_for_memory = waits_for_memory
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_prefill_seqs = max_prefill_seqs
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order; the last is preempted first
        self._free_slots = list(range(max_num_seqs - 1, -1, -1))
        self.num_preemptions = 0
        # Adapter residency is the engine's (it owns the device pool); these pin and unpin.
        self._acquire_adapter = acquire_adapter
        self._release_adapter = release_adapter
        self._arrive_adapter = arrive_adapter  # as a request is queued (counts its hit or cold start)

    @classmethod
    def for_engine(
        cls,
        config,
        max_num_batched_tokens: int,
        gate=None,
        clock: Callable[[], float] = time.perf_counter,
        blocks: BlockAllocator | None = None,
    ):
        """The scheduler of an engine with `config` (an `EngineConfig`), its prefill chunk the
        largest prefill bucket, admitting adapters through `gate` (an `AdapterGate`, or None
        without LoRA), its KV blocks `blocks` (shared with the adapter pool under a unified
        budget; None: its own): the live engine's and each simulated instance's."""
        return cls(
            config.num_kv_blocks,
            config.block_size,
            config.max_num_seqs,
            max_num_batched_tokens,
            config.max_prefill_seqs,
            gate and gate.acquire,
            gate and gate.release,
            clock,
            gate and gate.arrive,
            blocks,
            gate and gate.reclaim,
            gate and gate.waits_for_memory,
        )

    # --- queue --------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        self.waiting.append(request)
        if request.adapter is not None and self._arrive_adapter is not None:
            self._arrive_adapter(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, request: Request, reason: str) -> None:
        """End a request (finished or aborted) and release its blocks and slot."""
        if request.status is Status.FINISHED:
            return
        if request.status is Status.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self._release(request)
        request.status = Status.FINISHED
        request.finish_reason = reason
        request.finished_at = self.clock()

    def _release(self, request: Request) -> None:
        if request.blocks:
            self.blocks.free(request.blocks)
            request.blocks = []
        if request.seq_slot is not None:
            self._free_slots.append(request.seq_slot)
            request.seq_slot = None
        if request.adapter_slot:
            self._release_adapter(request)

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self._release(request)
        request.status = Status.WAITING
        request.num_computed = 0
        request.prefilled = False
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _grow(self, request: Request, num_tokens: int) -> bool:
        """Make `request` own blocks for `num_tokens` tokens; False if the pool is short."""
        need = cdiv(num_tokens, self.block_size) - len(request.blocks)
        if need <= 0:
            return True
        if need > self.blocks.num_free and not (self._reclaim and self._reclaim(need)):
            return False
        request.blocks += self.blocks.allocate(need)
        return True

    # --- planning -----------------------------------------------------------------------
    def schedule(self) -> StepPlan | None:
        decode = self._schedule_decode()
        prefill = self._schedule_prefill(self.max_num_batched_tokens - len(decode))
        if not decode and not prefill and self.running and all(not r.pending for r in self.running):
            # Every running request waits for blocks held by the others: free the newest.
            self._preempt(self.running[-1])
            prefill = self._schedule_prefill(self.max_num_batched_tokens)
        if not decode and not prefill:
            return None
        now = self.clock()
        for row in decode:
            row.request.num_computed += 1
            row.request.pending += 1
        for row in prefill:
            req = row.request
            req.num_computed += len(row.token_ids)
            if req.first_scheduled is None:
                req.first_scheduled = now
            if row.final:
                req.prefilled = True
                req.pending += 1
        return StepPlan(decode, prefill)

    def _schedule_decode(self) -> list[DecodeRow]:
        rows = []
        for req in list(self.running):
            if not req.prefilled or req.at_limit or req.status is not Status.RUNNING:
                continue
            while not self._grow(req, req.num_computed + 1):
                victim = self.running[-1]
                self._preempt(victim)
                rows = [r for r in rows if r.request is not victim]
                if victim is req:
                    break
            if req.status is Status.RUNNING:
                rows.append(DecodeRow(req, req.num_computed, req.num_generated))
        return rows

    def _schedule_prefill(self, budget: int) -> list[PrefillRow]:
        rows: list[PrefillRow] = []
        budget = min(budget, self.max_num_batched_tokens)
        candidates = [r for r in self.running if not r.prefilled]
        candidates += [r for r in self.waiting if r.pending == 0]  # a preempted request waits for its tokens
        for req in candidates:
            if budget <= 0 or len(rows) >= self.max_prefill_seqs:
                break
            if rows and req.num_computed > 0:
                break  # a chunk that continues a prompt only goes first (it alone reads earlier keys)
            admitting = req.status is Status.WAITING
            if admitting and not self._free_slots:
                break
            ids = req.prefill_ids if not admitting else req.prompt_ids + req.output_ids
            chunk = min(len(ids) - req.num_computed, budget)
            if admitting and req.adapter is not None and not self._acquire_adapter(req):
                if self._waits_for_memory is not None and self._waits_for_memory(req):
                    break  # one budget with the KV cache: later requests would take the blocks it waits for
                continue  # its adapter is loading (or waits for a slot): later requests may go first
            if not self._grow(req, req.num_computed + chunk):
                if admitting:
                    if req.adapter_slot:
                        self._release_adapter(req)
                    break  # keep arrival order: nobody overtakes a request waiting for blocks
                continue
            if admitting:
                self.waiting.remove(req)
                req.status = Status.RUNNING
                req.prefill_ids = ids
                req.seq_slot = self._free_slots.pop()
                self.running.append(req)
            start = req.num_computed
            final = start + chunk == len(ids)
            rows.append(PrefillRow(req, start, ids[start : start + chunk], final, req.num_generated))
            budget -= chunk
        return rows
