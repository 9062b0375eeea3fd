"""What one engine step is, for its cost: its shape, and (when recorded) how long it took.

A step's cost depends on its sizes as compiled (rows and tokens padded to their buckets), on
counts that are data (context tokens the decode rows attend over, rows and tokens that run an
adapter), on what runs beside it (an adapter transfer in flight competes for the host) and on
the adapter commits of its iteration (finished loads written into the device pool).
`StepShape` holds exactly that, computed from a `StepPlan` and the engine's `Buckets` by
`shape_of`, so the live engine (recording its steps) and the simulator (charging a cost profile
per step, `plora_jax.serverless.sim.costs`) describe a step the same way.

A recorded step's seconds are the time from the later of the start of the loop iteration that
dispatched it (its first handled message, or the iteration itself) and the previous step's read
to its own read. The loop dispatches step i, then
reads step i-1's tokens, so in steady state this is the loop's period while step i runs: device
time plus whatever host work (stop checks, streaming, scheduling, inputs, policy decisions) did
not overlap it; after an idle loop it is the whole iteration's host work and the step. A
synchronous adapter load inside the scheduling is the load's time and is left out of both the
step it delays and the one whose read it delays.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..buckets import pick_bucket
from .scheduler import StepPlan


@dataclass(frozen=True)
class StepShape:
    decode_rows: int  # decode batch rows padded to the decode bucket (0: no decode launch)
    decode_context: int  # context tokens the decode rows attend over (summed, unpadded)
    prefill_tokens: int  # packed prefill tokens padded to the prefill bucket (0: no prefill launch)
    adapter_rows: int  # decode rows that run an adapter
    adapter_tokens: int  # prefill tokens (unpadded) of segments that run an adapter
    loading: bool  # an adapter transfer was in flight when the step was dispatched
    committed_pages: int = 0  # adapter pages committed into the device pool in its iteration


@dataclass(frozen=True)
class StepRecord:
    shape: StepShape
    seconds: float  # from max(its iteration's start, previous read) to this step's read


def shape_of(
    plan: StepPlan,
    decode_buckets: tuple[int, ...],
    prefill_buckets: tuple[int, ...],
    loading: bool,
    committed_pages: int = 0,
) -> StepShape:
    """The `StepShape` of `plan` under the engine's bucket tables (steady state: every bucket built)."""
    tokens = sum(len(row.token_ids) for row in plan.prefill)
    return StepShape(
        decode_rows=pick_bucket(len(plan.decode), decode_buckets) if plan.decode else 0,
        decode_context=sum(row.position + 1 for row in plan.decode),
        prefill_tokens=pick_bucket(tokens, prefill_buckets) if plan.prefill else 0,
        adapter_rows=sum(row.request.adapter is not None for row in plan.decode),
        adapter_tokens=sum(len(row.token_ids) for row in plan.prefill if row.request.adapter is not None),
        loading=loading,
        committed_pages=committed_pages,
    )


class StepLog:
    """Records the steps of one loop (owned by the loop thread; read through `Engine.call`)."""

    def __init__(self):
        self.records: list[StepRecord] = []
        self._last_read = 0.0

    def read(self, shape: StepShape, begun: float, now: float, stalled: float = 0.0) -> None:
        """A step whose iteration began at `begun` and whose tokens were just read at `now`;
        `stalled` seconds of that span were a synchronous load (not the step's time)."""
        self.records.append(StepRecord(shape, now - max(begun, self._last_read) - stalled))
        self._last_read = now

    def take(self) -> list[StepRecord]:
        records, self.records = self.records, []
        return records
