"""Scoring: the logits of every position of given token sequences, on the loop's owner thread.

`Engine.logits`, `logits_batch` and `prompt_logprobs` run this between steps (through
`EngineCore.call`), with
the serving path's own pieces: KV blocks from the scheduler's allocator (freed afterwards, so
scoring never holds memory), the adapter through the same gate as a request (a probe request
that counts no hit or cold start), and the runner's packed prefill. First chunks of several
sequences are packed into one step; a chunk that continues a sequence runs first in its step,
as in serving (only segment 0 reads earlier keys). `prompt_logprobs` reduces each chunk's logits
on the device (`ModelRunner.score_logprobs`): its host memory is `[tokens, 20]`, whatever the
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


def score(core, seqs: list[list[int]], adapters: list[str | None]) -> list[np.ndarray]:
    """Logits [len(seq), vocab] of each sequence in `seqs`, under its adapter in `adapters`."""
    return [np.concatenate(parts) for parts in _chunks(core, seqs, adapters, core.runner.score)]


def prompt_logprobs(core, ids: list[int], adapter: str | None, temperature: float) -> Logprobs:
    """Each token's log-probability (from the second on) under the model's distribution after
    the tokens before it, divided by `temperature` (0: the model's own), with the likeliest
    alternatives: numpy `Logprobs` of [len(ids) - 1] rows."""
    following = [*ids[1:], 0]  # the last position predicts nothing: its row is dropped

    def run(segments: list[Segment]) -> list[Logprobs]:
        targets = [following[seg.start : seg.start + len(seg.token_ids)] for seg in segments]
        return core.runner.score_logprobs(segments, targets, temperature)

    (parts,) = _chunks(core, [ids], [adapter], run)
    return Logprobs(*(np.concatenate([getattr(p, f) for p in parts])[:-1] for f in ("chosen", "top_ids", "top")))


def _chunks(core, seqs: list[list[int]], adapters: list[str | None], run) -> list[list]:
    """`run(segments)` over the sequences' chunks (packed as prefill packs them), with their KV
    blocks and adapters held for the duration; per sequence, its chunks' results in order."""
    allocator = core.scheduler.blocks
    bs = core.config.block_size
    probes: list[Request] = []
    tables: list[list[int]] = []
    try:
        for ids, adapter in zip(seqs, adapters, strict=True):
            try:
                tables.append(allocator.allocate(cdiv(len(ids), bs)))
            except OutOfBlocks as e:
                raise EngineBusy(f"scoring: the KV cache is busy ({e}); retry when fewer requests run") from None
            probe = Request("logits", ids, SamplingParams(), 0, frozenset(), len(ids), adapter=adapter)
            probe.adapter_counted = True  # scoring is not traffic: no hit or cold start counted
            while adapter is not None and not core.gate.acquire(probe):
                _wait_for_adapter(core, adapter)
            probes.append(probe)
        out: list[list] = [[] for _ in seqs]
        budget, max_segments = core.runner.buckets.prefill[-1], core.runner.buckets.max_segments
        for step in score_steps([len(s) for s in seqs], budget, max_segments):
            segments = [Segment(seqs[i][start:end], start, tables[i], probes[i].adapter_slot) for i, start, end in step]
            for (i, _, _), result in zip(step, run(segments), strict=True):
                out[i].append(result)
        return out
    finally:
        for blocks in tables:
            allocator.free(blocks)
        for probe in probes:
            if probe.adapter_slot:
                core.gate.release(probe)


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
