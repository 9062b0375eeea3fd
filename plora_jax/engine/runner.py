"""ModelRunner: the parameters, the device state and the compiled steps of one engine.

The runner turns the scheduler's rows into step inputs (numpy, padded to the compile plan's
buckets) and dispatches them; it never decides what runs. It owns `EngineState` (the paged KV
cache, the per-slot token buffer and the adapter pool) and is called only from the thread that
owns the engine (the loop thread, or the caller of `EngineCore.step()` when no loop runs).

Steps (each one jitted function, defined once, donating what it updates):

- `decode`: one token per row. The row's input token is read from the device buffer
  `last_tokens[seq_slot]`, so a decode never waits for the host to see the previous token; the
  sampler runs in the same executable and writes the new token back to that buffer (and counts
  it in the penalty tables).
- `prefill`: the packed chunks of up to `max_prefill_seqs` requests in one row of tokens; the
  last token of every segment whose chunk ends its prompt is sampled and written back. A
  request's first chunk clears its slot's penalty tables; every chunk's tokens are entered
  there (prompt tokens as seen, the tokens a preempted request had generated as counts), so
  the tables follow recompute without the host sending them.
- `score`: logits of every token of packed chunks (`Engine.logits`); `score_logprobs` reduces
  them on the device to each token's log-probability and top alternatives (a prompt's `echo`),
  so only `[tokens, 20]` arrays reach the host, never `[tokens, vocab]` logits.
- `commit`: an adapter's staged pages into the pool (called by the adapter manager).

Attention metadata: positions, the flat KV slot of every token, and block tables at their full
width (`max_blocks`), so no executable depends on a context length. Dispatch is asynchronous:
`decode` and `prefill` return `Launched` with results still on the device (copies to host
already started); the caller reads them one step later.

Benchmarks time steps through these public methods (`decode`, `prefill`, `matmul_step`).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ..config import EngineConfig, ModelConfig
from ..lora.device_pool import LoraBatch, LoraPool, commit_adapter
from ..models.llama import Llama, layer_params
from ..pallas.attention import cpu as cpu_attention
from ..pallas.attention import ops as attention
from ..pallas.lora import ops as lora_ops
from ..shared_cache import shared_cache
from .compile_plan import Buckets, CompilePlan, ExecutableCache, Spec, fingerprint
from .sampling import (
    PADDING_ROW,
    SAMPLING_ROW,
    Logprobs,
    PenaltyTables,
    SamplingInputs,
    logprobs_of,
    penalised_logits,
    sample,
    sampling_row,
)
from .scheduler import DecodeRow, PrefillRow, Request
from .state import DecodeMetadata, EngineState, KVCache, PrefillMetadata, device_zeros

log = logging.getLogger(__name__)

_I32, _F32, _U32 = jnp.int32, jnp.float32, jnp.uint32


def resolve_dtype(name: str):
    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return jnp.dtype(name)


@dataclass
class Launched:
    """A dispatched step: per sampled row its request (None: nothing sampled), results on device."""

    requests: list[Request | None]
    tokens: jax.Array  # [padded_rows] i32
    logprobs: Logprobs  # [padded_rows] of each field


_STEP_DONATES = ("kv", "last_tokens", "penalties")


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class PrefillSlots:
    """Where each segment of a packed prefill belongs (padding segments: `max_num_seqs`, out of range)."""

    seq_slots: jax.Array  # [max_segments] i32, the segment's request's seq_slot
    write_slots: jax.Array  # [max_segments] i32, the same where the chunk ends its prefill (a token is sampled)
    prompt_lens: jax.Array  # [max_segments] i32, the request's prompt length (later positions: generated tokens)


@dataclass(frozen=True)
class Segment:
    """One request's chunk in a packed prefill or scoring step."""

    token_ids: list[int]
    start: int  # position of the first token
    blocks: list[int]  # the request's KV blocks (covering start + len(token_ids))
    adapter_slot: int = 0


def _abstract(tree):
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)), tree)


