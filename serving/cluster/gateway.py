"""Gateway: the cluster's ingress, the same OpenAI-compatible app as the single-engine server.

`serving.app.build_app` is written against an engine; `ClusterEngine` is that engine's
interface over the LoraEngine deployment, so both servers run one implementation of the API
(validation, errors, streaming, metrics). The gateway holds the model's config and tokenizer,
not its weights (`load_front_end`): it validates and tokenizes every request as the engine
would, answers bad input itself, and sends token ids to a replica through the deployment
handle, tagged with the adapter id (`multiplexed_model_id`) so the router can place it.

The adapter catalog lives here: names, folders and ranks, registered from `--adapter-dir` at
start and by `/v1/load_lora_adapter` at run time. An adapter found at start keeps its name as
its id; one loaded at run time gets a new, unique id (`name@<random hex>`), and a name may not
hold "@", so no id is ever given twice and a replica that still holds an old version's weights
never serves them for a new one. Replicas register an adapter the first time a request (or a
pre-load) brings it.

Health: `readiness` reflects the LoraEngine deployment as Serve's controller sees it (polled
every `health_s` off the event loop): "failed" while it is unhealthy or failed to deploy (its
replicas' `check_health` raises when their engine died or a step hangs, and Serve replaces
them), "ok" otherwise, scaled to zero included.

A stream that breaks (its replica died, or the engine failed the request) raises
`RequestFailed`, which the app turns into an error chunk: the client sees it, nothing hangs.
From its first request on, every `report_s` the gateway sends the forecaster its arrivals per
adapter and the service times of finished requests, and publishes the hot adapters it gets back
for the routers of its process.

The routers' process state (the hot set, and the routers themselves for `routing_view`) lives
here, not in `router.py`: Serve ships a custom router's module to each process by value, so
that module's globals are a private copy per unpickled class and nothing written to them from
outside would reach a router. This module is imported by name everywhere, so its state is one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
import weakref
from collections import Counter
from enum import Enum
from pathlib import Path

from plora_jax.config import EngineConfig
from plora_jax.engine.inputs import InputProcessor, InvalidInput
from plora_jax.engine.outputs import RequestFailed
from plora_jax.limits import MAX_ADAPTERS
from plora_jax.lora.peft import AdapterError, inspect_adapter, parse_target_modules
from plora_jax.lora.registry import adapter_subfolders, check_name
from plora_jax.models.loader import load_front_end

log = logging.getLogger(__name__)

_FRONTS = "LoraEngine deployment (autoscaled)"

# --- the routers' state in this process (see the module docstring) ---------------------------
_hot: frozenset[str] = frozenset()  # adapters the forecaster marks hot (replaced whole, never mutated)
_routers: weakref.WeakSet = weakref.WeakSet()  # the adapter-affinity routers of this process


def publish_hot(adapters: frozenset[str]) -> None:
    """Replace the hot set the routers of this process read (the gateway is its one writer)."""
    global _hot
    _hot = frozenset(adapters)


def hot() -> frozenset[str]:
    return _hot


def register_router(router) -> None:
    _routers.add(router)


def routing_views() -> list[dict]:
    """What each router of this process saw at its last update, replica by replica (device,
    host, queue): an operator's view of routing, and what tests wait on before a placement.
    Each router publishes its view whole from its own loop; this reads the published copies."""
    return [r.view for r in list(_routers)]


class AdapterCatalog:
    """Adapter names -> (id, folder, rank); validated from config and tensor header only."""

    def __init__(self, model_config, max_rank: int, modules: tuple[str, ...]):
        self.model_config, self.max_rank, self.modules = model_config, max_rank, modules
        # Replaced whole under the lock (loads and unloads run in worker threads); the event loop
        # reads whichever dict is current, never one being changed.
        self.entries: dict[str, tuple[str, Path, int]] = {}
        self._lock = threading.Lock()

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self.entries)

    def add(self, name: str, path: str | Path, at_start: bool = False) -> dict:
        """Register `name` (its id the name itself for an adapter found at start, else unique)."""
        check_name(name)
        if "@" in name:
            raise AdapterError(f"adapter name {name!r} may not hold '@' (it marks a version in adapter ids)", "name")
        path = Path(path).expanduser().resolve()
        info = inspect_adapter(path, self.model_config, self.max_rank, self.modules)
        adapter_id = name if at_start else f"{name}@{uuid.uuid4().hex[:12]}"
        with self._lock:  # checked where it is inserted: two loads of one name cannot both win
            if name in self.entries:
                raise AdapterError(f"adapter name {name!r} is already registered", "name")
            if len(self.entries) >= MAX_ADAPTERS:
                raise AdapterError(f"{MAX_ADAPTERS} adapters are registered, the most one gateway holds", "name")
            entry = (adapter_id, path, info.rank)
            self.entries = {**self.entries, name: entry}
        return self.describe_entry(name, entry)

    def add_dir(self, folder: str | Path, at_start: bool = False) -> dict:
        added = []
        subfolders, errors = adapter_subfolders(folder)
        for sub in subfolders:
            if sub.name in self.entries:
                continue
            try:
                self.add(sub.name, sub, at_start)
                added.append(sub.name)
            except Exception as e:  # a malformed folder is refused, never the gateway's start
                errors[sub.name] = str(e) if isinstance(e, AdapterError) else f"{sub.name}: {type(e).__name__}: {e}"
        return {"added": added, "errors": errors}

    def remove(self, name: str) -> str:
        """Unregister `name`; returns the id it had."""
        with self._lock:
            entries = dict(self.entries)
            if name not in entries:
                raise ValueError(f"adapter {name!r} is not registered")
            adapter_id = entries.pop(name)[0]
            self.entries = entries
        return adapter_id

    def describe(self, name: str) -> dict:
        return self.describe_entry(name, self.entries[name])

    @staticmethod
    def describe_entry(name: str, entry: tuple[str, Path, int]) -> dict:
        adapter_id, path, rank = entry
        # Residency is per replica (the routing stats); the catalog does not guess one.
        return {"name": name, "id": adapter_id, "path": str(path), "rank": rank, "residency": "cluster"}


class ClusterRequest:
    """The handle `serving.app` awaits, over one streaming call to a LoraEngine replica."""

    def __init__(self, response, on_end):
        self.response, self._on_end = response, on_end
        self.finished = False
        self.ended = False

    def on_end(self, finished: bool) -> None:
        # Once per request: from the stream's end, or from a cancel before it was read.
        if not self.ended:
            self.ended = True
            self._on_end(finished)

    async def events(self):
        try:
            async for event in self.response:
                if event.finished:
                    self.finished = True
                yield event
        except RequestFailed:
            raise
        except Exception as e:  # the replica died, or the engine failed the request there
            log.warning("a replica failed a request: %s", e)
            # The kind only: the replica's own message may name its files (the log has it).
            raise RequestFailed(f"the engine replica failed the request ({type(e).__name__})") from None
        finally:
            self.on_end(self.finished)
        if not self.finished:
            raise RequestFailed("the engine replica ended the stream before the request finished")

    async def aresult(self):
        output = None
        async for event in self.events():
            if event.finished:
                output = event.output
        return output

    def cancel(self) -> None:
        if not self.finished:
            self.response.cancel()
            self.on_end(False)


class ClusterEngine:
    """The engine interface `serving.app` uses, served by the LoraEngine deployment."""

    def __init__(
        self,
        engine,
        model: str,
        engine_options: dict,
        forecaster=None,
        report_s: float = 1.0,
        app_name: str | None = None,
        health_s: float = 2.0,
    ):
        config = EngineConfig(model=model, **engine_options)
        model_config, self.tokenizer = load_front_end(model, config.cache_dir)
        self.max_model_len = max_model_len = min(config.max_model_len, model_config.max_position_embeddings)
        modules = parse_target_modules(config.lora_target_modules)
        self.catalog = AdapterCatalog(model_config, config.max_lora_rank, modules)
        self.inputs = InputProcessor(
            model_config, self.tokenizer, max_model_len, config.seed, True, lambda: self.catalog.names
        )
        self.engine, self.forecaster, self.report_s = engine, forecaster, report_s
        # Event-loop state (the gateway's one thread of handlers is its only writer).
        self.arrivals: Counter = Counter()
        self.paths: dict[str, str] = {}
        self.service_s: list[float] = []
        self.pending = 0
        self._reporter: asyncio.Task | None = None
        self.app_name, self.health_s = app_name, health_s
        self._health: dict = {"status": "ok", "engine": _FRONTS}
        self._watcher: asyncio.Task | None = None

    # --- what serving.app reads ----------------------------------------------------------
    def readiness(self) -> dict:
        """The replicas' health as last polled (the poll starts with the first call)."""
        if self._watcher is None:
            with contextlib.suppress(RuntimeError):  # no event loop here: a caller outside the app
                self._watcher = asyncio.get_running_loop().create_task(self._watch_health())
        return dict(self._health)

    async def _watch_health(self) -> None:
        while True:
            self._health = await asyncio.to_thread(self.replica_health)
            await asyncio.sleep(self.health_s)  # a polling period, not a wait for another thread

    def replica_health(self) -> dict:
        """The LoraEngine deployment's status from Serve's controller."""
        from ray import serve

        try:
            app_name = self.app_name or serve.get_replica_context().app_name
            deployment = serve.status().applications[app_name].deployments["LoraEngine"]
        except Exception as e:  # the controller is out of reach: say so, do not guess
            return {"status": "failed", "engine": _FRONTS, "detail": f"cannot read the replicas' status: {e}"}
        status = str(deployment.status.value if isinstance(deployment.status, Enum) else deployment.status)
        if status in ("UNHEALTHY", "DEPLOY_FAILED"):
            # Serve's message may hold a traceback with paths: the log has it, /health (public) not.
            log.warning("the LoraEngine deployment is %s: %s", status, deployment.message)
            return {"status": "failed", "engine": _FRONTS, "detail": f"the LoraEngine deployment is {status}"}
        return {"status": "ok", "engine": _FRONTS}

    def stats(self) -> dict:
        # In flight through this gateway (Serve queues them at the handle beyond the replicas'
        # capacity): what the 429 rule counts.
        return {"waiting": self.pending}

    def has_adapter(self, name: str) -> bool:
        return name in self.catalog.entries

    def adapters(self, timeout: float | None = None) -> list[dict]:
        entries = self.catalog.entries  # one version of the catalog
        return [self.catalog.describe_entry(n, entries[n]) for n in sorted(entries)]

    def add_adapter(self, name: str, path, timeout: float | None = None) -> dict:
        return self.catalog.add(name, path)

    def add_adapter_dir(self, folder, at_start: bool = False) -> dict:
        return self.catalog.add_dir(folder, at_start)

    def remove_adapter(self, name: str, timeout: float | None = None) -> None:
        self.catalog.remove(name)  # in a worker thread: `paths` (the event loop's) is pruned at the next report

    def prompt_logprobs(self, token_ids, adapter, temperature: float, cancel=None):
        raise NotImplementedError("the cluster gateway does not score prompts (echo with logprobs)")

    def submit(self, prompt, sampling_params, adapter: str | None = None) -> ClusterRequest:
        params = sampling_params
        request = self.inputs.make_request(prompt, params, adapter)  # ValueError names the field
        adapter_id = path = None
        if adapter is not None:
            entry = self.catalog.entries.get(adapter)  # unloaded since make_request checked: refused the same way
            if entry is None:
                raise InvalidInput("adapter", f"adapter={adapter!r}: no adapter with this name is registered")
            adapter_id, folder, _ = entry
            path = str(folder)
        reporting = self.forecaster is not None  # what is reported is dropped at each report
        if reporting:
            if adapter_id is not None:
                self.paths[adapter_id] = path
            self.arrivals[adapter_id or ""] += 1
            self._start_reporter()
        started = time.perf_counter()
        response = self.engine.options(multiplexed_model_id=adapter_id or "", stream=True).generate.remote(
            request.prompt_ids, params, adapter_id, path
        )
        self.pending += 1

        def on_end(finished: bool) -> None:
            self.pending -= 1
            if finished and reporting:
                self.service_s.append(time.perf_counter() - started)

        return ClusterRequest(response, on_end)

    # --- reports to the forecaster ---------------------------------------------------------
    def _start_reporter(self) -> None:
        if self.forecaster is not None and self._reporter is None:
            self._reporter = asyncio.get_running_loop().create_task(self._report_loop())

    async def _report_loop(self) -> None:
        while True:
            await asyncio.sleep(self.report_s)  # a reporting period, not a wait for another thread
            await self.report()

    async def report(self) -> list[str]:
        """Send the arrivals since the last report; publish the hot set the forecaster returns."""
        arrivals, self.arrivals = self.arrivals, Counter()
        service, self.service_s = self.service_s, []
        registered = {entry[0] for entry in self.catalog.entries.values()}
        self.paths = {a: p for a, p in self.paths.items() if a in registered}  # unloaded ones: not pre-loaded
        try:
            hot = await self.forecaster.observe.remote(dict(arrivals), dict(self.paths), service)
        except Exception as e:  # the forecaster is down: routing goes on without the hot set
            log.warning("the forecaster did not take a report: %s", e)
            return []
        publish_hot(frozenset(hot))
        return hot


