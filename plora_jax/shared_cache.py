"""A compile cache shared by every node: what a fresh instance downloads instead of building.

A serverless instance that scales from zero lands on a node that may never have run the model:
its local caches (`<cache>/executables`, `<cache>/params`, `<cache>/kernels`) are empty, and
building them costs a minute on a CPU and minutes on a GPU. `--compile-cache URI` names a
folder (possibly on a network file system) or an object-store prefix that holds them for every
node. Entries are keyed as the local caches are (an executable folder by the hash of its
fingerprint: model, configuration, jax and jaxlib, backend and device kind, kernels and
source digest; a parameter entry by the model file's key), so a node only ever finds entries
that fit it exactly:

    <uri>/<kind>/<key>/manifest.json        {"fingerprint": {...}, "writer": id, "files": {name: {size, sha256}}}
    <uri>/<kind>/<key>/<writer>/<name>...   the files, under the writer that published them

A process whose local entry is missing pulls: it reads the manifest, checks its fingerprint
against its own (another configuration or jax version is ignored with a warning), downloads
each file and checks its size and sha256 before handing it to the local cache (which seals
executables with this node's MAC). One that built an entry publishes it once its warm-up is
done, if no manifest is there yet: files first, under its own writer id, then the manifest,
so a reader never sees a half-written entry and two writers never mix their files (the last
manifest wins; each is whole).

Trust: executables and the kernel are code, and a pulled file is sealed with this node's own
MAC, so the shared cache must not be writable by whoever could plant one. Entries are signed:
with `compile_cache_key` (a file holding a secret shared by the nodes, never stored in the
cache) every manifest a node publishes carries an HMAC-SHA256 of its contents, and a node pulls
only entries whose HMAC matches. Without a key nothing is pulled that runs as code (executables,
kernels): only the parameters, which are data. The sha256s in a manifest catch damage; the
HMAC is what keeps a writer without the key out.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path

from .trusted_cache import sha256_file

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CODE = ("executables", "kernels")  # kinds whose files run as code on the node that loads them


class SharedCache:
    """Pulls and publishes cache entries at `uri` (a folder or an fsspec URI)."""

    def __init__(self, uri: str, options: Mapping[str, dict] | None = None, key: bytes | None = None):
        import fsspec

        self.uri = uri.rstrip("/")
        protocol = self.uri.partition("://")[0] if "://" in self.uri else "file"
        self.fs, self.root = fsspec.core.url_to_fs(self.uri, **dict(options or {}).get(protocol, {}))
        self.key = key  # signs and checks manifests (None: code is never pulled)
        self.pulled = self.published = 0  # files, this process

    def _mac(self, manifest: Mapping) -> str:
        body = json.dumps({k: v for k, v in manifest.items() if k != "mac"}, sort_keys=True).encode()
        return hmac.new(self.key or b"", body, hashlib.sha256).hexdigest()

    def _trusted(self, kind: str, key: str, manifest: Mapping) -> bool:
        """Whether an entry may be pulled: signed with our key, if we have one; code only then."""
        if self.key is None:
            if kind in CODE:
                log.warning("shared compile cache: %s not pulled without compile_cache_key (they are code)", kind)
                return False
            return True
        if not isinstance(manifest.get("mac"), str) or not hmac.compare_digest(manifest["mac"], self._mac(manifest)):
            log.warning(
                "shared compile cache entry %s/%s/%s is not signed with our key; ignoring it", self.uri, kind, key
            )
            return False
        return True

    def _manifest(self, kind: str, key: str) -> dict | None:
        try:
            return json.loads(self.fs.cat_file(f"{self.root}/{kind}/{key}/{MANIFEST}"))
        except FileNotFoundError:
            return None
        except Exception as e:  # unreachable or unreadable: build locally
            log.warning(
                "shared compile cache %s cannot be read (%s: %s); building locally", self.uri, type(e).__name__, e
            )
            return None

    def pull(self, kind: str, key: str, fingerprint: Mapping | None, dest: Path) -> list[str] | None:
        """Download entry `key`'s files into the folder `dest` (created), each verified; their
        names, or None (and nothing usable in `dest`) if there is no entry that fits."""
        manifest = self._manifest(kind, key)
        if not isinstance(manifest, dict) or not self._trusted(kind, key, manifest):
            return None
        if fingerprint is not None and manifest.get("fingerprint") != dict(fingerprint):
            log.warning(
                "shared compile cache entry %s/%s/%s was made for another configuration or environment; ignoring it",
                self.uri, kind, key,
            )  # fmt: skip
            return None
        try:
            if not re.fullmatch(r"[0-9a-f]{16}", str(manifest["writer"])):
                raise ValueError(f"writer {str(manifest['writer'])[:40]!r} is not a writer id")
            names = list(manifest["files"])
            for name in names:
                parts = name.split("/")
                if name.startswith("/") or any(p in ("", ".", "..") for p in parts):
                    raise ValueError(f"{name!r} is not a name inside the entry")
                want, local = manifest["files"][name], dest / name
                local.parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(f"{self.root}/{kind}/{key}/{manifest['writer']}/{name}", str(local))
                if local.stat().st_size != want["size"] or sha256_file(local) != want["sha256"]:
                    raise ValueError(f"{name}: size or sha256 differs from the manifest")
        except Exception as e:  # a damaged or half-deleted entry: build locally
            log.warning(
                "shared compile cache entry %s/%s/%s is unusable (%s); building locally", self.uri, kind, key, e
            )
            shutil.rmtree(dest, ignore_errors=True)
            return None
        self.pulled += len(names)
        return names

    def publish(self, kind: str, key: str, fingerprint: Mapping | None, src: Path, names: list[str]) -> bool:
        """Publish the files `names` of folder `src` as entry `key`, unless one is there
        already; whether this call did."""
        if not names or self._manifest(kind, key) is not None:
            return False
        writer = uuid.uuid4().hex[:16]
        base = f"{self.root}/{kind}/{key}"
        try:
            listing = {}
            for name in names:
                path = f"{base}/{writer}/{name}"
                self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
                self.fs.put_file(str(src / name), path)
                listing[name] = {"size": (src / name).stat().st_size, "sha256": sha256_file(src / name)}
            manifest = {"fingerprint": dict(fingerprint or {}), "writer": writer, "files": listing}
            if self.key is not None:
                manifest["mac"] = self._mac(manifest)
            self.fs.pipe_file(f"{base}/{MANIFEST}", json.dumps(manifest, indent=1).encode())  # last: the entry is whole
        except Exception as e:  # a full or read-only store: this node keeps its own
            log.warning("could not publish %s/%s to the shared compile cache (%s: %s)", kind, key, type(e).__name__, e)
            return False
        self.published += len(names)
        return True


def shared_cache(config) -> SharedCache | None:
    """The shared compile cache an `EngineConfig` names (None when it names none), with the
    key its `compile_cache_key` file holds."""
    if not config.compile_cache:
        return None
    key = None
    if config.compile_cache_key:
        key = Path(config.compile_cache_key).expanduser().read_bytes().strip()
        if len(key) < 16:
            raise ValueError(f"compile_cache_key: {config.compile_cache_key} holds fewer than 16 bytes")
    return SharedCache(config.compile_cache, config.source_options(), key)
