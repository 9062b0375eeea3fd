"""Every executable the engine runs, in one place: the bucket tables, compile or load, readiness.

Counts are data, sizes are buckets. The plan holds four kinds of executable, each a table of
sizes (powers of two up to a capacity):

| kind      | size              | what                                                       |
| --------- | ----------------- | ---------------------------------------------------------- |
| `decode`  | rows              | one token per request, sampler included                    |
| `prefill` | tokens            | packed prompt chunks of up to `max_prefill_seqs` requests  |
| `commit`  | adapter pages     | an adapter's pages into the device pool (LoRA engines)     |
| `score`   | tokens            | logits of every token (`Engine.logits`); built on first use |

There is no context-length axis: block tables travel at full width and the attention's work
follows each row's length (see `plora_jax.pallas.attention`), so one executable per size serves
every context.

Warm-up compiles without running anything (`jit(f).trace(*abstract).lower().compile()`), and
every executable is written to an on-disk cache (`ExecutableCache`), so a restart deserializes
ready executables instead of tracing, lowering and compiling: 0 compiles. A cache entry that
does not load (corrupt, or made by another jax, CPU or configuration) is dropped with a warning
and recompiled, never fatal. Loading an executable runs code from its file, so the cache is
read only from a folder no other user can write, and a file only if the MAC written with it
matches (`plora_jax.trusted_cache`); otherwise the engine compiles, with a warning.

Readiness is progressive. `warm` first builds the minimal set, the smallest that can serve any
request (decode and commit at their largest size, so a smaller step pads up into them; one
mid-size prefill, to which longer prompts are chunked meanwhile), on two threads at once, and
sets `minimal_ready`; the other sizes follow one at a time, in the background. `pick(kind, n)`
returns the smallest *ready* size >= n; without warm-up (`warmup=False`) it builds the exact
size on first use instead.

Threads: the sizes ready are published as immutable tuples under a lock; each executable is
built once, under its own lock, by the warm-up threads (or, without warm-up, the loop thread).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pickle
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import jax

from ..buckets import cdiv, pick_bucket, pow2_buckets, step_buckets
from ..progress import Progress
from ..shared_cache import SharedCache
from ..trusted_cache import Sealer

log = logging.getLogger(__name__)

KINDS = ("decode", "prefill", "commit", "score")
# Above these sizes the tables grow linearly, not by doubling: a decode step of 40 rows runs in
# the 48-row executable, not the 64-row one (measured at 32 concurrent requests: pow2 tables
# spent about a third of decode rows on padding).
DECODE_STEP, PREFILL_STEP = 16, 128
MINIMAL_PREFILL = 64  # tokens of the prefill size built first (a chat prompt fits; longer ones are chunked)
WARM_KINDS = ("decode", "prefill", "commit")  # `score` is built on first use only


@dataclass(frozen=True)
class Buckets:
    """Every size a compiled step can have."""

    decode: tuple[int, ...]  # decode rows
    prefill: tuple[int, ...]  # tokens of a packed prefill (also the scoring sizes)
    max_segments: int  # requests packed into one prefill
    commit: tuple[int, ...]  # adapter pages of one commit (empty without LoRA)
    max_blocks: int  # block-table width, the same for every step

    @classmethod
    def build(cls, config, max_model_len: int, max_lora_pages: int) -> Buckets:
        # Not capped at max_model_len: a packed prefill holds chunks of several requests.
        chunk = config.max_num_batched_tokens
        return cls(
            decode=step_buckets(1, config.max_num_seqs, DECODE_STEP),
            prefill=step_buckets(min(config.min_prefill_bucket, chunk), chunk, PREFILL_STEP),
            max_segments=config.max_prefill_seqs,
            commit=pow2_buckets(1, max_lora_pages) if max_lora_pages else (),
            max_blocks=cdiv(max_model_len, config.block_size),
        )

    def sizes(self, kind: str) -> tuple[int, ...]:
        return {"decode": self.decode, "prefill": self.prefill, "commit": self.commit, "score": self.prefill}[kind]


@dataclass(frozen=True)
class Spec:
    """How to build one kind: the jitted function and its abstract arguments at a size."""

    fn: Callable  # a jax.jit-wrapped function (donation declared on it)
    abstract_args: Callable[[int], tuple]  # size -> pytree of ShapeDtypeStructs


def _digest(value: object) -> str:
    return hashlib.sha256(repr(value).encode()).hexdigest()[:16]


def source_digest() -> str:
    """Hash of the package's source (what gets traced) and kernels: code changes invalidate the cache."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.suffix in (".py", ".cc") and "__pycache__" not in path.parts:
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


