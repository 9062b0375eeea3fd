"""Serverless multi-LoRA serving on Azure-derived traffic: the workload generator, the instance
rules (affinity routing, scale to zero, pre-warming), the live replay on real engines, the
calibrated discrete-event simulator, and the metrics both report (`benchmarks.replay` runs them).

Only numpy, the engine's host-side parts and the policies are imported here; the live replay
imports the engine when it runs."""

from .instances import InstanceLoad, pick_instance
from .report import RequestRecord, Run, claims, summarize
from .simulator import Calibration, SimConfig, Simulator, simulate
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
    "pick_instance",
    "simulate",
    "summarize",
]
