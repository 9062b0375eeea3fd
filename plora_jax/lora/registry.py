"""The disk tier: registered adapters, what each needs on the device, and reading them.

`prepare` validates a PEFT folder from its config and safetensors header (cheap, so a folder of
thousands registers in seconds with `scan`), and with `read` also reads and lays out its
weights into a `HostCopy` from the same opening of its files; `read` reads an entry's weights
later (the transfer thread's loads), refusing a folder whose files changed since the entry was
made (`adapter_files.FolderIdentity`). Both are pure functions of the files and the settings,
so any thread may call them: the engine reads an added adapter on the caller's thread and the
transfer thread reads for loads, and neither writes into a shared entry. Malformed folders are
`AdapterError`s; a scan records each one refused and goes on.
`insert`, `remove` and the `entries` map belong to the owner of the residency (the engine loop
or the simulator).

An `AdapterEntry` holds what never changes while it is registered (path, rank, pages, bytes)
plus two fields the owner alone writes: the last load's time and error.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..buckets import cdiv
from ..config import ModelConfig
from ..limits import MAX_ADAPTERS, MAX_NAME_CHARS
from .adapter_files import FolderIdentity
from .host_cache import HostCopy
from .node_cache import NodeCache, is_remote, normalize_uri
from .peft import AdapterError, LoraAdapter, layout_pages, read_adapter


@dataclass
class AdapterEntry:
    name: str
    path: Path | None  # None for a simulated adapter (sizes only)
    rank: int
    target_modules: tuple[str, ...]
    num_pages: int  # pages its weights need (ceil(rank / page_rows))
    live_bytes: int  # bytes of the weights at their true ranks
    device_bytes: int  # bytes it reserves in the device pool (whole pages; max rank if contiguous)
    host_bytes: int  # bytes of its host copy (its own pages, whatever the device layout)
    files: FolderIdentity | None = None  # the files registration read (later reads must find the same)
    source: str | None = None  # the store's URI of a remote adapter (its files: `path`, in the node cache)
    version: str | None = None  # the node cache's key of the version registered (later reads get the same)
    load_s: float = 0.0  # time of the last device load, from its request until it was handed back (owner)
    error: BaseException | None = None  # why the last load failed (owner)


def check_name(name) -> None:
    if (
        not isinstance(name, str)
        or not 0 < len(name) <= MAX_NAME_CHARS
        or name.strip() != name
        or not name.isprintable()
    ):
        shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:77] + "..."
        raise AdapterError(
            f"adapter name {shown} must be a string of 1 to {MAX_NAME_CHARS} characters without surrounding "
            "spaces or control characters",
            "name",
        )


def adapter_subfolders(folder: str | Path) -> tuple[list[Path], dict[str, str]]:
    """The subfolders of `folder` holding adapter_config.json, and {name: why} for those that
    resolve outside it (a symlink to elsewhere) or cannot be looked at. One confinement rule for
    every way in, start-up scans and run-time loads alike: an adapter's path, symlinks resolved,
    lies inside the folder (and its files lie in it: `adapter_files`)."""
    folder = Path(folder).expanduser()
    root = folder.resolve()
    inside, refused = [], {}
    try:
        subs = sorted(folder.iterdir())
    except OSError as e:
        raise AdapterError(f"{folder}: the adapter folder cannot be listed ({e.strerror})") from None
    for sub in subs:
        try:
            if not (sub / "adapter_config.json").is_file():
                continue
            target = sub.resolve()
        except (OSError, RuntimeError) as e:  # no permission, a symlink loop
            refused[sub.name] = f"{sub.name}: cannot be looked at ({e})"
            continue
        if target.is_relative_to(root):
            inside.append(sub)
        else:
            refused[sub.name] = f"{sub}: resolves to {target}, outside the adapter folder {root}"
    return inside, refused


class Registry:
    def __init__(
        self,
        model_config: ModelConfig,
        dtype,
        max_rank: int,
        page_rows: int,
        modules: tuple[str, ...],
        layout: str,
        capacity_pages: int,
        page_bytes: int,
        node_cache: NodeCache | None = None,
    ):
        self.node_cache = node_cache  # where remote adapters are fetched to (None: local folders only)
        self.model_config, self.dtype = model_config, np.dtype(dtype)
        self.max_rank, self.page_rows, self.modules = max_rank, page_rows, modules
        self.layout, self.page_bytes = layout, page_bytes
        self.max_pages = cdiv(max_rank, page_rows)
        # The most pages one adapter may take: the whole pool (page 0 aside), or one fixed slot.
        self.capacity_pages = self.max_pages if layout == "contiguous" else capacity_pages
        self.entries: dict[str, AdapterEntry] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    # --- pure (any thread) --------------------------------------------------------------
    def entry(self, name: str, path: Path | None, rank: int, targets: tuple[str, ...], live_bytes: int):
        """An entry for an adapter of `rank` (the sizes follow from the settings)."""
        num_pages = cdiv(rank, self.page_rows)
        if num_pages > self.capacity_pages:
            where = Path(path).name if path is not None else name
            raise AdapterError(f"{where}: adapter needs {num_pages} pages, the pool holds {self.capacity_pages}")
        occupied = self.max_pages if self.layout == "contiguous" else num_pages
        return AdapterEntry(
            name, path, rank, targets, num_pages, live_bytes, occupied * self.page_bytes, num_pages * self.page_bytes
        )

    def prepare(self, name: str, path: str | Path, read: bool = False) -> tuple[AdapterEntry, HostCopy | None]:
        """Validate `path` (config and tensor header) into an entry, not yet registered; with
        `read`, also its weights as a host copy, from the same opening of its files."""
        check_name(name)
        if is_remote(path):
            uri = normalize_uri(str(path))
            key, sizes = self._node_cache().version(uri)
            with self._node_cache().open(uri, key, sizes) as folder:
                entry, copy = self._prepare_local(name, folder, read)
            entry.files, entry.source, entry.version = None, uri, key  # checked by sha256, not identity
            return entry, copy
        return self._prepare_local(name, Path(path), read)

    def _prepare_local(self, name: str, path: Path, read: bool) -> tuple[AdapterEntry, HostCopy | None]:
        info, adapter = read_adapter(name, path, self.model_config, self.max_rank, self.modules, weights=read)
        entry = self.entry(name, path, info.rank, info.target_modules, info.live_elements * self.dtype.itemsize)
        entry.files = info.identity
        return entry, (self._layout(adapter) if adapter is not None else None)

    def _node_cache(self) -> NodeCache:
        if self.node_cache is None:
            raise AdapterError("this engine reads adapters from local folders only")
        return self.node_cache

    def read(self, entry: AdapterEntry, demand: bool = True) -> HostCopy:
        """Read and lay out `entry`'s weights (bad weights, or files changed since the entry was
        made, raise AdapterError). `demand`: a request waits for it (a fetch from the store then
        goes ahead of prefetches on the link)."""
        if entry.path is None:
            raise AdapterError(f"adapter {entry.name!r} has no folder to read")
        if entry.source is not None:  # the registered version, from the node cache (fetched again if evicted)
            with self._node_cache().open(entry.source, entry.version, demand=demand) as folder:
                _, adapter = read_adapter(entry.name, folder, self.model_config, self.max_rank, self.modules)
        else:
            _, adapter = read_adapter(
                entry.name, entry.path, self.model_config, self.max_rank, self.modules, expect=entry.files
            )
        if adapter.rank != entry.rank:  # only without a recorded identity (an entry made by hand)
            raise AdapterError(f"{entry.path.name}: changed since registration (rank {entry.rank} -> {adapter.rank})")
        return self._layout(adapter)

    def fetch(self, entry: AdapterEntry) -> None:
        """Bring a remote entry's registered version into the node cache, behind demand fetches
        on the link (a policy's prefetch into the disk tier); nothing for a local folder."""
        if entry.source is not None:
            with self._node_cache().open(entry.source, entry.version, demand=False):
                pass

    def _layout(self, adapter: LoraAdapter) -> HostCopy:
        a_pages, b_pages, _ = layout_pages(adapter, self.model_config, self.page_rows, self.dtype, self.modules)
        return HostCopy.of(a_pages, b_pages)

    # --- the owner's ----------------------------------------------------------------------
    def insert(self, entry: AdapterEntry) -> None:
        if entry.name in self.entries:
            raise AdapterError(f"adapter name {entry.name!r} is already registered", "name")
        if len(self.entries) >= MAX_ADAPTERS:
            raise AdapterError(f"{MAX_ADAPTERS} adapters are registered, the most one engine holds", "name")
        self.entries[entry.name] = entry

    def scan_remote(self, uri: str, registered: Collection[str] = ()) -> tuple[list[AdapterEntry], dict[str, str]]:
        """As `scan`, for a store's prefix: each adapter under it is fetched into the node cache
        (its weights read later from there), skipping the names in `registered` (the caller's
        snapshot). Any thread: it does not touch `entries`."""
        found, errors = [], {}
        for sub in self._node_cache().list(uri):
            name = sub.rsplit("/", 1)[-1]
            if name in registered:
                continue
            try:
                found.append(self.prepare(name, sub)[0])
            except Exception as e:  # a malformed adapter is refused, never the scan (nor a server start)
                errors[name] = str(e) if isinstance(e, AdapterError) else f"{name}: {type(e).__name__}: {e}"
        return found, errors

    def scan(self, folder: str | Path) -> tuple[list[AdapterEntry], dict[str, str]]:
        """Entries for every subfolder of `folder` holding adapter_config.json, named after it
        (validated from config and header only), skipping those registered under the same name
        and path; plus {name: error} for the folders refused (invalid, or outside `folder`)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise AdapterError(f"{folder}: adapter folder not found")
        found = []
        subfolders, errors = adapter_subfolders(folder)
        for sub in subfolders:
            existing = self.entries.get(sub.name)
            if existing is not None and existing.path == sub:
                continue
            try:
                found.append(self.prepare(sub.name, sub)[0])
            except Exception as e:  # a malformed folder is refused, never the scan (nor a server start)
                errors[sub.name] = str(e) if isinstance(e, AdapterError) else f"{sub.name}: {type(e).__name__}: {e}"
        return found, errors
