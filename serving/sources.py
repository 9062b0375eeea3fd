"""Where the server may load adapters from, and resolving unknown model names on first use.

`AdapterSources` holds the configured places: local folders (`--adapter-dir DIR`), store
prefixes (`--adapter-dir s3://bucket/loras`) and a template for names nobody registered
(`--adapter-source s3://bucket/loras/{name}`, as vLLM's LoRA resolvers and LoRAX do). One
confinement rule for every way in: a `lora_path` must lie inside a configured folder or prefix
(symlinks resolved for folders; for URIs, no empty, '.' or '..' parts, then a prefix check),
and a resolved name must be one path part of letters, digits, '.', '_' and '-', not starting
with '.', so it cannot climb out of the template's folder.

`resolve` (event loop) registers a template's adapter the first time a request names it: the
request waits for the fetch, concurrent requests for one name share it, and the fetch goes on
if the first client leaves. A name the store does not hold is a 404 naming the model, a store
that cannot be reached a 503 naming the adapter, a broken adapter a 400.
"""

from __future__ import annotations

import asyncio
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from plora_jax.limits import MAX_NAME_CHARS, MAX_RESOLVING, NOT_FOUND_TTL_S
from plora_jax.lora.node_cache import AdapterNotFound, SourceUnavailable, is_remote, normalize_uri
from plora_jax.lora.peft import AdapterError

from .contract import ServingEngine
from .protocol import ApiError

NAME = re.compile(rf"[A-Za-z0-9_-][A-Za-z0-9._-]{{0,{MAX_NAME_CHARS - 1}}}")  # one path part a template may take
ENGINE_CALL_S = 30.0  # longest an endpoint waits for the engine's loop (then 503): a hung loop holds no thread


def check_template(template: str) -> None:
    """A template names its adapter with one '{name}' as its last path part."""
    head, sep, tail = template.rpartition("/{name}")
    if not sep or tail or "{" in head or "}" in head:
        raise ValueError(f"adapter_source {template!r} must end in '/{{name}}' (e.g. s3://bucket/loras/{{name}})")


@dataclass
class AdapterSources:
    folders: list[Path] = field(default_factory=list)  # local folders, resolved
    prefixes: list[str] = field(default_factory=list)  # store prefixes, normalized
    template: str = ""  # where an unknown model name is looked for ("": nowhere)

    @classmethod
    def of(cls, places: list[str], template: str = "") -> AdapterSources:
        sources = cls(template=template)
        if template:
            check_template(template)
            places = [*places, template.rpartition("/")[0]]
        for place in places:
            if is_remote(place):
                sources.prefixes.append(normalize_uri(place))
            else:
                sources.folders.append(Path(place).expanduser().resolve())
        return sources

    def __bool__(self) -> bool:
        return bool(self.folders or self.prefixes)

    def confine(self, path: str) -> Path | str:
        """`path` resolved, if it lies inside a configured place; else ApiError 400 on lora_path."""
        if not self:
            message = "loading adapters at run time needs --adapter-dir (no adapter folder is configured)"
            raise ApiError(400, message, "lora_path")
        if is_remote(path):
            try:
                uri = normalize_uri(path)
            except AdapterError as e:
                raise ApiError(400, f"lora_path: {e}", "lora_path") from None
            if any(uri.startswith(prefix + "/") for prefix in self.prefixes):
                return uri
        else:
            try:
                resolved = Path(path).expanduser().resolve()
            except (OSError, ValueError, RuntimeError) as e:  # a NUL byte, ~nouser, a symlink loop
                raise ApiError(400, f"lora_path cannot be resolved ({type(e).__name__})", "lora_path") from None
            if any(resolved.is_relative_to(root) for root in self.folders):
                return resolved
        raise ApiError(400, f"lora_path {path!r} is outside the configured adapter folders", "lora_path")

    def display(self, path: str) -> str:
        """An adapter's place as clients see it: relative to the folder or prefix it lies in."""
        if is_remote(path):
            inside = [path[len(p) + 1 :] for p in self.prefixes if path.startswith(p + "/")]
            return inside[0] if inside else path.rsplit("/", 1)[-1]
        local = Path(path)
        inside = [str(local.relative_to(root)) for root in self.folders if local.is_relative_to(root)]
        return inside[0] if inside else local.name


class Resolver:
    """Registers template adapters on first use (see the module's docstring). Bounded: at most
    `MAX_RESOLVING` names are fetched at once, on a pool of their own (429 past it), and a name
    the store did not hold answers 404 for `NOT_FOUND_TTL_S` without asking the store again, so
    a flood of made-up names costs the store one request each at most every few seconds."""

    def __init__(self, engine: ServingEngine, sources: AdapterSources, clock=time.monotonic):
        self.engine, self.sources, self.clock = engine, sources, clock
        self._fetches: dict[str, asyncio.Future] = {}  # name -> its registration (event loop only)
        self._missing: dict[str, float] = {}  # name -> when the store said it has none (event loop only)
        self.pool = ThreadPoolExecutor(max_workers=MAX_RESOLVING, thread_name_prefix="plora-resolve")

    def can_resolve(self, name: str) -> bool:
        return bool(self.sources.template) and NAME.fullmatch(name) is not None

    async def resolve(self, name: str) -> None:
        """Register `name` from the template (ApiError 404, 429, 503 or 400 if it cannot be)."""
        not_found = ApiError(404, f"the model '{name}' does not exist", "model", "model_not_found")
        now = self.clock()
        self._missing = {n: t for n, t in self._missing.items() if now - t < NOT_FOUND_TTL_S}
        if name in self._missing:
            raise not_found
        fetch = self._fetches.get(name)
        if fetch is None:
            if len(self._fetches) >= MAX_RESOLVING:
                raise ApiError(429, f"{MAX_RESOLVING} adapters are being fetched already; retry later", "model")
            fetch = asyncio.get_running_loop().run_in_executor(self.pool, self._register, name)
            self._fetches[name] = fetch
            fetch.add_done_callback(lambda f: self._done(name, f))
        try:
            await asyncio.shield(fetch)  # a client that leaves does not cancel the others' fetch
        except AdapterNotFound:
            self._missing[name] = self.clock()
            raise not_found from None
        except SourceUnavailable as e:
            raise ApiError(503, f"adapter '{name}' could not be fetched: {e}", "model") from None
        except TimeoutError:
            raise ApiError(503, f"adapter '{name}': the engine did not answer in time", "model") from None
        except AdapterError as e:
            raise ApiError(400, f"adapter '{name}': {e}", "model") from None

    def _done(self, name: str, fetch: asyncio.Future) -> None:
        self._fetches.pop(name, None)
        if not fetch.cancelled():
            fetch.exception()  # retrieved here: every client may have left before it ended

    def _register(self, name: str) -> None:
        uri = self.sources.template.replace("{name}", name)
        try:
            self.engine.add_adapter(name, uri if is_remote(uri) else Path(uri), ENGINE_CALL_S)
        except AdapterError as e:
            if e.field == "name" and self.engine.has_adapter(name):  # registered meanwhile: done
                return
            raise
