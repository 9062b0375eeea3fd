"""Serverless multi-LoRA serving on Azure-derived traffic: the workload generator, the instance
rules (affinity routing, scale to zero, pre-warming), the live replay on real engines, the
calibrated discrete-event simulator, and the metrics both report (`benchmarks.replay` runs them).

The simulator (`sim`) runs the engine's host-side parts on a virtual clock; the live replay
(`live`) runs real engines."""

from .instances import InstanceLoad, pick_instance
from .report import RequestRecord, Run, claims, pair, summarize
from .sim import Calibration, SimConfig, Simulator, simulate
from .workload import TraceRequest, Workload, WorkloadConfig, generate

__all__ = [
    "Calibration",
    "InstanceLoad",
    "RequestRecord",
    "Run",
    "SimConfig",
    "Simulator",
    "TraceRequest",
    "Workload",
    "WorkloadConfig",
    "claims",
    "generate",
    "pair",
    "pick_instance",
    "simulate",
    "summarize",
]
