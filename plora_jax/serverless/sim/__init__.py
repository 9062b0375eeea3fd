"""A discrete-event simulator of the serverless multi-LoRA engine, for whole trace windows.

The host logic is the engine's own code, not a model of it: each instance (`instance`) runs
the engine's `Scheduler` (admission in arrival order, prefill chunking and packing, KV blocks,
preemption), its `AdapterGate` (cold starts, adapter waits, synchronous loads for S-LoRA), the
residency core (`plora_jax.lora.residency`: placement, eviction order, layouts, the host cache,
the counters, policy decisions applied exactly as live) and the `plora_jax.policies` objects
the live engine runs, all on a virtual clock with a `SimulatedTransfer` in place of the
transfer thread. The serverless rules (`serverless.instances`: routing, instance starts,
keep-alive, pre-warm) are the ones the live replay applies. Time comes from a cost profile
(`costs.Calibration`): a step's cost from its `StepShape` (padded rows and tokens, context,
adapter rows and tokens, a transfer in flight), fitted to the steps a live engine recorded
(`benchmarks.replay --mode live` writes one), or written by hand, or from a GPU profile.

A request is a cold start if its adapter was not on its instance's device when it first asked
for it; its cold-start latency is the time from then until the adapter was there (the engine's
`adapter_wait_s`). The simulator is deterministic.

What still differs from a live run:
- the device is a cost per step: a live step's duration varies (collection pauses, the
  machine's other load) where the profile gives the mean for its shape;
- policy decisions run at arrivals and at interval events; the live loop also decides when an
  interval has passed at its next iteration, and the forecaster's own compute time is not
  charged (live it runs on its own thread, or on the loop for the others);
- host-side time outside the loop (tokenization on the caller's thread, streaming to clients)
  is not modelled: the replay submits token ids and reads no stream;
- a transfer's duration is its bytes over a fitted rate, one transfer at a time per link (the
  store link, disk reads for demand loads, disk reads for the rest, host-to-device copies),
  demand first among those queued; live, a demand fetch also overtakes a background fetch
  already running on the store link (between its chunks), which the simulator does not; live,
  the fetch a load needs runs inside its read, so it holds that read lane meanwhile, where the
  simulator frees the read channel until the fetch ends; a fetch costs the adapter's bytes at
  the model's dtype (the live line is fitted on file bytes);
  contention with steps beyond `transfer_step_s` is not modelled;
- with a calibration whose `disk_bytes_per_s` is 0, as a live one is, disk reads are inside
  the per-byte load cost and host reads take no time.
"""

from .costs import Calibration, fit
from .instance import SimInstance
from .simulator import SimConfig, SimRequest, Simulator, simulate

__all__ = ["Calibration", "SimConfig", "SimInstance", "SimRequest", "Simulator", "fit", "simulate"]
