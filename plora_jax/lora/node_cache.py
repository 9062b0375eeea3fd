"""The node tier: adapters from object storage, kept in a disk cache shared by a machine's engines.

An adapter source is a local folder or a URI that fsspec reads (`s3://`, `gs://`, `http(s)://`).
A remote adapter is copied into the node cache before anything parses it; from then on it is
read as a local folder (`adapter_files`: confined, bounded, one positioned read per tensor), so
nothing in a store is ever parsed in place. Tiers: remote -> node disk (here) -> host memory
(`host_cache`) -> device (`device_pool`).

Layout under the cache's folder (created 0700):
    objects/<key>/<name>/adapter_config.json, adapter_model.safetensors   (<name>: the URI's last part)
    objects/<key>/manifest.json   each file's size and sha256; its mtime is the entry's last use
    locks/<key>.lock              flock: exclusive while one process downloads, shared while read
    tmp/                          downloads in progress, renamed into objects/ once complete

`key` hashes the source URI with both objects' versions (ETag, generation, or else size and
modification time), so a replaced object gets a new key and a cached copy is never stale.
Several processes may ask for one adapter at once: the first takes the key's lock and
downloads, the others wait on the lock and find the entry complete. Eviction (least recently
used first, down to the byte budget) takes an entry's lock only if nobody holds it, so it never
deletes a folder another engine is reading. Every read checks sizes, and sha256 whenever a
file's identity (inode, size, times) differs from the one this process last verified: a
rewrite is caught, and a restart verifies each entry once. A bad entry is deleted and fetched
again. Large objects are fetched with parallel ranged reads.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..limits import MAX_CONFIG_BYTES, MAX_PATH_CHARS
from ..metrics import LINKS, NODE_CACHE_COUNTERS, LinkFit
from ..trusted_cache import private_dir, sha256_file
from .adapter_files import CONFIG_FILE, WEIGHTS_FILE, AdapterError

FILES = (CONFIG_FILE, WEIGHTS_FILE)
MANIFEST = "manifest.json"
CHUNK_BYTES = 8 << 20  # one ranged read
PARALLEL_READS = 4  # ranged reads in flight per file
STALE_TMP_S = 3600.0  # a download folder this old was left by a process that died


class AdapterNotFound(AdapterError):
    """The store has no adapter at that URI (no adapter_config.json there)."""


class SourceUnavailable(AdapterError):
    """The store could not be reached, or failed to answer."""


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` is a URI for fsspec (a scheme other than file://) rather than a local path."""
    return isinstance(path, str) and "://" in path and not path.startswith("file://")


_HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]*(:[0-9]{1,5})?")  # a bucket, or host[:port]
_PART = re.compile(r"[A-Za-z0-9_~-][A-Za-z0-9._~-]*")  # one path part: no '%', '?', '#', ':' or '..'


def normalize_uri(uri: str) -> str:
    """`uri` without a trailing slash; refused (AdapterError) unless it is `scheme://host/parts`
    with a host of letters, digits, '.', '-' (and a port) and parts of letters, digits, '.', '_',
    '~', '-' not starting with '.': no percent-escapes, queries, fragments or fsspec chains that
    a store would resolve elsewhere, so a prefix check on the result is a containment check."""
    if len(uri) > MAX_PATH_CHARS or not uri.isprintable():
        raise AdapterError(f"adapter URI must be printable and at most {MAX_PATH_CHARS} characters")
    scheme, _, rest = uri.partition("://")
    host, *parts = rest.rstrip("/").split("/")
    if not scheme.isalnum() or not _HOST.fullmatch(host) or not all(_PART.fullmatch(p) for p in parts):
        raise AdapterError(
            f"adapter URI {uri[:80]!r} must be scheme://host/path with letters, digits and '._~-' in each part"
        )
    return f"{scheme}://{'/'.join([host, *parts])}"


def _protocols(fs) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


def _identity(st: os.stat_result) -> tuple:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _version_tag(info: dict) -> str:
    for field in ("ETag", "etag", "generation", "VersionId", "md5Hash"):
        if info.get(field):
            return f"{field}={info[field]}"
    for field in ("Last-Modified", "LastModified", "mtime", "updated"):  # no content tag: its time
        if info.get(field):
            return f"{field}={info[field]}"
    return "untagged"  # then the size alone tells versions apart


