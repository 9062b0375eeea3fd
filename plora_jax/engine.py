"""Engine: the public Python API over one model and its paged KV cache.

    engine = Engine.from_pretrained("llama")          # or a .gguf path / HF folder
    engine.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0))
    engine.logits(engine.tokenizer.encode("Hello"))   # [tokens, vocab] float32

Device state (parameters, `KVCache`) is touched only through two jitted functions created once
in `__init__`, both donating the cache: `_step_jit` (forward + sampling, one token per row) and
`_logits_jit` (forward, logits of every token). Every input shape they see is a bucket: prompt
chunks are padded to a power-of-two token count up to `max_num_batched_tokens`, decode batches
to a power-of-two row count up to `max_num_seqs`, block tables to a power-of-two width. A long
prompt is prefilled chunk by chunk, each chunk attending to the ones before it through the cache.

Generation here is a synchronous loop on the caller's thread: admit waiting requests while KV
blocks last (a request reserves the blocks for prompt + max_tokens up front), prefill each new
one, then decode all running rows in one batch per step. Calls are serialised by a lock.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from .buckets import cdiv, pick_bucket, pow2_buckets
from .config import EngineConfig, ModelConfig
from .kv_blocks import BlockAllocator
from .models.llama import Llama
from .models.loader import LoadedModel, load_model
from .sampling import SamplingParams, sample_tokens
from .state import AttentionMetadata, KVCache
from .tokenizer import Tokenizer

# Smallest block-table width: attention over a few padded blocks costs less than an extra
# compiled variant per small width.
_MIN_TABLE_TOKENS = 256


def resolve_dtype(name: str):
    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return jnp.dtype(name)


@dataclass
class RequestOutput:
    """The result of one prompt."""

    index: int  # position of the prompt in the generate() call
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated ids, including a final EOS / stop id
    text: str  # generated text, special tokens removed
    finish_reason: str  # "stop" (EOS or a stop token) | "length" (max_tokens or the context limit)


@dataclass
class _Sequence:
    """Host state of one request while it runs."""

    index: int
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    stop_ids: frozenset[int]
    max_total: int  # prompt + generated tokens allowed
    blocks: list[int] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


class Engine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel):
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
        bs = config.block_size
        self.max_blocks_per_seq = cdiv(self.max_model_len, bs)
        if self.max_blocks_per_seq > config.num_kv_blocks - 1:
            raise ValueError(
                f"num_kv_blocks={config.num_kv_blocks} cannot hold one sequence of max_model_len="
                f"{self.max_model_len} ({self.max_blocks_per_seq} blocks of {bs}); raise num_kv_blocks"
            )
        chunk = min(config.max_num_batched_tokens, self.max_model_len)
        self.prefill_buckets = pow2_buckets(min(config.min_prefill_bucket, chunk), chunk)
        self.batch_buckets = pow2_buckets(1, config.max_num_seqs)
        self.width_buckets = pow2_buckets(
            min(cdiv(_MIN_TABLE_TOKENS, bs), self.max_blocks_per_seq), self.max_blocks_per_seq
        )

        self._model = Llama(self.model_config, self.dtype)
        self._params = jax.device_put(loaded.params)
        self._kv = KVCache.zeros(self.model_config, config.num_kv_blocks, bs, self.dtype)
        self._blocks = BlockAllocator(config.num_kv_blocks)
        self._seed_rng = np.random.default_rng(config.seed)
        self._lock = threading.Lock()
        self._step_jit = jax.jit(self._step, donate_argnames=("kv",))
        self._logits_jit = jax.jit(self._all_logits, donate_argnames=("kv",))

    # --- construction -------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model: str = "llama", **overrides) -> Engine:
        """Load `model` ("llama", a .gguf file or a Hugging Face folder); overrides set EngineConfig fields."""
        names = {f.name for f in dataclasses.fields(EngineConfig)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(f"unknown engine option(s) {unknown}; valid: {sorted(names)}")
        config = EngineConfig(model=str(model), **overrides)
        loaded = load_model(config.model, resolve_dtype(config.dtype), config.cache_dir, config.param_cache)
        return cls(config, loaded)

    @classmethod
    def from_params(
        cls, model_config: ModelConfig, params: dict, tokenizer: Tokenizer | None = None, **overrides
    ) -> Engine:
        """An engine over given parameters (random weights for tests and real-size benchmarks).

        Without a tokenizer, prompts must be token ids and outputs carry no text.
        """
        config = EngineConfig(model=model_config.name, **overrides)
        return cls(config, LoadedModel(model_config, params, tokenizer, Path(model_config.name), False, 0.0))

    # --- jitted device functions (defined once, donate the cache) -----------------------
    def _step(self, params, kv, tokens, meta, logits_indices, temperature, top_k, top_p, seeds, steps):
        logits, kv = self._model.apply({"params": params}, tokens, kv, meta, logits_indices)
        return sample_tokens(logits, temperature, top_k, top_p, seeds, steps), kv

    def _all_logits(self, params, kv, tokens, meta):
        return self._model.apply({"params": params}, tokens, kv, meta)

    # --- host helpers -------------------------------------------------------------------
    def _layout(self, rows: list[tuple[list[int], int, list[int]]], num_rows: int, num_tokens: int):
        """Padded step inputs for rows of (token ids, first position, KV blocks)."""
        bs = self.config.block_size
        ctx = max(start + len(ids) for ids, start, _ in rows)
        width = pick_bucket(cdiv(ctx, bs), self.width_buckets)
        tokens = np.zeros((num_rows, num_tokens), np.int32)
        positions = np.zeros((num_rows, num_tokens), np.int32)
        slots = np.zeros((num_rows, num_tokens), np.int32)  # padding writes into reserved block 0
        tables = np.zeros((num_rows, width), np.int32)
        context_lens = np.zeros((num_rows,), np.int32)
        last = np.zeros((num_rows,), np.int32)
        for r, (ids, start, blocks) in enumerate(rows):
            n = len(ids)
            pos = np.arange(start, start + n)
            tokens[r, :n] = ids
            positions[r, :n] = pos
            slots[r, :n] = np.asarray(blocks)[pos // bs] * bs + pos % bs
            used = cdiv(start + n, bs)
            tables[r, :used] = blocks[:used]
            context_lens[r] = start + n
            last[r] = n - 1
        meta = AttentionMetadata(
            jnp.asarray(positions), jnp.asarray(slots), jnp.asarray(tables), jnp.asarray(context_lens)
        )
        return jnp.asarray(tokens), meta, jnp.asarray(last)

    def _sample(self, seqs: list[_Sequence], rows, num_rows: int, num_tokens: int) -> np.ndarray:
        tokens, meta, last = self._layout(rows, num_rows, num_tokens)
        pad = num_rows - len(seqs)
        temperature = np.array([s.params.temperature for s in seqs] + [0.0] * pad, np.float32)
        top_k = np.array([s.params.top_k for s in seqs] + [0] * pad, np.int32)
        top_p = np.array([s.params.top_p for s in seqs] + [1.0] * pad, np.float32)
        seeds = np.array([s.seed for s in seqs] + [0] * pad, np.uint32)
        steps = np.array([len(s.output_ids) for s in seqs] + [0] * pad, np.int32)
        next_ids, self._kv = self._step_jit(
            self._params, self._kv, tokens, meta, last, temperature, top_k, top_p, seeds, steps
        )
        return np.asarray(next_ids)[: len(seqs)]

    def _prefill(self, seq: _Sequence) -> None:
        chunk = self.prefill_buckets[-1]
        prompt = seq.prompt_ids
        for start in range(0, len(prompt), chunk):
            ids = prompt[start : start + chunk]
            next_id = self._sample([seq], [(ids, start, seq.blocks)], 1, pick_bucket(len(ids), self.prefill_buckets))
        self._append(seq, int(next_id[0]))

    def _decode(self, running: list[_Sequence]) -> None:
        rows = [([s.output_ids[-1]], s.num_tokens - 1, s.blocks) for s in running]
        next_ids = self._sample(running, rows, pick_bucket(len(running), self.batch_buckets), 1)
        for seq, token in zip(running, next_ids, strict=True):
            self._append(seq, int(token))

    def _append(self, seq: _Sequence, token: int) -> None:
        seq.output_ids.append(token)
        if token in seq.stop_ids:
            seq.finish_reason = "stop"
        elif len(seq.output_ids) >= seq.params.max_tokens or seq.num_tokens >= seq.max_total:
            seq.finish_reason = "length"

    # --- validation ---------------------------------------------------------------------
    def _prompt_ids(self, prompt, i: int) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"prompts[{i}]: this engine has no tokenizer; pass token ids")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = self._token_ids(prompt, f"prompts[{i}]")
        if not ids:
            raise ValueError(f"prompts[{i}] is empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompts[{i}] has {len(ids)} tokens, leaving no room to generate (max_model_len={self.max_model_len})"
            )
        return ids

    def _token_ids(self, ids, name: str) -> list[int]:
        try:
            ids = [int(t) for t in ids]
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a string or a list of token ids") from None
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"{name} holds token ids outside [0, {vocab}): {bad[:5]}")
        return ids

    def _check_adapter(self, adapter, name: str) -> None:
        if adapter is not None:
            raise ValueError(f"{name}={adapter!r}: no adapter with this name is loaded")

    # --- public API ---------------------------------------------------------------------
    def logits(self, token_ids: Sequence[int], adapter: str | None = None) -> np.ndarray:
        """Logits [len(token_ids), vocab] (float32) of every position, as a causal LM scores them."""
        self._check_adapter(adapter, "adapter")
        ids = self._token_ids(token_ids, "token_ids")
        if not ids:
            raise ValueError("token_ids is empty")
        if len(ids) > self.max_model_len:
            raise ValueError(f"token_ids has {len(ids)} tokens, more than max_model_len={self.max_model_len}")
        chunk = self.prefill_buckets[-1]
        out = []
        with self._lock:
            blocks = self._blocks.allocate(cdiv(len(ids), self.config.block_size))
            try:
                for start in range(0, len(ids), chunk):
                    part = ids[start : start + chunk]
                    tokens, meta, _ = self._layout(
                        [(part, start, blocks)], 1, pick_bucket(len(part), self.prefill_buckets)
                    )
                    logits, self._kv = self._logits_jit(self._params, self._kv, tokens, meta)
                    out.append(np.asarray(logits[0, : len(part)]))
            finally:
                self._blocks.free(blocks)
        return np.concatenate(out)

    def generate(
        self,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        adapters: Sequence[str | None] | None = None,
        progress: bool = False,
    ) -> list[RequestOutput]:
        """Generate a continuation for every prompt (text or token ids); results in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            raise ValueError("prompts must be a list of prompts (wrap a single prompt in a list)")
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"sampling_params has {len(sampling_params)} entries for {len(prompts)} prompts")
        for i, a in enumerate(adapters or []):
            self._check_adapter(a, f"adapters[{i}]")
        eos = frozenset(self.tokenizer.eos_token_ids if self.tokenizer else ())
        seqs = []
        for i, (prompt, sp) in enumerate(zip(prompts, sampling_params, strict=True)):
            if not isinstance(sp, SamplingParams):
                raise ValueError(f"sampling_params[{i}] must be a SamplingParams")
            ids = self._prompt_ids(prompt, i)
            seed = sp.seed if sp.seed is not None else int(self._seed_rng.integers(2**32))
            stop_ids = frozenset(sp.stop_token_ids) | (frozenset() if sp.ignore_eos else eos)
            max_total = min(len(ids) + sp.max_tokens, self.max_model_len)
            seqs.append(_Sequence(i, ids, sp, seed, stop_ids, max_total))
        with self._lock:
            self._run(seqs, progress)
        return [self._output(s) for s in seqs]

    def _run(self, seqs: list[_Sequence], progress: bool) -> None:
        from tqdm.auto import tqdm

        waiting, running = deque(seqs), []
        bar = tqdm(total=len(seqs), disable=not progress, desc="generate")
        try:
            while waiting or running:
                while waiting and len(running) < self.config.max_num_seqs:
                    need = cdiv(waiting[0].max_total, self.config.block_size)
                    if need > self._blocks.num_free:
                        break  # running ones free blocks as they finish
                    seq = waiting.popleft()
                    seq.blocks = self._blocks.allocate(need)
                    running.append(seq)
                    self._prefill(seq)
                if running:
                    active = [s for s in running if s.finish_reason is None]
                    if active:
                        self._decode(active)
                for seq in [s for s in running if s.finish_reason is not None]:
                    running.remove(seq)
                    self._blocks.free(seq.blocks)
                    seq.blocks = []
                    bar.update(1)
        finally:
            for seq in running:  # an exception mid-run must not leak blocks
                self._blocks.free(seq.blocks)
            bar.close()

    def _output(self, seq: _Sequence) -> RequestOutput:
        text = self.tokenizer.decode(seq.output_ids) if self.tokenizer else ""
        return RequestOutput(seq.index, seq.prompt_ids, seq.output_ids, text, seq.finish_reason)
