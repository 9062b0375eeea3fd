"""Replayable multi-LoRA workloads from the Azure traces.

One function of an Azure Functions per-minute invocation trace becomes one adapter; its rank is
drawn from a mix (default {8, 12, 16, 24, 40, 64}: not all multiples of a page's 8 rows, so
what the paged and contiguous layouts waste differs). The `c` invocations of a function in
trace minute m become `c` requests inside that minute: a Poisson process conditioned on its count places them
uniformly at random (`arrivals="poisson"`), or they are spread evenly (`"uniform"`). Prompt and
output lengths are drawn together, as pairs, from an Azure LLM inference trace
(`TIMESTAMP,ContextTokens,GeneratedTokens`). Time compression maps one trace minute onto
`seconds_per_minute` seconds of replay; counts per minute are never changed by it.

The functions are either the trace's rows in order, or (`popularity=True`, the default) a sample
matched to the In-Vitro popularity distribution (`plora_jax.predictor.traces.sample_popularity`):
the full-day pool is far busier than Azure as a whole. Everything is drawn from one seeded
generator, so a config gives the same requests on every machine, and `Workload.write` stores them
as JSON for replays elsewhere.

A replay starts from an empty pool and forecasters without history, which a service that has run
for hours never sees: every adapter's first request in the slice is a cold start no history can
foresee. `warmup_minutes` replays the trace minutes before `start_minute` first and leaves them
out of every figure (`Workload.measured_from_s`), so the measured minutes see a warm pool and
forecasters with history, every policy alike. The warm-up's requests are drawn from their own
generator, so the measured requests are the same with and without it (shifted in time).

CPU live runs cannot prefill the trace's 1,000-token prompts at replay speed, so `token_scale`
shrinks both lengths (and `max_prompt_tokens` / `max_output_tokens` cap them); the replay
output records the config, so a scaled run never passes for the real one.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from plora_jax.policies.retention import RETENTION_INTERVALS
from plora_jax.predictor.traces import Trace, TraceError, read_trace, sample_popularity

ARRIVALS = ("poisson", "uniform")


@dataclass(frozen=True)
class WorkloadConfig:
    trace: str = "../shared/data/azure/azure2019_invitro2023_8h_invocations.csv"  # function counts per minute
    llm_trace: str = "../shared/data/azure/AzureLLMInferenceTrace_conv_dev.csv"  # ContextTokens, GeneratedTokens
    adapters: int = 32  # adapters (functions) in the workload
    minutes: int = 10  # trace minutes replayed
    start_minute: int = 0  # first trace column measured (0-based)
    warmup_minutes: int = 0  # trace minutes before start_minute replayed first, left out of the figures
    seconds_per_minute: float = 60.0  # time compression: one trace minute lasts this many seconds
    ranks: tuple[int, ...] = (8, 12, 16, 24, 40, 64)  # adapter ranks, drawn uniformly per adapter
    arrivals: str = "poisson"  # "poisson" (uniform times given the count) | "uniform" (evenly spaced)
    popularity: bool = True  # sample functions to the In-Vitro popularity CDF (False: the first rows)
    token_scale: float = 1.0  # multiply sampled token lengths (CPU live runs shrink them)
    max_prompt_tokens: int = 0  # cap on prompt tokens (0: none)
    max_output_tokens: int = 0  # cap on output tokens (0: none)
    seed: int = 0

    def __post_init__(self):
        if self.adapters < 1 or self.minutes < 1 or self.start_minute < 0:
            raise ValueError("adapters and minutes must be >= 1 and start_minute >= 0")
        if not 0 <= self.warmup_minutes <= self.start_minute:
            raise ValueError(
                f"warmup_minutes must be in [0, start_minute] (the minutes before the measured ones), "
                f"got {self.warmup_minutes} with start_minute {self.start_minute}"
            )
        if self.seconds_per_minute <= 0 or self.token_scale <= 0:
            raise ValueError("seconds_per_minute and token_scale must be > 0")
        if not self.ranks or any(r <= 0 for r in self.ranks):
            raise ValueError(f"ranks must be positive, got {self.ranks}")
        if self.arrivals not in ARRIVALS:
            raise ValueError(f"arrivals must be one of {ARRIVALS}, got {self.arrivals!r}")
        if self.max_prompt_tokens < 0 or self.max_output_tokens < 0:
            raise ValueError("max_prompt_tokens and max_output_tokens must be >= 0")


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float  # seconds from the start of the replay
    adapter: str
    prompt_tokens: int
    output_tokens: int
    minute: int  # trace minute (0-based, from the first replayed one, warm-up included) the request belongs to


@dataclass
class Workload:
    config: WorkloadConfig
    ranks: dict[str, int]  # adapter -> rank
    requests: list[TraceRequest]  # sorted by arrival
    counts: np.ndarray = field(repr=False)  # [adapters, warmup_minutes + minutes] trace counts, rows in `ranks` order
    first_minute: int = 0  # minute of day at which the replay starts (the forecaster's time features)

    @property
    def replayed_minutes(self) -> int:
        return self.config.warmup_minutes + self.config.minutes

    @property
    def duration_s(self) -> float:
        return self.replayed_minutes * self.config.seconds_per_minute

    @property
    def measured_from_s(self) -> float:
        """Replay time at which the measured minutes begin (the warm-up's end; 0 without one)."""
        return self.config.warmup_minutes * self.config.seconds_per_minute

    @property
    def measured_requests(self) -> list[TraceRequest]:
        """The requests every figure counts: those arriving after the warm-up (all without one)."""
        return [r for r in self.requests if r.arrival_s >= self.measured_from_s]

    def per_minute_counts(self) -> np.ndarray:
        """[adapters, replayed minutes] counted back from the requests (equals `counts`)."""
        index = {name: i for i, name in enumerate(self.ranks)}
        out = np.zeros((len(self.ranks), self.replayed_minutes), np.int64)
        for r in self.requests:
            out[index[r.adapter], r.minute] += 1
        return out

    def arrivals(self) -> list[tuple[float, str]]:
        return [(r.arrival_s, r.adapter) for r in self.requests]

    def write(self, path: str | Path) -> None:
        payload = {
            "config": asdict(self.config),
            "ranks": self.ranks,
            "counts": self.counts.tolist(),
            "first_minute": self.first_minute,
            "requests": [[r.arrival_s, r.adapter, r.prompt_tokens, r.output_tokens, r.minute] for r in self.requests],
        }
        Path(path).write_text(json.dumps(payload))

    @classmethod
    def read(cls, path: str | Path) -> Workload:
        try:
            payload = json.loads(Path(path).read_text())
            config = payload["config"]
            config = WorkloadConfig(**{**config, "ranks": tuple(config["ranks"])})
            requests = [TraceRequest(float(t), str(a), int(p), int(o), int(m)) for t, a, p, o, m in payload["requests"]]
            return cls(
                config,
                dict(payload["ranks"]),
                requests,
                np.asarray(payload["counts"], np.int64),
                int(payload.get("first_minute", 0)),
            )
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a workload file ({type(e).__name__}: {e})") from None


def read_token_lengths(path: str | Path) -> np.ndarray:
    """[requests, 2] (prompt, output) token counts of an Azure LLM inference trace."""
    path = Path(path)
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            missing = {"ContextTokens", "GeneratedTokens"} - set(reader.fieldnames or ())
            if missing:
                raise TraceError(f"{path}: missing column(s) {sorted(missing)}")
            rows = []
            for i, row in enumerate(reader, start=2):
                try:
                    prompt, output = int(row["ContextTokens"]), int(row["GeneratedTokens"])
                except (TypeError, ValueError):
                    raise TraceError(f"{path}: row {i}: token counts must be integers") from None
                if prompt < 1 or output < 1:
                    raise TraceError(f"{path}: row {i}: token counts must be >= 1, got {prompt}, {output}")
                rows.append((prompt, output))
    except OSError as e:
        raise TraceError(f"{path}: cannot read ({e})") from None
    if not rows:
        raise TraceError(f"{path}: no requests")
    return np.asarray(rows, np.int64)


def select_functions(trace: Trace, config: WorkloadConfig) -> Trace:
    """The trace's rows for the workload's adapters, cut to its minutes (warm-up included)."""
    end = config.start_minute + config.minutes
    if end > trace.num_intervals:
        raise TraceError(
            f"{trace.path}: minutes [{config.start_minute}, {end}) are past its {trace.num_intervals} minutes"
        )
    begin = config.start_minute - config.warmup_minutes
    if config.popularity:
        trace = sample_popularity(trace, config.adapters, seed=config.seed)
    elif config.adapters > trace.num_functions:
        raise TraceError(f"{trace.path}: {config.adapters} adapters asked, it has {trace.num_functions} functions")
    else:
        trace = trace.select(np.arange(config.adapters))
    return trace.time_slice(begin, end)


def generate(config: WorkloadConfig) -> Workload:
    rng = np.random.default_rng(config.seed)
    warm_rng = np.random.default_rng([config.seed, 1])  # the warm-up's own: the measured draws never change
    trace = select_functions(read_trace(config.trace), config)
    lengths = read_token_lengths(config.llm_trace)
    names = [f"fn{i:04d}-{fid[:8]}" for i, fid in enumerate(trace.function_ids)]
    ranks = {name: int(rng.choice(config.ranks)) for name in names}
    spm, warmup = config.seconds_per_minute, config.warmup_minutes
    times, adapters, minutes, measured = [], [], [], []
    for i, name in enumerate(names):
        for minute in np.nonzero(trace.counts[i])[0]:
            c, gen = int(trace.counts[i, minute]), (rng if minute >= warmup else warm_rng)
            offsets = gen.random(c) if config.arrivals == "poisson" else (np.arange(c) + 0.5) / c
            times.append((minute + offsets) * spm)
            adapters += [name] * c
            minutes += [int(minute)] * c
            measured += [minute >= warmup] * c
    times = np.concatenate(times) if times else np.zeros((0,))
    measured = np.asarray(measured, bool)
    picks = np.zeros((len(times), 2), np.int64)
    picks[measured] = lengths[rng.integers(len(lengths), size=int(measured.sum()))]
    picks[~measured] = lengths[warm_rng.integers(len(lengths), size=int((~measured).sum()))]
    prompt = np.maximum(1, np.round(picks[:, 0] * config.token_scale)).astype(np.int64)
    output = np.maximum(1, np.round(picks[:, 1] * config.token_scale)).astype(np.int64)
    if config.max_prompt_tokens:
        prompt = np.minimum(prompt, config.max_prompt_tokens)
    if config.max_output_tokens:
        output = np.minimum(output, config.max_output_tokens)
    order = np.argsort(times, kind="stable")
    requests = [TraceRequest(float(times[j]), adapters[j], int(prompt[j]), int(output[j]), minutes[j]) for j in order]
    return Workload(config, ranks, requests, trace.counts.astype(np.int64), trace.first_minute)


def synthetic(
    adapters: int,
    rate_rps: float,
    duration_s: float,
    alpha: float = 1.0,
    cv: float = 1.0,
    lengths: tuple[int, int] = (8, 512),
    ranks: tuple[int, ...] = (64, 32, 16, 8),
    seed: int = 0,
) -> Workload:
    """S-LoRA's synthetic workload (Sheng et al., 2023, section 7.1): adapter i drawn with
    probability proportional to (i + 1)^-alpha (a power law), arrivals a gamma process of
    `rate_rps` with coefficient of variation `cv`, input and output lengths uniform in
    `lengths` (inclusive), ranks drawn uniformly from `ranks`. One "trace minute" is 60 s."""
    if adapters < 1 or rate_rps <= 0 or duration_s <= 0 or cv <= 0:
        raise ValueError("synthetic: adapters >= 1, and rate_rps, duration_s, cv > 0")
    rng = np.random.default_rng(seed)
    names = [f"lora{i:04d}" for i in range(adapters)]
    weights = (np.arange(adapters) + 1.0) ** -alpha
    shape = 1.0 / cv**2  # gamma inter-arrivals with mean 1/rate and the asked CV
    times, t = [], 0.0
    while True:
        t += rng.gamma(shape, 1.0 / (shape * rate_rps))
        if t >= duration_s:
            break
        times.append(t)
    picks = rng.choice(adapters, size=len(times), p=weights / weights.sum())
    lo, hi = lengths
    prompt, output = rng.integers(lo, hi + 1, size=(2, len(times)))
    minutes = max(1, math.ceil(duration_s / 60.0))
    requests = [
        TraceRequest(float(t), names[a], int(p), int(o), int(t // 60.0))
        for t, a, p, o in zip(times, picks, prompt, output, strict=True)
    ]
    counts = np.zeros((adapters, minutes), np.int64)
    for r in requests:
        counts[int(r.adapter[4:]), r.minute] += 1
    config = WorkloadConfig(
        trace="synthetic", llm_trace="synthetic", adapters=adapters, minutes=minutes, ranks=ranks, seed=seed
    )
    return Workload(config, {n: int(rng.choice(ranks)) for n in names}, requests, counts)


def request_lengths(trace: TraceRequest, max_model_len: int) -> tuple[int, int]:
    """(prompt tokens, max_tokens) of the request a replay submits for `trace`, within the
    context: the trace's lengths, the prompt cut to leave room for one token. Live and simulated
    replays submit the same."""
    prompt = min(trace.prompt_tokens, max_model_len - 2)
    return prompt, max(1, min(trace.output_tokens, max_model_len - prompt - 1))


def workload_policy(
    name: str,
    workload: Workload,
    interval_s: float,
    clock,
    predictor_checkpoint: str = "",
    retention_intervals: float = RETENTION_INTERVALS,
):
    """`policies.replay_policy` for `workload`: one policy interval per trace minute, the
    forecaster's time of day following the trace clock (`clock()`: seconds since the start)."""
    from ..policies import replay_policy

    spm = workload.config.seconds_per_minute
    minute = lambda: workload.first_minute + clock() / spm
    return replay_policy(name, interval_s, workload.arrivals(), minute, predictor_checkpoint, retention_intervals)