class Gateway:
    """The ingress deployment: `serving.app`'s FastAPI app over a `ClusterEngine`."""

    def __init__(
        self,
        engine,
        forecaster,
        model: str,
        engine_options: dict,
        served_model_name: str = "",
        adapter_dirs: tuple[str, ...] = (),
        api_key: str | None = None,
        max_queue: int = 256,
        report_s: float = 1.0,
        admin_api_key: str | None = None,
    ):
        from plora_jax.lora.node_cache import is_remote
        from serving.app import ServerState
        from serving.main import ServerConfig, served_name
        from serving.sources import AdapterSources

        self.engine = ClusterEngine(engine, model, engine_options, forecaster, report_s)
        for folder in adapter_dirs:
            if is_remote(folder):  # the catalog validates adapters from local folders only
                raise ValueError(f"adapter_dirs: {folder!r}: the cluster gateway reads local folders only")
            result = self.engine.add_adapter_dir(folder, at_start=True)
            for name, why in result["errors"].items():
                log.warning("adapter %r refused: %s", name, why)
        sources = AdapterSources.of(list(adapter_dirs))
        name = served_name(ServerConfig(served_model_name=served_model_name), model)  # never an absolute path
        self.state = ServerState(self.engine, name, sources, api_key, max_queue, admin_api_key=admin_api_key)

    def __serve_build_asgi_app__(self):
        from serving.app import build_app

        return build_app(self.state)

    def routing_view(self) -> list[dict]:
        """What this gateway's routers see of the LoraEngine replicas (`routing_views`)."""
        return routing_views()

    async def report(self) -> list[str]:
        """Report to the forecaster now (tests and benchmarks call it instead of waiting)."""
        return await self.engine.report() if self.engine.forecaster is not None else []