class ExecutableCache:
    """Serialized executables in `<cache root>/executables/<fingerprint hash>/`, with a manifest
    of the fingerprint.

    Loading runs code from the file (jax's warning), so a file is unpickled only after its MAC
    matches, and only from a folder no other user can write (`trusted_cache.Sealer`); an
    untrusted folder is never read or written (warned once). Files are written to a temporary
    name and renamed, so a crash or a concurrent start never leaves a half-written entry.
    """

    def __init__(self, cache_root: Path, fingerprint: dict, shared: SharedCache | None = None):
        self.fingerprint, self.shared = fingerprint, shared
        self.key = _digest(sorted(fingerprint.items()))
        self.dir = Path(cache_root) / "executables" / self.key
        self.loaded = self.saved = self.rejected = self.pulled = 0
        self.sealer = Sealer(self.dir, Path(cache_root))
        if not self.sealer.usable:
            log.warning("executable cache not used: %s (compiling instead)", self.sealer.reason)
            return
        manifest = self.dir / "manifest.json"
        if manifest.is_file():
            try:
                stored = json.loads(manifest.read_text())
            except (OSError, ValueError):
                stored = None
            if stored != fingerprint:
                log.warning(
                    "executable cache %s was made for another configuration or environment; ignoring it", self.dir
                )
                self._clear()
        if shared is not None and self.sealer.usable and not any(self.dir.glob("*.xexe")):
            self._pull()

    def _pull(self) -> None:
        """A fresh node: the shared cache's executables for this fingerprint, verified there by
        size and sha256, sealed here with this node's MAC."""
        with tempfile.TemporaryDirectory(dir=self.dir) as tmp:
            names = self.shared.pull("executables", self.key, self.fingerprint, Path(tmp))
            for name in names or ():
                if name.endswith(".xexe") and "/" not in name:
                    self.sealer.write(self.dir / name, (Path(tmp) / name).read_bytes())
                    self.pulled += 1
        if self.pulled:
            _atomic_write(self.dir / "manifest.json", json.dumps(self.fingerprint, indent=1).encode())

    def publish(self) -> bool:
        """Offer this folder's executables to the shared cache (after a complete warm-up)."""
        if self.shared is None or not self.sealer.usable:
            return False
        names = sorted(p.name for p in self.dir.glob("*.xexe") if self.sealer.read(p)[0] is not None)
        return self.shared.publish("executables", self.key, self.fingerprint, self.dir, names)

    def _clear(self) -> None:
        for path in self.dir.glob("*"):
            path.unlink(missing_ok=True)

    def _path(self, name: str) -> Path:
        return self.dir / f"{name}.xexe"

    def load(self, name: str) -> jax.stages.Compiled | None:
        path = self._path(name)
        if not self.sealer.usable or not path.is_file():
            return None
        from jax.experimental import serialize_executable

        data, why = self.sealer.read(path)
        if data is None:
            log.warning("cached executable %s does not load (%s); compiling it again", path, why)
            self.rejected += 1
            path.unlink(missing_ok=True)
            return None
        try:
            payload, in_tree, out_tree = pickle.loads(data)  # its MAC matched: written by this cache
            compiled = serialize_executable.deserialize_and_load(payload, in_tree, out_tree)
        except Exception as e:  # corrupt, truncated, or from an incompatible runtime
            log.warning("cached executable %s does not load (%s: %s); compiling it again", path, type(e).__name__, e)
            self.rejected += 1
            path.unlink(missing_ok=True)
            return None
        self.loaded += 1
        return compiled

    def save(self, name: str, compiled: jax.stages.Compiled) -> None:
        if not self.sealer.usable:
            return
        from jax.experimental import serialize_executable

        try:
            payload = pickle.dumps(serialize_executable.serialize(compiled))
            manifest = self.dir / "manifest.json"
            if not manifest.is_file():
                _atomic_write(manifest, json.dumps(self.fingerprint, indent=1).encode())
            self.sealer.write(self._path(name), payload)
            self.saved += 1
        except Exception as e:  # a full disk or an executable jax cannot serialize: serve without caching
            log.warning("could not cache executable %s (%s)", name, e)