class Link:
    """One physical link's transfers, demand before background at chunk granularity: a
    background fetch (a prefetch) waits between chunks while any demand fetch is running on the
    link, so it never delays a demand load queued behind it by more than the chunks in flight."""

    def __init__(self):
        self._turn = threading.Condition()
        self.demands = 0  # demand fetches on the link now
        self.yielded = 0  # times a background chunk waited for a demand fetch

    @contextlib.contextmanager
    def use(self, demand: bool) -> Iterator[None]:
        if not demand:
            yield
            return
        with self._turn:
            self.demands += 1
        try:
            yield
        finally:
            with self._turn:
                self.demands -= 1
                self._turn.notify_all()

    def turn(self, demand: bool) -> None:
        """Before each chunk: a background fetch waits while a demand fetch runs."""
        if demand:
            return
        with self._turn:
            if self.demands:
                self.yielded += 1
                self._turn.wait_for(lambda: self.demands == 0)


class NodeCache:
    """Remote adapters on this node's disk (see the module's docstring). Any thread may call it."""

    def __init__(self, root: str | Path, budget_bytes: int, options: dict[str, dict] | None = None):
        self.root, self.budget = Path(root).expanduser(), int(budget_bytes)
        self.options = options or {}
        self._made = False
        self._lock = threading.Lock()  # the counters and the verified identities
        self._verified: dict[str, tuple] = {}  # file path -> identity this process hashed
        self.counters = dict.fromkeys(NODE_CACHE_COUNTERS, 0)
        self.link = Link()  # remote -> this node's disk
        self._used = 0  # bytes in the cache as of this process's last eviction scan (stats)
        self.bytes_fetched = 0  # bytes_remote_to_disk
        self.fetch_s = 0.0  # seconds spent downloading
        self.link_fit = LinkFit()  # the store link's latency and rate, from every fetch

    # --- the store ------------------------------------------------------------------------
    def _fs(self, uri: str):
        try:
            import fsspec
        except ImportError:
            raise AdapterError("adapters from object storage need fsspec: pip install 'plora-jax[remote]'") from None
        protocol = uri.partition("://")[0]
        try:
            return fsspec.core.url_to_fs(uri, **self.options.get(protocol, {}))
        except Exception as e:  # no implementation for the protocol installed, or bad options
            raise AdapterError(f"{protocol}:// adapter sources are not available here ({type(e).__name__})") from None

    def version(self, uri: str) -> tuple[str, tuple[int, ...]]:
        """The cache key of the store's current version of `uri`'s adapter, and its files' sizes."""
        uri = normalize_uri(uri)
        fs, path = self._fs(uri)
        label, found = uri.rsplit("/", 1)[-1], []
        for name in FILES:
            try:
                info = fs.info(f"{path}/{name}")
            except FileNotFoundError:
                if name == CONFIG_FILE:
                    raise AdapterNotFound(f"{label}: no adapter at {uri}") from None
                raise AdapterError(f"{label}/{name}: not found") from None
            except Exception as e:  # connection refused, a 5xx, bad credentials
                raise SourceUnavailable(f"{label}: the adapter store cannot be read ({type(e).__name__})") from None
            size = int(info.get("size") or 0)
            if name == CONFIG_FILE and size > MAX_CONFIG_BYTES:
                raise AdapterError(f"{label}/{name}: {size} bytes, more than {MAX_CONFIG_BYTES}")
            found.append((name, _version_tag(info), size))
        sizes = tuple(size for _, _, size in found)
        if sum(sizes) > self.budget:
            raise AdapterError(f"{label}: {sum(sizes)} bytes, more than the node cache holds ({self.budget})")
        key = hashlib.sha256(json.dumps([uri, found]).encode()).hexdigest()[:40]
        return key, sizes

    def list(self, uri: str) -> list[str]:
        """URIs of the adapters (folders with adapter_config.json) directly under `uri`."""
        uri = normalize_uri(uri)
        fs, path = self._fs(uri)
        try:
            entries = fs.ls(path, detail=True)
            found = [e["name"].rstrip("/") for e in entries if e.get("type") == "directory"]
            return [f"{uri}/{p.rsplit('/', 1)[-1]}" for p in sorted(found) if fs.exists(f"{p}/{CONFIG_FILE}")]
        except FileNotFoundError:
            raise AdapterNotFound(f"{uri}: no such adapter folder") from None
        except Exception as e:
            raise SourceUnavailable(f"{uri}: the adapter store cannot be listed ({type(e).__name__})") from None

    # --- the cache ------------------------------------------------------------------------
    def _dirs(self) -> tuple[Path, Path, Path]:
        objects, locks, tmp = self.root / "objects", self.root / "locks", self.root / "tmp"
        if not self._made:
            for d in (objects, locks, tmp):
                private_dir(d, self.root)
            for old in tmp.iterdir():  # downloads of processes that died
                with contextlib.suppress(OSError):
                    if time.time() - old.stat().st_mtime > STALE_TMP_S:
                        shutil.rmtree(old, ignore_errors=True)
            self._made = True
            self._used = self.used_bytes()
        return objects, locks, tmp

    @contextlib.contextmanager
    def open(
        self, uri: str, key: str | None = None, sizes: tuple[int, ...] | None = None, demand: bool = True
    ) -> Iterator[Path]:
        """The local folder holding `uri`'s adapter, version `key` (None: the store's current
        one; `sizes`, if given, its files' sizes from `version`), fetched if it is not cached
        (`demand`: for a waiting request, ahead of background fetches on the link); kept from
        eviction until the block ends."""
        uri = normalize_uri(uri)
        if key is None:
            key, sizes = self.version(uri)
        name = uri.rsplit("/", 1)[-1]
        try:
            lock, folder = self._hold(uri, key, sizes, demand)
        except OSError as e:  # a full disk, a cache folder that cannot be written
            raise AdapterError(f"{name}: the node cache cannot hold it ({type(e).__name__}: {e.strerror})") from None
        try:
            yield folder
        finally:
            lock.close()  # lets the shared lock go

    def _hold(self, uri: str, key: str, sizes: tuple[int, ...] | None, demand: bool):
        """(the key's lock file, held shared; the entry's adapter folder), fetching it first if
        it is missing or bad."""
        objects, locks, tmp = self._dirs()
        entry, name = objects / key, uri.rsplit("/", 1)[-1]
        lock = open(locks / f"{key}.lock", "a+b")  # noqa: SIM115 (held past this call: open() closes it)
        try:
            while True:
                fcntl.flock(lock, fcntl.LOCK_EX)  # one writer per key: the others wait here
                if self._valid(entry, name):
                    self._count("node_cache_hits")
                else:
                    if sizes is None:  # a registered version: the store must still hold it
                        current, sizes = self.version(uri)
                        if current != key:
                            raise AdapterError(f"{name}: changed in the store since it was registered")
                    with self.link.use(demand):
                        self._download(uri, entry, name, sizes, tmp, demand)
                    if self.version(uri)[0] != key:  # replaced while it was read: the bytes may be either
                        shutil.rmtree(entry, ignore_errors=True)
                        raise AdapterError(f"{name}: changed in the store during the fetch; try again")
                    self._count("node_cache_misses")
                    self._evict(objects, locks, keep=key)
                os.utime(entry / MANIFEST)  # its last use
                fcntl.flock(lock, fcntl.LOCK_SH)  # readers share; an evictor needs it free
                if (entry / MANIFEST).exists():  # not evicted in the instant the lock was let go
                    return lock, entry / name
        except BaseException:
            lock.close()
            raise

    def _valid(self, entry: Path, name: str) -> bool:
        try:
            manifest = json.loads((entry / MANIFEST).read_text())
            for file, want in manifest["files"].items():
                path = entry / name / file
                identity = _identity(path.stat())
                if identity[2] != want["size"]:
                    raise ValueError(f"{file}: size")
                with self._lock:
                    known = self._verified.get(str(path)) == identity
                if not known:
                    if sha256_file(path) != want["sha256"]:
                        raise ValueError(f"{file}: sha256")
                    with self._lock:
                        self._verified[str(path)] = identity
            return True
        except FileNotFoundError:
            return False
        except (OSError, ValueError, KeyError, TypeError):  # corrupted or truncated: fetched again
            self._count("node_cache_corrupt")
            shutil.rmtree(entry, ignore_errors=True)
            return False

    def _download(self, uri: str, entry: Path, name: str, sizes: tuple[int, ...], tmp: Path, demand: bool) -> None:
        fs, path = self._fs(uri)
        begun = time.perf_counter()
        work = Path(tempfile.mkdtemp(dir=tmp))
        try:
            (work / name).mkdir()
            files = {}
            for file, size in zip(FILES, sizes, strict=True):
                digest = self._fetch(fs, f"{path}/{file}", work / name / file, size, demand)
                files[file] = {"size": size, "sha256": digest}
            (work / MANIFEST).write_text(json.dumps({"uri": uri, "files": files}))
            shutil.rmtree(entry, ignore_errors=True)
            os.rename(work, entry)
            with self._lock:  # hashed as they were written: the first read need not hash them again
                for file in files:
                    self._verified[str(entry / name / file)] = _identity((entry / name / file).stat())
        except AdapterError:
            raise
        except Exception as e:
            raise SourceUnavailable(f"{name}: fetching from the adapter store failed ({type(e).__name__})") from None
        finally:
            shutil.rmtree(work, ignore_errors=True)
        seconds = time.perf_counter() - begun
        with self._lock:
            self.bytes_fetched += sum(sizes)
            self.fetch_s += seconds
            self.link_fit.add(sum(sizes), seconds)

    def _fetch(self, fs, path: str, dest: Path, size: int, demand: bool) -> str:
        """Copy `path` (`size` bytes) to `dest` with parallel ranged reads, each chunk taking
        its turn on the link; its sha256."""
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            # Plain HTTP servers may ignore ranges (and answer the whole file): one GET there.
            chunk = CHUNK_BYTES if not {"http", "https"} & set(_protocols(fs)) else max(size, 1)

            def part(start: int) -> None:
                self.link.turn(demand)
                end = min(start + chunk, size)
                data = fs.cat_file(path) if end - start == size else fs.cat_file(path, start=start, end=end)
                if len(data) != end - start:
                    raise AdapterError(f"{dest.parent.name}/{dest.name}: changed in the store during the fetch")
                os.pwrite(fd, data, start)

            with ThreadPoolExecutor(PARALLEL_READS, thread_name_prefix="plora-fetch") as pool:
                list(pool.map(part, range(0, size, chunk)))
            os.fsync(fd)
        finally:
            os.close(fd)
        return sha256_file(dest)

    def _evict(self, objects: Path, locks: Path, keep: str) -> None:
        """Delete least recently used entries nobody is reading until the cache fits its budget."""
        entries = self._entries(objects)
        total = sum(size for _, _, size in entries)
        for _, key, size in sorted(entries):
            if total <= self.budget:
                break
            if key != keep and self._delete_if_unused(objects, locks, key):
                total -= size
                self._count("node_cache_evictions")
        with self._lock:
            self._used = total  # as of this scan (other processes change it too)

    def clear(self) -> int:
        """Delete every entry nobody is reading (a benchmark's cold start for each policy it
        replays); the number deleted."""
        objects, locks, _ = self._dirs()
        deleted = sum(self._delete_if_unused(objects, locks, entry.name) for entry in sorted(objects.iterdir()))
        with self._lock:
            self._used = self.used_bytes()
        return deleted

    @staticmethod
    def _delete_if_unused(objects: Path, locks: Path, key: str) -> bool:
        """Delete entry `key` if nobody holds its lock (being read or fetched); whether it did."""
        with open(locks / f"{key}.lock", "a+b") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            shutil.rmtree(objects / key, ignore_errors=True)
            return True

    @staticmethod
    def _entries(objects: Path) -> list[tuple[float, str, int]]:
        """(last use, key, bytes) of every complete entry, from their manifests."""
        entries = []
        for manifest in objects.glob(f"*/{MANIFEST}"):
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                size = sum(f["size"] for f in json.loads(manifest.read_text())["files"].values())
                entries.append((manifest.stat().st_mtime, manifest.parent.name, size))
        return entries

    def _count(self, counter: str) -> None:
        with self._lock:
            self.counters[counter] += 1

    def used_bytes(self) -> int:
        """Bytes of every entry on disk now (a scan of the manifests)."""
        return sum(size for _, _, size in self._entries(self.root / "objects"))

    def stats(self) -> dict:
        with self._lock:
            return {
                **self.counters,
                "bytes_remote_to_disk": self.bytes_fetched,
                "node_cache_fetch_s": self.fetch_s,
                "node_cache_link_yields": self.link.yielded,
                "node_cache_budget": self.budget,
                "node_cache_bytes": self._used,  # as of the last fetch or eviction (no scan per call)
                **self.link_fit.stats(LINKS[0]),
            }
