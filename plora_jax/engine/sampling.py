"""Sampling parameters (host) and the vectorised sampler (device).

Every row of a batch carries its own temperature, top-k, top-p and seed as arrays, so one
compiled sampler serves any mix of requests. A row's random key is derived from its own seed
and its own step count (`fold_in(key(seed), step)`), never from a batch-wide key: a seeded
request draws the same tokens whatever else shares its batch. Rows with temperature 0 are
greedy; when the whole batch is greedy the sort needed for top-k/top-p is skipped at run time.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

MAX_TOP_LOGPROBS = 20  # the likeliest tokens a step reports per row (OpenAI's chat limit)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request (names as in vLLM)."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # nucleus mass, in (0, 1]
    top_k: int = -1  # -1 or 0 disables
    seed: int | None = None  # None: drawn by the engine
    stop: tuple[str, ...] = ()  # stop strings; the text is cut before them
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: bool = False  # return the log-probability of each generated token
    top_logprobs: int = 0  # and of this many likeliest tokens at each position (<= MAX_TOP_LOGPROBS)
    skip_special_tokens: bool = True

    def __post_init__(self):
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 (disabled) or >= 1, got {self.top_k!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**32):
            raise ValueError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")
        top = self.top_logprobs
        if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {top!r}")
        if top and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=True")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if not all(isinstance(x, str) and x for x in stop):
            raise ValueError(f"stop must be a string or a list of non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", stop)
        try:
            object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        except (TypeError, ValueError):
            raise ValueError(f"stop_token_ids must be a list of integers, got {self.stop_token_ids!r}") from None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class SamplingInputs:
    """Per-row sampling settings of one step (padding rows: temperature 0)."""

    temperature: jax.Array  # [batch] f32, 0 = greedy
    top_k: jax.Array  # [batch] i32, <= 0 disables
    top_p: jax.Array  # [batch] f32
    seeds: jax.Array  # [batch] u32
    steps: jax.Array  # [batch] i32, index of the token being sampled within its request
    want_logprobs: jax.Array  # [batch] bool, the row's request asked for log-probabilities


def _filtered_logits(logits, temperature, top_k, top_p):
    """Temperature-scaled logits with tokens outside top-k / top-p set to -inf."""
    vocab = logits.shape[-1]
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    sorted_desc = -jnp.sort(-scaled, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    ranks = jnp.arange(vocab)[None, :]
    sorted_desc = jnp.where(ranks < k[:, None], sorted_desc, -jnp.inf)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token is always kept).
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = (mass_before < top_p[:, None]) & (ranks < k[:, None])
    threshold = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1)
    return jnp.where(scaled >= threshold[:, None], scaled, -jnp.inf)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Logprobs:
    """Log-probabilities of one step, under the distribution each row's token was drawn from:
    the logits divided by the row's temperature (greedy rows: the model's own)."""

    chosen: jax.Array  # [batch] f32, of the sampled token
    top_ids: jax.Array  # [batch, MAX_TOP_LOGPROBS] i32, the likeliest tokens, most likely first
    top: jax.Array  # [batch, MAX_TOP_LOGPROBS] f32, their log-probabilities


def logprobs_of(logits: jax.Array, tokens: jax.Array, temperature: jax.Array) -> Logprobs:
    """`Logprobs` of `tokens` [batch] under `logits` [batch, vocab] / `temperature` [batch] (0: the
    model's own): log_softmax without the full array, scaled - logsumexp(scaled). The sampler's
    and the server's (a prompt's own tokens, for `echo`)."""
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    norm = jax.nn.logsumexp(scaled, axis=-1)
    chosen = jnp.take_along_axis(scaled, tokens[:, None], axis=-1)[:, 0] - norm
    top, top_ids = jax.lax.top_k(scaled, MAX_TOP_LOGPROBS)
    return Logprobs(chosen, top_ids.astype(jnp.int32), top - norm[:, None])


def sample(logits: jax.Array, inputs: SamplingInputs) -> tuple[jax.Array, Logprobs]:
    """Tokens [batch] i32 and their `Logprobs` (zeros when no row asked for them: the reductions
    over the vocabulary cost milliseconds per step on CPU)."""
    tokens = sample_tokens(logits, inputs.temperature, inputs.top_k, inputs.top_p, inputs.seeds, inputs.steps)
    batch = tokens.shape[0]

    def logprobs(_):
        return logprobs_of(logits, tokens, inputs.temperature)

    def zeros(_):
        empty = jnp.zeros((batch, MAX_TOP_LOGPROBS), jnp.float32)
        return Logprobs(jnp.zeros((batch,), jnp.float32), jnp.zeros((batch, MAX_TOP_LOGPROBS), jnp.int32), empty)

    return tokens, jax.lax.cond(jnp.any(inputs.want_logprobs), logprobs, zeros, None)


def sample_tokens(
    logits: jax.Array,  # [batch, vocab] f32
    temperature: jax.Array,  # [batch] f32, 0 = greedy
    top_k: jax.Array,  # [batch] i32, <= 0 disables
    top_p: jax.Array,  # [batch] f32
    seeds: jax.Array,  # [batch] u32
    steps: jax.Array,  # [batch] i32, index of the token being sampled within its request
) -> jax.Array:  # [batch] i32
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(_):
        filtered = _filtered_logits(logits, temperature, top_k, top_p)
        keys = jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s), t))(seeds, steps)
        drawn = jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)
        return jnp.where(temperature > 0, drawn, greedy)

    return jax.lax.cond(jnp.any(temperature > 0), draw, lambda _: greedy, None)
