"""Scoring: the logits of every position of given token sequences, on the loop's owner thread.

A `Scoring` holds what scoring needs, with the serving path's own pieces: KV blocks from the
scheduler's allocator, the adapter through the same gate as a request (a probe request that
counts no hit or cold start), and the runner's packed prefill. First chunks of several
sequences are packed into one step; a chunk that continues a sequence runs first in its step,
as in serving (only segment 0 reads earlier keys). It gives its blocks and pins back when it
closes, so scoring never keeps memory.

`Engine.logits` and `logits_batch` open, run and close one in a single loop call (`score`).
`Engine.prompt_logprobs` (a server's `echo`) keeps one open across calls and runs one step
(at most `max_num_batched_tokens` tokens) per call, so the requests being served take their
steps in between instead of waiting for a whole prompt; each step's logits are reduced on the
device (`ModelRunner.score_logprobs`), so its host memory is `[tokens, 20]`, whatever the
vocabulary.
"""

from __future__ import annotations

import numpy as np

from ..buckets import cdiv
from ..lora.peft import AdapterError, AdapterRemoved
from .errors import EngineBusy
from .kv_blocks import OutOfBlocks
from .runner import Segment
from .sampling import Logprobs, SamplingParams
from .scheduler import Request


class Scoring:
    """Sequences being scored (owner thread only): blocks and adapter pins held from
    construction to `close`; `steps` are their chunks grouped as prefill packs them."""

    def __init__(self, core, seqs: list[list[int]], adapters: list[str | None]):
        self.core, self.seqs = core, seqs
        self.tables: list[list[int]] = []
        self.probes: list[Request] = []
        allocator, bs = core.scheduler.blocks, core.config.block_size
        try:
            for ids, adapter in zip(seqs, adapters, strict=True):
                # The adapter first, pinned: with one budget for KV and adapters, the reclaim
                # below may then evict only adapters nobody here holds.
                probe = Request("logits", ids, SamplingParams(), 0, frozenset(), len(ids), adapter=adapter)
                probe.adapter_counted = True  # scoring is not traffic: no hit or cold start counted
                while adapter is not None and not core.gate.acquire(probe):
                    _wait_for_adapter(core, adapter)
                self.probes.append(probe)
                need = cdiv(len(ids), bs)
                if need > allocator.num_free and core.gate is not None:
                    core.gate.reclaim(need)  # unused adapters give back their blocks (a unified budget)
                try:
                    self.tables.append(allocator.allocate(need))
                except OutOfBlocks as e:
                    raise EngineBusy(f"scoring: the KV cache is busy ({e}); retry when fewer requests run") from None
        except BaseException:
            self.close()
            raise
        budget, max_segments = core.runner.buckets.prefill[-1], core.runner.buckets.max_segments
        self.steps = score_steps([len(ids) for ids in seqs], budget, max_segments)
        core.scoring.add(self)  # an unload retires its probes' adapters, as it does running requests

    def run(self, step: list[tuple[int, int, int]], fn) -> list:
        """`fn(segments)` over one step's chunks; its results, one per chunk."""
        segments = [
            Segment(self.seqs[i][start:end], start, self.tables[i], self.probes[i].adapter_slot)
            for i, start, end in step
        ]
        return fn(segments)

    def close(self) -> None:
        self.core.scoring.discard(self)
        allocator = self.core.scheduler.blocks
        for blocks in self.tables:
            allocator.free(blocks)
        for probe in self.probes:
            if probe.adapter_slot:
                self.core.gate.release(probe)
        self.tables, self.probes = [], []


def score(core, seqs: list[list[int]], adapters: list[str | None]) -> list[np.ndarray]:
    """Logits [len(seq), vocab] of each sequence in `seqs`, under its adapter in `adapters`."""
    scoring = Scoring(core, seqs, adapters)
    try:
        out: list[list[np.ndarray]] = [[] for _ in seqs]
        for step in scoring.steps:
            for (i, _, _), logits in zip(step, scoring.run(step, core.runner.score), strict=True):
                out[i].append(logits)
        return [np.concatenate(parts) for parts in out]
    finally:
        scoring.close()


def logprobs_step(core, scoring: Scoring, step: list[tuple[int, int, int]], temperature: float) -> list[Logprobs]:
    """One step of a single sequence's prompt log-probabilities: each token's target is the
    token after it (the sequence's last predicts nothing: 0, dropped by the caller)."""
    (ids,) = scoring.seqs
    following = [*ids[1:], 0]

    def run(segments: list[Segment]) -> list[Logprobs]:
        targets = [following[seg.start : seg.start + len(seg.token_ids)] for seg in segments]
        return core.runner.score_logprobs(segments, targets, temperature)

    return scoring.run(step, run)


def join_logprobs(parts: list[Logprobs]) -> Logprobs:
    """The steps' rows end to end, less the last (which predicts nothing)."""
    return Logprobs(*(np.concatenate([getattr(p, f) for p in parts])[:-1] for f in ("chosen", "top_ids", "top")))


def _wait_for_adapter(core, adapter: str) -> None:
    """The probe could not pin `adapter`: wait for its load, or raise why it cannot come."""
    lora = core.lora
    if adapter not in lora.entries:
        core.gate.unservable.clear()
        raise AdapterRemoved(f"adapter {adapter!r} is not registered (it was removed)")
    if not lora.is_loading(adapter):
        error = lora.entries[adapter].error
        if error is not None:
            raise AdapterError(f"adapter {adapter!r} could not be loaded: {error}") from error
        raise EngineBusy(f"scoring: the adapter pool is busy; {adapter!r} cannot be loaded now")
    failed = [e for name, e in core.poll_adapters(wait_for=adapter) if name == adapter]
    if failed:  # its load failed: scoring does not retry it forever
        raise AdapterError(f"adapter {adapter!r} could not be loaded: {failed[0]}") from failed[0]


def score_steps(lengths: list[int], budget: int, max_segments: int) -> list[list[tuple[int, int, int]]]:
    """Chunks (sequence, start, end) of sequences of `lengths` grouped into steps under the
    prefill packing rules (at most `budget` tokens and `max_segments` chunks a step)."""
    steps: list[list[tuple[int, int, int]]] = []
    current: list[tuple[int, int, int]] = []
    used = 0
    for i, length in enumerate(lengths):
        for start in range(0, length, budget):
            end = min(start + budget, length)
            fits = current and start == 0 and used + end - start <= budget and len(current) < max_segments
            if current and not fits:
                steps.append(current)
                current, used = [], 0
            current.append((i, start, end))
            used += end - start
    if current:
        steps.append(current)
    return steps