class ModelRunner:
    def __init__(
        self,
        model_config: ModelConfig,
        params: dict,
        config: EngineConfig,
        max_model_len: int,
        lora_pool: LoraPool | None = None,
        max_lora_pages: int = 0,
        cache_root: Path | None = None,
    ):
        self.config = config
        self.model_config = model_config
        self.dtype = resolve_dtype(config.dtype)
        self.max_model_len = max_model_len
        self.block_size = config.block_size
        cfg = model_config
        shared = shared_cache(config)  # one for the kernel and the executables
        if jax.default_backend() == "cpu" and config.attention_implementation in ("auto", "cpu") and cache_root:
            cpu_attention.ensure(cache_root / "kernels", shared)
        self.attention_implementation = attention.resolve(
            config.attention_implementation,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            config.block_size,
            self.dtype,
        )
        self.lora_implementation = lora_ops.resolve(config.lora_implementation)
        self.model = Llama(cfg, self.dtype, self.lora_implementation, self.attention_implementation)
        self.params = jax.device_put(params)
        self.state = EngineState(
            kv=KVCache.zeros(
                cfg,
                config.num_kv_blocks,
                config.block_size,
                self.dtype,
                attention.k_transposed(self.attention_implementation),
            ),
            last_tokens=device_zeros((config.max_num_seqs,), _I32),
            penalties=PenaltyTables(
                device_zeros((config.max_num_seqs, cfg.vocab_size), _I32),
                device_zeros((config.max_num_seqs, cfg.vocab_size), jnp.bool_),
            ),
            lora=lora_pool,
        )
        self.buckets = Buckets.build(config, max_model_len, max_lora_pages if lora_pool is not None else 0)
        specs = {
            "decode": Spec(jax.jit(self._decode_step, donate_argnames=_STEP_DONATES), self._decode_args),
            "prefill": Spec(jax.jit(self._prefill_step, donate_argnames=_STEP_DONATES), self._prefill_args),
            "score": Spec(jax.jit(self._score_step, donate_argnames=("kv",)), self._score_args),
        }
        if lora_pool is not None:
            specs["commit"] = Spec(commit_adapter, self._commit_args)
        cache = None
        if config.compilation_cache and cache_root is not None:
            extra = {
                "attention": self.attention_implementation,
                "lora": self.lora_implementation,
                "dtype": jnp.dtype(self.dtype).name,
            }
            if self.attention_implementation == "cpu":
                extra["kernel"] = cpu_attention.kernel_key()
            cache = ExecutableCache(cache_root, fingerprint(cfg, extra), shared)
        self.plan = CompilePlan(self.buckets, specs, cache)
        self._logprobs_of = jax.jit(logprobs_of)  # on a score step's logits (compiled per size on first use)
        self._lazy = not config.warmup  # build executables on first use instead of at warm-up

    @property
    def lazy(self) -> bool:
        """Whether executables are built on first use (no warm-up) rather than picked from those ready."""
        return self._lazy

    # --- traced step functions --------------------------------------------------------------
    def _decode_step(self, params, kv, last_tokens, penalties, seq_slots, meta, lora, sampling):
        tokens = last_tokens.at[seq_slots].get(mode="clip")  # padding rows' out-of-range slots clip
        logits, kv = self.model.apply({"params": params}, tokens, kv, meta, None, lora)
        new, logprobs = sample(penalised_logits(logits, penalties, seq_slots, sampling), sampling)
        penalties = penalties.record(seq_slots, new)
        return kv, last_tokens.at[seq_slots].set(new, mode="drop"), penalties, new, logprobs

    def _prefill_step(self, params, kv, last_tokens, penalties, tokens, meta, lora, sampling, slots):
        # slots: a PrefillSlots; padding segments carry an out-of-range slot (writes dropped).
        drop = last_tokens.shape[0]
        segment = jnp.maximum(meta.segment_ids, 0)
        token_slots = jnp.where(meta.segment_ids >= 0, slots.seq_slots[segment], drop)
        first_chunk = jnp.where(meta.seq_starts == 0, slots.seq_slots, drop)
        is_prompt = meta.positions < slots.prompt_lens[segment]
        penalties = penalties.admit(first_chunk, tokens, token_slots, is_prompt)
        logits, kv = self.model.apply({"params": params}, tokens, kv, meta, meta.logits_indices, lora)
        new, logprobs = sample(penalised_logits(logits, penalties, slots.seq_slots, sampling), sampling)
        # Segments that sample nothing (padding, a chunk that does not end its prompt) write to
        # an out-of-range slot: dropped.
        penalties = penalties.record(slots.write_slots, new)
        return kv, last_tokens.at[slots.write_slots].set(new, mode="drop"), penalties, new, logprobs

    def _score_step(self, params, kv, tokens, meta, lora):
        logits, kv = self.model.apply({"params": params}, tokens, kv, meta, None, lora)
        return kv, logits

    # --- abstract arguments of each executable ----------------------------------------------
    def _lora_args(self, tokens: int, grouped: bool):
        if self.state.lora is None:
            return None
        groups = jax.ShapeDtypeStruct((self.buckets.max_segments,), _I32) if grouped else None
        return LoraBatch(_abstract(self.state.lora), jax.ShapeDtypeStruct((tokens,), _I32), groups)

    @staticmethod
    def _sampling_args(rows: int) -> SamplingInputs:
        s = lambda dtype: jax.ShapeDtypeStruct((rows,), dtype)
        return SamplingInputs(s(_F32), s(_I32), s(_F32), s(_U32), s(_I32), s(jnp.bool_), s(_F32), s(_F32), s(_F32))

    def _prefill_meta_args(self, tokens: int) -> PrefillMetadata:
        t = jax.ShapeDtypeStruct((tokens,), _I32)
        s = jax.ShapeDtypeStruct((self.buckets.max_segments,), _I32)
        tables = jax.ShapeDtypeStruct((self.buckets.max_segments, self.buckets.max_blocks), _I32)
        return PrefillMetadata(t, t, t, tables, s, s)

    def _decode_args(self, rows: int) -> tuple:
        r = jax.ShapeDtypeStruct((rows,), _I32)
        meta = DecodeMetadata(r, r, jax.ShapeDtypeStruct((rows, self.buckets.max_blocks), _I32), r)
        state = _abstract(self.state)
        lora = self._lora_args(rows, grouped=False)
        return (
            _abstract(self.params),
            state.kv,
            state.last_tokens,
            state.penalties,
            r,
            meta,
            lora,
            self._sampling_args(rows),
        )

    def _prefill_args(self, tokens: int) -> tuple:
        segments = self.buckets.max_segments
        state = _abstract(self.state)
        return (
            _abstract(self.params),
            state.kv,
            state.last_tokens,
            state.penalties,
            jax.ShapeDtypeStruct((tokens,), _I32),
            self._prefill_meta_args(tokens),
            self._lora_args(tokens, grouped=True),
            self._sampling_args(segments),
            PrefillSlots(*(jax.ShapeDtypeStruct((segments,), _I32),) * 3),
        )

    def _score_args(self, tokens: int) -> tuple:
        state = _abstract(self.state)
        t = jax.ShapeDtypeStruct((tokens,), _I32)
        return (_abstract(self.params), state.kv, t, self._prefill_meta_args(tokens), self._lora_args(tokens, True))

    def _commit_args(self, pages: int) -> tuple:
        pool = _abstract(self.state.lora)
        scalar = jax.ShapeDtypeStruct((), _I32)

        def staged(arrays: dict) -> dict:
            return {m: jax.ShapeDtypeStruct((a.shape[0], pages, *a.shape[2:]), a.dtype) for m, a in arrays.items()}

        table_row = jax.ShapeDtypeStruct((pool.page_table.shape[1],), _I32)
        return (pool, scalar, jax.ShapeDtypeStruct((pages,), _I32), table_row, scalar, staged(pool.a), staged(pool.b))

    # --- step inputs (numpy, padded) --------------------------------------------------------
    def _sampling(self, requests: list[Request], steps: list[int], rows: int) -> SamplingInputs:
        """The step's sampling inputs: each request's `SAMPLING_ROW`, built and checked when the
        request was made (`InputProcessor`), then padding rows."""
        table = np.empty((rows,), SAMPLING_ROW)
        table[:] = PADDING_ROW
        vocab = self.model_config.vocab_size
        for i, r in enumerate(requests):
            table[i] = r.sampling if r.sampling is not None else sampling_row(r.params, r.seed, vocab)
        column = lambda name: np.ascontiguousarray(table[name])
        return SamplingInputs(
            temperature=column("temperature"),
            top_k=column("top_k"),
            top_p=column("top_p"),
            seeds=column("seed"),
            steps=np.array(steps + [0] * (rows - len(requests)), np.int32),
            want_logprobs=column("logprobs"),
            frequency_penalty=column("frequency_penalty"),
            presence_penalty=column("presence_penalty"),
            repetition_penalty=column("repetition_penalty"),
        )

    def _packed(self, segments: list[Segment], size: int) -> tuple[np.ndarray, PrefillMetadata, LoraBatch | None]:
        bs, num_segments = self.block_size, self.buckets.max_segments
        tokens = np.zeros((size,), np.int32)
        positions = np.zeros((size,), np.int32)
        slots = np.zeros((size,), np.int32)  # padding tokens write into reserved block 0
        segment_ids = np.full((size,), -1, np.int32)
        tables = np.zeros((num_segments, self.buckets.max_blocks), np.int32)
        starts = np.zeros((num_segments,), np.int32)
        last = np.zeros((num_segments,), np.int32)
        token_slot = np.zeros((size,), np.int32)
        offset = 0
        for i, seg in enumerate(segments):
            n = len(seg.token_ids)
            span = slice(offset, offset + n)
            pos = np.arange(seg.start, seg.start + n)
            blocks = np.asarray(seg.blocks, np.int32)
            tokens[span] = seg.token_ids
            positions[span] = pos
            slots[span] = blocks[pos // bs] * bs + pos % bs
            segment_ids[span] = i
            tables[i, : len(blocks)] = blocks
            starts[i] = seg.start
            last[i] = offset + n - 1
            token_slot[span] = seg.adapter_slot
            offset += n
        meta = PrefillMetadata(positions, slots, segment_ids, tables, starts, last)
        lora = None
        if self.state.lora is not None:
            groups = np.zeros((num_segments,), np.int32)
            distinct = sorted({seg.adapter_slot for seg in segments if seg.adapter_slot})
            groups[: len(distinct)] = distinct
            lora = LoraBatch(self.state.lora, token_slot, groups)
        return tokens, meta, lora

    # --- dispatch ---------------------------------------------------------------------------
    def decode(self, rows: list[DecodeRow]) -> Launched:
        """Dispatch one decode step for `rows` (asynchronous)."""
        size, step = self.plan.pick("decode", len(rows), self._lazy)
        bs, drop = self.block_size, self.config.max_num_seqs
        seq_slots = np.full((size,), drop, np.int32)  # padding: out of range (clipped read, dropped write)
        positions = np.zeros((size,), np.int32)
        slots = np.zeros((size,), np.int32)
        tables = np.zeros((size, self.buckets.max_blocks), np.int32)
        context_lens = np.zeros((size,), np.int32)
        adapter_slots = np.zeros((size,), np.int32)
        for r, row in enumerate(rows):
            req = row.request
            seq_slots[r] = req.seq_slot
            positions[r] = row.position
            slots[r] = req.blocks[row.position // bs] * bs + row.position % bs
            tables[r, : len(req.blocks)] = req.blocks
            context_lens[r] = row.position + 1
            adapter_slots[r] = req.adapter_slot
        meta = DecodeMetadata(positions, slots, tables, context_lens)
        lora = LoraBatch(self.state.lora, adapter_slots) if self.state.lora is not None else None
        requests = [row.request for row in rows]
        sampling = self._sampling(requests, [row.step for row in rows], size)
        state = self.state
        kv, last, penalties, new, logprobs = step(
            self.params, state.kv, state.last_tokens, state.penalties, seq_slots, meta, lora, sampling
        )
        self.state = dataclasses.replace(state, kv=kv, last_tokens=last, penalties=penalties)
        return self._launched(requests, new, logprobs)

    def prefill(self, rows: list[PrefillRow]) -> Launched:
        """Dispatch one packed prefill step for `rows` (asynchronous)."""
        total = sum(len(row.token_ids) for row in rows)
        size, step = self.plan.pick("prefill", total, self._lazy)
        segments = [Segment(row.token_ids, row.start, row.request.blocks, row.request.adapter_slot) for row in rows]
        tokens, meta, lora = self._packed(segments, size)
        width, drop = self.buckets.max_segments, self.config.max_num_seqs
        full = lambda: np.full((width,), drop, np.int32)
        slots = PrefillSlots(full(), full(), np.zeros(width, np.int32))
        for i, row in enumerate(rows):
            slots.seq_slots[i] = row.request.seq_slot
            slots.prompt_lens[i] = len(row.request.prompt_ids)
            if row.final:
                slots.write_slots[i] = row.request.seq_slot
        sampling = self._sampling([row.request for row in rows], [row.step for row in rows], width)
        state = self.state
        kv, last, penalties, new, logprobs = step(
            self.params, state.kv, state.last_tokens, state.penalties, tokens, meta, lora, sampling, slots
        )
        self.state = dataclasses.replace(state, kv=kv, last_tokens=last, penalties=penalties)
        return self._launched([row.request if row.final else None for row in rows], new, logprobs)

    @staticmethod
    def _launched(requests, new, logprobs: Logprobs) -> Launched:
        for array in (new, *jax.tree.leaves(logprobs)):
            array.copy_to_host_async()
        return Launched(requests, new, logprobs)

    def score(self, segments: list[Segment]) -> list[np.ndarray]:
        """Logits [len(token_ids), vocab] of every segment's tokens (synchronous). The segments
        follow the packing rule of prefill (only the first may have start > 0)."""
        total = sum(len(seg.token_ids) for seg in segments)
        size, step = self.plan.pick("score", total, lazy=True)
        tokens, meta, lora = self._packed(segments, size)
        kv, logits = step(self.params, self.state.kv, tokens, meta, lora)
        self.state = dataclasses.replace(self.state, kv=kv)
        logits = np.asarray(logits)
        out, offset = [], 0
        for seg in segments:
            out.append(logits[offset : offset + len(seg.token_ids)])
            offset += len(seg.token_ids)
        return out

    def score_logprobs(self, segments: list[Segment], targets: list[list[int]], temperature: float) -> list[Logprobs]:
        """Per segment, the log-probability of `targets` (one token per segment token: the
        token that follows it) and the likeliest alternatives, under the logits / `temperature`
        (0: the model's own), as numpy `Logprobs` (synchronous)."""
        total = sum(len(seg.token_ids) for seg in segments)
        size, step = self.plan.pick("score", total, lazy=True)
        tokens, meta, lora = self._packed(segments, size)
        kv, logits = step(self.params, self.state.kv, tokens, meta, lora)
        self.state = dataclasses.replace(self.state, kv=kv)
        flat = np.zeros((size,), np.int32)
        flat[:total] = np.concatenate([np.asarray(t, np.int32) for t in targets])
        reduced = jax.tree.map(np.asarray, self._logprobs_of(logits, flat, np.full((size,), temperature, np.float32)))
        out, offset = [], 0
        for seg in segments:
            span = slice(offset, offset + len(seg.token_ids))
            out.append(Logprobs(reduced.chosen[span], reduced.top_ids[span], reduced.top[span]))
            offset += len(seg.token_ids)
        return out

    # --- adapters ---------------------------------------------------------------------------
    def commit_size(self, num_pages: int) -> int:
        """The commit size an adapter of `num_pages` pages is staged at (a ready one)."""
        sizes = self.plan.ready_sizes("commit") if not self._lazy else self.buckets.commit
        # During warm-up none may be ready yet: then the largest, which the minimal set builds
        # first (`commit_adapter` waits for its build).
        return next((s for s in sizes if s >= num_pages), self.buckets.commit[-1])

    def commit_adapter(self, pool: LoraPool, *staged) -> LoraPool:
        """`lora.device_pool.commit_adapter` through the plan's executable for the staged size (one that
        `commit_size` chose: built already, or built now without warm-up)."""
        return self.plan.build("commit", int(np.shape(staged[1])[0]))(pool, *staged)

    # --- benchmarks -------------------------------------------------------------------------
    def matmul_step(self):
        """A jitted function running only the weight matmuls of a decode step (the projections,
        the MLP and the vocabulary head, in the model's feature-major layout; no attention, no
        sampling): the compute bound a benchmark sets a decode step beside. Call it as
        `fn(runner.params, x)` with x [hidden, rows]."""
        cfg = self.model_config

        def matmuls(params, x):
            for layer in layer_params(params, cfg):
                attn, mlp = layer["self_attn"], layer["mlp"]
                q = attn["q_proj"]["weight"] @ x
                k, v = attn["k_proj"]["weight"] @ x, attn["v_proj"]["weight"] @ x
                x = x + attn["o_proj"]["weight"] @ q + 0 * (k.sum() + v.sum())
                hidden = jax.nn.silu(mlp["gate_proj"]["weight"] @ x) * (mlp["up_proj"]["weight"] @ x)
                x = x + mlp["down_proj"]["weight"] @ hidden
            head = params["embed_tokens"]["embedding"] if cfg.tie_word_embeddings else params["lm_head"]["weight"]
            return head @ x

        return jax.jit(matmuls)