def _jax_cache_enabled() -> bool:
    """Whether jax's own persistent compilation cache is on. An executable jax read back from it
    re-serializes without its kernels on XLA:CPU (it then fails at run time with "Function ...
    not found"), so the plan does not cache executables while jax's cache is on."""
    enabled = bool(jax.config.jax_compilation_cache_dir) and jax.config.jax_enable_compilation_cache
    if enabled and not getattr(_jax_cache_enabled, "warned", False):
        _jax_cache_enabled.warned = True
        log.warning("jax's persistent compilation cache is on: the engine's executable cache is not written")
    return enabled


def _atomic_write(path: Path, data: bytes) -> None:
    partial = path.with_name(f"{path.name}.tmp{os.getpid()}.{threading.get_ident()}")
    partial.write_bytes(data)
    os.replace(partial, path)


@dataclass
class PlanStats:
    compiled: int = 0  # executables compiled by this plan
    compiled_by_thread: dict = dataclasses.field(default_factory=dict)  # thread id -> of those, compiled there
    loaded: int = 0  # executables read from the cache
    compile_s: float = 0.0
    load_s: float = 0.0


class CompilePlan:
    def __init__(self, buckets: Buckets, specs: dict[str, Spec], cache: ExecutableCache | None):
        self.buckets = buckets
        self.specs = specs
        self.cache = cache
        self.stats = PlanStats()
        self._compiled: dict[tuple[str, int], jax.stages.Compiled] = {}
        self._ready: dict[str, tuple[int, ...]] = {kind: () for kind in specs}
        self._lock = threading.Lock()  # guards the tables below; each build has its own lock
        self._building: dict[tuple[str, int], threading.Lock] = {}
        self.minimal_ready = threading.Event()  # the largest size of every warm kind is built
        self.complete = threading.Event()  # every warm size is built
        self.cancelled = threading.Event()  # set by close(): warm() stops after the current build
        self.failure: BaseException | None = None  # warm-up failed before the minimal set was built
        if not self.warm_order():
            self.minimal_ready.set()
            self.complete.set()

    # --- what is built --------------------------------------------------------------------
    def minimal_set(self) -> list[tuple[str, int]]:
        """The smallest set that serves any request: decode and commit at their largest size (a
        smaller step pads up into it) and one prefill size near `MINIMAL_PREFILL` tokens (a
        longer prompt is chunked to it until larger sizes are built: the scheduler's token
        budget follows the largest prefill size ready)."""
        kinds = [k for k in WARM_KINDS if k in self.specs and self.buckets.sizes(k)]
        out = []
        for kind in kinds:
            sizes = self.buckets.sizes(kind)
            if kind == "prefill":
                out.append((kind, next((s for s in sizes if s >= MINIMAL_PREFILL), sizes[-1])))
            else:
                out.append((kind, sizes[-1]))
        return out

    def warm_order(self) -> list[tuple[str, int]]:
        """The minimal set first, then the rest, small first."""
        first = self.minimal_set()
        kinds = [k for k, _ in first]
        rest = sorted(
            ((k, s) for k in kinds for s in self.buckets.sizes(k) if (k, s) not in first),
            key=lambda ks: (ks[1], WARM_KINDS.index(ks[0])),
        )
        return first + rest

    @property
    def num_executables(self) -> int:
        return len(self.warm_order())

    @property
    def num_ready(self) -> int:
        return sum(len(self._ready[k]) for k in WARM_KINDS if k in self._ready)

    def ready_sizes(self, kind: str) -> tuple[int, ...]:
        return self._ready[kind]

    def executable_name(self, kind: str, size: int) -> str:
        args = jax.tree_util.tree_map(lambda s: (s.shape, str(s.dtype)), self.specs[kind].abstract_args(size))
        return f"{kind}-{size}-{_digest(jax.tree_util.tree_structure(args))}{_digest(args)}"

    # --- building -------------------------------------------------------------------------
    def build(self, kind: str, size: int) -> jax.stages.Compiled:
        """Load `kind` at `size` from the cache, or compile (and cache) it; idempotent. Builds of
        different executables may run on several threads at once."""
        with self._lock:
            lock = self._building.setdefault((kind, size), threading.Lock())
        with lock:
            compiled = self._compiled.get((kind, size))
            if compiled is not None:
                return compiled
            name = self.executable_name(kind, size)
            start = time.perf_counter()
            compiled = self.cache.load(name) if self.cache is not None else None
            if compiled is not None:
                with self._lock:
                    self.stats.loaded += 1
                    self.stats.load_s += time.perf_counter() - start
            else:
                spec = self.specs[kind]
                compiled = spec.fn.trace(*spec.abstract_args(size)).lower().compile()
                with self._lock:
                    self.stats.compiled += 1
                    me = threading.get_ident()
                    self.stats.compiled_by_thread[me] = self.stats.compiled_by_thread.get(me, 0) + 1
                    self.stats.compile_s += time.perf_counter() - start
                if self.cache is not None and not _jax_cache_enabled():
                    self.cache.save(name, compiled)
            with self._lock:
                self._compiled[(kind, size)] = compiled
                self._ready[kind] = tuple(sorted({*self._ready[kind], size}))
            return compiled

    def warm(self, workers: int = 2) -> None:
        """Build every warm size: the minimal set on `workers` threads at once (XLA compiles and
        deserializes with the GIL released, so two cores finish it in about half the time), then
        `minimal_ready`, then the rest one at a time (serving has started and needs the cores),
        then `complete`."""
        minimal, order = self.minimal_set(), self.warm_order()
        with Progress(len(order), "plora warm-up (executables)") as bar:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="plora-compile") as pool:
                for kind, size in pool.map(lambda ks: (self.build(*ks), ks)[1], minimal):
                    bar.update(1, f"{kind}[{size}]")
            self.minimal_ready.set()
            for kind, size in order[len(minimal) :]:
                if self.cancelled.is_set():
                    return
                self.build(kind, size)
                bar.update(1, f"{kind}[{size}]")
        self.complete.set()
        log.info(
            "warm-up: %d executables (%d compiled in %.1fs, %d loaded from the cache in %.1fs)",
            len(order),
            self.stats.compiled,
            self.stats.compile_s,
            self.stats.loaded,
            self.stats.load_s,
        )
        if self.cache is not None and self.stats.compiled:  # every executable is here: offer them to other nodes
            self.cache.publish()

    def pick(self, kind: str, n: int, lazy: bool) -> tuple[int, jax.stages.Compiled]:
        """The smallest ready size >= n and its executable. With `lazy` (no warm-up), a missing
        size is built now on the calling thread."""
        ready = self._ready[kind]
        for size in ready:
            if size >= n:
                return size, self._compiled[(kind, size)]
        if not lazy:
            raise RuntimeError(f"no {kind} executable >= {n} is ready (the warm-up is not done)")
        size = pick_bucket(n, self.buckets.sizes(kind))
        return size, self.build(kind, size)

    def describe(self) -> dict:
        """The counters as a copy, taken under the lock: a build on another thread adds a key to
        `compiled_by_thread` (a reader copying it unlocked raised "dictionary changed size")."""
        with self._lock:
            stats = dataclasses.asdict(self.stats)
        pulled = self.cache.pulled if self.cache is not None else 0  # from the shared compile cache at start
        return {"executables": self.num_executables, "executables_ready": self.num_ready, "pulled": pulled, **stats}


def fingerprint(model_config, extra: dict) -> dict:
    """What every cached executable of an engine depends on, besides its argument shapes."""
    import jaxlib

    device = jax.devices()[0]
    env = {
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "platform": device.platform,
        "device_kind": device.device_kind,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "source": source_digest(),
        "model": model_config.to_json(),
    }
    if device.platform == "cpu":
        from ..pallas.attention.cpu import _cpu_id

        env["cpu"] = _digest(_cpu_id())
    return {**env, **{k: str(v) for k, v in extra.items()}}


__all__ = ["KINDS", "Buckets", "CompilePlan", "ExecutableCache", "Spec", "fingerprint"]
